"""``python -m isdnet``: the same as the ``isdnet`` command (Slicer runs training this way, with PythonSlicer)."""

import sys

from .cli import main

sys.exit(main())
