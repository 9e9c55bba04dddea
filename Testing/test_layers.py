"""The layering docs/architecture.md promises: what each layer may import, and one definition of each option."""

import argparse
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from isdnet.config import TrainConfig, add_train_arguments, config_from_arguments, train_arguments

ROOT = Path(__file__).resolve().parent.parent
FRONT_ENDS = {"ISDNetLib", "ISDNetWeb", "ISDNetTrain", "ISDNetSegment", "isdnet_bench", "slicer", "qt", "ctk",
              "vtk", "trame", "trame_slicer"}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
              and node.level == 0}
    return {name.split(".")[0] for name in names}


def test_the_engine_imports_no_front_end_and_leaves_sys_path_alone():
    for path in sorted((ROOT / "isdnet").glob("*.py")):
        assert not imported_roots(path) & FRONT_ENDS, f"{path.name} imports a front end"
        assert "sys.path" not in path.read_text(encoding="utf-8"), f"{path.name} edits sys.path"


def imports_after(code: str, unimportable: tuple[str, ...] = ()) -> set[str]:
    """The top-level modules a fresh interpreter holds after running ``code``, with ``unimportable`` modules made
    impossible to import (as they are on Windows)."""
    block = f"import sys\nfor _name in {unimportable!r}:\n    sys.modules[_name] = None\n"
    probe = block + code + "\nprint(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def test_the_cli_and_segment_need_no_benchmark_and_no_unix_only_module():
    # fcntl is left out: isdnet.files takes msvcrt on Windows and fcntl elsewhere.
    loaded = imports_after("from isdnet.cli import build_parser; build_parser().format_help()\n"
                           "import isdnet.infer, isdnet.train, isdnet.outputs",
                           unimportable=("resource", "pwd", "grp", "termios"))
    assert "isdnet" in loaded and "torch" in loaded
    assert not loaded & FRONT_ENDS


def test_the_contract_and_the_slicer_side_logic_load_without_torch():
    loaded = imports_after("import isdnet.config, ISDNetLib.train, ISDNetLib.segment, ISDNetLib.export")
    assert "ISDNetLib" in loaded and "torch" not in loaded


@pytest.mark.parametrize("values", [
    {},
    dict(method="hung", epochs=3, lambda_semi=0.5, augment=False, class_weights=[0.2, 1.2, 2.2]),
    dict(slice_size=[32, 48], discriminator_betas=(0.5, 0.99), discriminator="ConfidenceNet", total_steps=100),
])
def test_train_options_round_trip_through_the_command_line(values):
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    assert config_from_arguments(parser.parse_args(train_arguments(**values))) == TrainConfig(**values)
    assert config_from_arguments(parser.parse_args([])) == TrainConfig(), "the CLI defaults are TrainConfig's"
