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


SHIPPED = ("isdnet", "isdnet_bench", "ISDNetLib", "ISDNetWeb", "ISDNetTrain", "ISDNetSegment")


def text_io_without_encoding(path: Path) -> list[int]:
    """Lines of ``path`` that open, read or write text without naming its encoding, so that they would take the
    locale's (ASCII under Slicer's C locale, cp1252 on Windows)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call) or any(k.arg == "encoding" for k in node.keywords):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name in ("read_text", "write_text"):
            lines.append(node.lineno)
        elif name == "open" and isinstance(func, ast.Name):
            mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"),
                                                                None)
            if not (isinstance(mode, ast.Constant) and "b" in mode.value):
                lines.append(node.lineno)
        elif name in ("run", "Popen", "check_output") and any(k.arg in ("text", "universal_newlines")
                                                               for k in node.keywords):
            lines.append(node.lineno)
    return lines


def test_shipped_code_reads_and_writes_text_as_utf8_whatever_the_locale():
    paths = [path for package in SHIPPED for path in sorted((ROOT / package).rglob("*.py"))]
    found = {f"{path.relative_to(ROOT)}:{line}" for path in paths for line in text_io_without_encoding(path)}
    assert not found, f"text I/O that takes the locale's encoding: {sorted(found)}"


def imports_after(code: str, unimportable: tuple[str, ...] = ()) -> set[str]:
    """The top-level modules a fresh interpreter holds after running ``code``, with ``unimportable`` modules made
    impossible to import (as they are on Windows)."""
    block = f"import sys\nfor _name in {unimportable!r}:\n    sys.modules[_name] = None\n"
    probe = (block + code + "\nprint('MODULES', ' '.join(sorted({m.split('.')[0] for m, v in sys.modules.items() "
             "if v is not None})))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, encoding="utf-8")
    assert done.returncode == 0, done.stderr
    return set(done.stdout.rsplit("MODULES", 1)[1].split())


def test_the_cli_and_segment_need_no_benchmark_and_no_unix_only_module():
    # fcntl is left out: isdnet.files takes msvcrt on Windows and fcntl elsewhere.
    loaded = imports_after("from isdnet.cli import build_parser; build_parser().format_help()\n"
                           "import isdnet.infer, isdnet.train, isdnet.outputs, isdnet.rank, isdnet.uncertainty",
                           unimportable=("resource", "pwd", "grp", "termios"))
    assert "isdnet" in loaded and "torch" in loaded
    assert not loaded & FRONT_ENDS


def test_train_and_segment_run_with_the_unix_only_modules_missing(tmp_path):
    """What a Slicer child process on Windows does: --help, a one-epoch training and a segmentation, in a Python
    where resource, pwd, grp and termios cannot be imported."""
    from isdnet.phantoms import write_phantom_dataset

    data = write_phantom_dataset(tmp_path / "data", 3, seed=1, shape=(12, 32, 32))
    model, out = tmp_path / "m.safetensors", tmp_path / "seg"
    image = sorted((data / "imagesTr").iterdir())[0]
    code = ("from isdnet.cli import build_parser, main\n"
            "build_parser().format_help()\n"
            f"assert main(['train', {str(data)!r}, '--out', {str(model)!r}, '--epochs', '1', '--steps-per-epoch', '2', "
            "'--base-channels', '8', '--batch-size', '2', '--slice-size', '32', '32', '--warmup-epochs', '0']) == 0\n"
            f"assert main(['segment', {str(image)!r}, '--model', {str(model)!r}, '--out', {str(out)!r}]) == 0\n")
    loaded = imports_after(code, unimportable=("resource", "pwd", "grp", "termios"))
    assert not loaded & {"resource", "termios"} and model.is_file() and len(list(out.iterdir())) == 2


def test_children_start_without_a_console_window_on_windows(monkeypatch, tmp_path):
    import subprocess

    from ISDNetLib.runner import ProcessRunner

    seen = {}

    class Recorder:
        def __init__(self, args, **options):
            seen.update(options)

        def poll(self):
            return 0

    monkeypatch.setattr("ISDNetLib.runner.WINDOWS", True)
    monkeypatch.setattr(subprocess, "CREATE_NO_WINDOW", 0x08000000, raising=False)
    monkeypatch.setattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x00000200, raising=False)
    monkeypatch.setattr(subprocess, "Popen", Recorder)
    ProcessRunner().start(["isdnet", "train"], log_path=str(tmp_path / "log"))
    assert seen["creationflags"] & 0x08000000, "no console window (closing one would kill the training)"
    assert "start_new_session" not in seen


def test_the_contract_and_the_slicer_side_logic_load_without_torch():
    loaded = imports_after("import isdnet.config, isdnet.modelheader, isdnet.rankfile, ISDNetLib.train, "
                           "ISDNetLib.segment, ISDNetLib.export, ISDNetLib.nodes, ISDNetLib.review, "
                           "ISDNetLib.suggest")
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
