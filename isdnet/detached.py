"""The data files that a NRRD (``.nhdr``, ``.nrrd``) or MetaImage (``.mhd``, ``.mha``) header names for its voxels.

Such a header may keep its voxels in other files, anywhere: ``data file: ../../etc/passwd`` or
``ElementDataFile = /dev/zero``. ITK follows the header, so a reader that trusts a folder (a dataset, the web
app's workspace) must see those files before ITK does. Both formats name one file, a ``LIST`` of files (one a line
after the field), or a printf pattern with a range (``slice%03d.raw 1 40 1``); relative names are relative to
the header's folder (teem's ``nrrd`` and MetaIO's rules). Hand-written because neither ITK nor SimpleITK tells
which files a header names.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import InputError

MAX_HEADER_BYTES = 2**20  # a text header longer than this is not a header
MAX_DATA_FILES = 100_000  # more files than slices any volume has
NRRD_FIELD = re.compile(r"data ?file\s*:(?!=)(.*)", re.IGNORECASE)
META_FIELD = re.compile(r"ElementDataFile\s*=(.*)", re.IGNORECASE)
META_ENDINGS = (".mha", ".mhd")


def data_files(path: Path) -> list[Path]:
    """The data files ``path``'s header names, as normalised absolute paths; empty when its voxels are inline
    (or it is another format). Raises InputError naming ``path`` when its header cannot be told apart."""
    path = Path(path)
    try:
        with open(path, "rb") as file:
            head = file.read(MAX_HEADER_BYTES)
    except OSError as error:
        raise InputError(path, f"cannot be read ({error.strerror or error})") from None
    if head.startswith(b"NRRD"):
        field, local = NRRD_FIELD, None
        lines = re.split(rb"\r?\n\r?\n", head, maxsplit=1)[0].decode("latin-1").splitlines()  # an empty line ends it
    elif path.name.lower().endswith(META_ENDINGS) or re.match(rb"\s*ObjectType\s*=", head):
        field, local = META_FIELD, "LOCAL"
        lines = head.decode("latin-1").splitlines()
    else:
        return []
    for index, line in enumerate(lines):
        match = field.match(line.strip())
        if match is None:
            continue
        value = match.group(1).strip()
        if value == local:
            return []
        names = _names(path, value, [n.strip() for n in lines[index + 1:] if n.strip()])
        return [Path(os.path.normpath(path.parent / name)) for name in names]
    return []


def _names(path: Path, value: str, following: list[str]) -> list[str]:
    """The file names a data-file field's value gives: itself, the ``LIST`` after it, or its pattern's range."""
    tokens = value.split()
    if not tokens:
        raise InputError(path, "its header names an empty data file")
    if tokens[0] == "LIST":
        if not 0 < len(following) <= MAX_DATA_FILES:
            raise InputError(path, f"its header's LIST names {len(following)} data files")
        return following
    if len(tokens) in (4, 5) and "%" in tokens[0] and all(re.fullmatch(r"-?\d+", t) for t in tokens[1:4]):
        first, last, step = (int(t) for t in tokens[1:4])
        if step == 0 or (last - first) // step + 1 > MAX_DATA_FILES:
            raise InputError(path, f"its header's data file pattern {value!r} has an unusable range")
        try:
            return [tokens[0] % i for i in range(first, last + (1 if step > 0 else -1), step)]
        except (TypeError, ValueError):
            raise InputError(path, f"its header's data file pattern {tokens[0]!r} is not a number pattern") \
                from None
    return [value]
