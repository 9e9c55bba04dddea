"""Code shared by the ISDNetTrain and ISDNetSegment modules: no qt, no ctk, no module-level Slicer state.

It lives in its own folder (installed beside both modules) so neither module's library depends on the other.
"""

from .dependencies import DependencyReport, check_dependencies, ensure_dependencies
from .runner import ProcessRunner, engine_environment, parse_event, python_executable
from .volumes import image_from_volume, require_image_data, volume_from_image, write_volume

__all__ = [
    "DependencyReport",
    "ProcessRunner",
    "check_dependencies",
    "engine_environment",
    "ensure_dependencies",
    "image_from_volume",
    "parse_event",
    "python_executable",
    "require_image_data",
    "volume_from_image",
    "write_volume",
]
