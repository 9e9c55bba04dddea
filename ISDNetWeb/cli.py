"""``isdnet-web``: serve the train-and-segment workflow in a browser.

The options are checked before trame-slicer and the app are imported, so a bad option fails fast.
"""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from isdnet.cli import exit_status
from isdnet.config import DEVICES
from isdnet.errors import ISDNetError
from isdnet.threads import wait_passively

from .security import check_serving

TOKEN_VARIABLE = "ISDNET_WEB_TOKEN"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workspace", type=Path, default=Path("isdnet-workspace"),
                        help="the only folder the app reads and writes (created if missing)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on; anything but loopback needs --token")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port (printed at start)")
    parser.add_argument("--token", default=os.environ.get(TOKEN_VARIABLE),
                        help=f"access token (at least 16 characters; default ${TOKEN_VARIABLE}); open the page "
                        "with ?token=...")
    parser.add_argument("--max-upload-mb", type=int, default=512, help="largest file accepted from the browser")
    parser.add_argument("--train-options", default="",
                        help="extra 'isdnet train' options for every training, e.g. \"--base-channels 16\"")
    parser.add_argument("--device", choices=DEVICES, default="auto")


def run(args: argparse.Namespace) -> None:
    if args.max_upload_mb < 1:
        raise ISDNetError("--max-upload-mb must be at least 1")
    check_serving(args.host, args.token)
    try:
        from .app import WebOptions, serve
    except ModuleNotFoundError as error:
        raise ISDNetError(f"the web app needs {error.name}: install it with "
                          "pip install \"trame-slicer[standalone]==2.0.0\"") from None
    serve(WebOptions(workspace=args.workspace, host=args.host, port=args.port, token=args.token,
                     max_upload_bytes=args.max_upload_mb * 2**20,
                     train_arguments=shlex.split(args.train_options), device=args.device))


def main(argv: Optional[Sequence[str]] = None) -> int:
    wait_passively()  # before torch loads: the server segments small volumes in its own process
    parser = argparse.ArgumentParser(prog="isdnet-web", description="the ISDNet train-and-segment workflow in a "
                                     "browser (trame-slicer)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return exit_status("isdnet-web", lambda: run(args))
