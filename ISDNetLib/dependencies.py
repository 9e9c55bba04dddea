"""Check and install what the engine needs inside Slicer: torch through the PyTorch extension, the rest by pip.

The functions take callbacks for asking, reporting and installing, so they need no GUI: the widgets pass
``slicer.util.confirmOkCancelDisplay``, a status-bar message and ``slicer.util.pip_install``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

TORCH_REQUIREMENT = ">=2.1"
# Import name -> pip requirement. numpy, SimpleITK and vtk are left out on purpose: Slicer ships them, and
# replacing them with pip's builds breaks Slicer.
ENGINE_PACKAGES = {"safetensors": "safetensors>=0.4", "jsonschema": "jsonschema>=4.0", "psutil": "psutil>=5.9",
                   "slicerio": "slicerio>=1.1"}


@dataclass
class DependencyReport:
    """What is there: torch's version (None when missing) and the requirements pip must still add."""

    torch_version: Optional[str]
    missing: list[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return self.torch_version is not None and not self.missing


def check_dependencies() -> DependencyReport:
    """Look for torch and the engine's other packages without importing torch."""
    try:
        torch_version: Optional[str] = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = None
    missing = [req for module, req in ENGINE_PACKAGES.items() if importlib.util.find_spec(module) is None]
    return DependencyReport(torch_version, missing)


def install_torch_with_pytorch_extension() -> bool:
    """Install torch through the PyTorch extension's logic; False when the user declined there."""
    try:
        import PyTorchUtils
    except ImportError:
        raise RuntimeError("The PyTorch extension is not installed. Install 'PyTorch' from the Extensions "
                           "Manager, restart Slicer and try again.") from None
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                          torchVersionRequirement=TORCH_REQUIREMENT)
    return torch is not None


def ensure_dependencies(confirm: Callable[[str], bool], status: Callable[[str], None],
                        pip_install: Callable[[str], None],
                        install_torch: Callable[[], bool] = install_torch_with_pytorch_extension) -> bool:
    """Make the engine importable, asking before any download; True when everything is there.

    torch is installed only when it is missing: an installed build (CUDA or not) is never replaced.
    """
    report = check_dependencies()
    if report.ready:
        return True
    plan = []
    if report.torch_version is None:
        plan.append("PyTorch (through the PyTorch extension; a CUDA build when a supported GPU is present)")
    plan += report.missing
    if not confirm("ISDNet needs these Python packages, which will now be downloaded and installed:\n  "
                   + "\n  ".join(plan) + "\nThis can take several minutes. Continue?"):
        status("ISDNet: installation of the Python packages was cancelled.")
        return False
    if report.torch_version is None:
        status("ISDNet: installing PyTorch, this can take several minutes...")
        if not install_torch():
            status("ISDNet: PyTorch was not installed.")
            return False
    for requirement in report.missing:
        status(f"ISDNet: installing {requirement}...")
        pip_install(requirement)
    importlib.invalidate_caches()
    report = check_dependencies()
    status("ISDNet: the Python packages are ready." if report.ready else
           f"ISDNet: still missing after installation: {', '.join(report.missing) or 'torch'}")
    return report.ready


def ensure_dependencies_in_slicer() -> bool:
    """``ensure_dependencies`` with Slicer's dialogs, status bar and pip; errors are shown, not raised."""
    import slicer

    def status(message: str) -> None:
        slicer.util.showStatusMessage(message, 5000)
        slicer.app.processEvents()

    try:
        with slicer.util.tryWithErrorDisplay("The Python packages ISDNet needs could not be installed.",
                                             waitCursor=True):
            return ensure_dependencies(confirm=slicer.util.confirmOkCancelDisplay, status=status,
                                       pip_install=slicer.util.pip_install)
    except Exception:  # noqa: BLE001 - already shown to the user by tryWithErrorDisplay
        return False
