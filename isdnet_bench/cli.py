"""The ``isdnet-bench`` command: one subcommand per benchmark module, each with ``add_arguments`` and ``run``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Optional

from isdnet.cli import exit_status
from isdnet.threads import wait_passively

from . import accuracy, active, convergence, speed

BENCHMARKS = {"accuracy": accuracy, "active": active, "convergence": convergence, "speed": speed}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="isdnet-bench", description="benchmarks that print a table and write JSON")
    sub = parser.add_subparsers(dest="benchmark", required=True)
    for name, module in BENCHMARKS.items():
        command = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    wait_passively()  # as the isdnet command does, so that the benchmarks measure what users run
    args = build_parser().parse_args(argv)
    return exit_status(f"isdnet-bench {args.benchmark}", lambda: args.run(args))
