"""The modules' widgets cannot run here, so check them statically: every ``self.ui.<name>`` the Python uses
exists in the module's .ui file, and every parameter-bound widget names a parameter of a fitting type."""

from __future__ import annotations

import ast
import json
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = ["ISDNetTrain", "ISDNetSegment"]
# Widget class -> the parameter types parameterNodeWrapper can bind it to (by annotation name).
BINDABLE = {
    "QComboBox": {"str"},
    "QSpinBox": {"int"},
    "QDoubleSpinBox": {"float"},
    "QCheckBox": {"bool"},
    "ctkPathLineEdit": {"Path"},
    "qMRMLNodeComboBox": {"vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode"},
}


def ui_widgets(module: str) -> dict[str, ElementTree.Element]:
    tree = ElementTree.parse(ROOT / module / "Resources" / "UI" / f"{module}.ui")
    return {w.get("name"): w for w in tree.iter("widget")}


def ui_uses(module: str) -> set[str]:
    tree = ast.parse((ROOT / module / f"{module}.py").read_text(encoding="utf-8"))
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}


def parameters(module: str) -> dict[str, str]:
    """Name -> annotated type name of the module's @parameterNodeWrapper class."""
    tree = ast.parse((ROOT / module / f"{module}.py").read_text(encoding="utf-8"))
    for cls in ast.walk(tree):
        if isinstance(cls, ast.ClassDef) and any(getattr(d, "id", None) == "parameterNodeWrapper"
                                                 for d in cls.decorator_list):
            result = {}
            for statement in cls.body:
                if isinstance(statement, ast.AnnAssign):
                    annotation = statement.annotation
                    if isinstance(annotation, ast.Subscript) and getattr(annotation.value, "id", "") == "Annotated":
                        annotation = annotation.slice.elts[0]
                    result[statement.target.id] = ast.unparse(annotation)
            return result
    raise AssertionError(f"{module}.py has no @parameterNodeWrapper class")


@pytest.mark.parametrize("module", MODULES)
def test_every_widget_the_python_uses_is_in_the_ui_file(module):
    widgets = ui_widgets(module)
    uses = ui_uses(module)
    assert uses, "the widget uses no ui element at all?"
    missing = sorted(uses - set(widgets))
    assert not missing, f"{module}.py uses self.ui.{missing} which {module}.ui does not define"


@pytest.mark.parametrize("module", MODULES)
def test_parameter_bound_widgets_match_the_parameter_node(module):
    params = parameters(module)
    bound = {}
    for name, widget in ui_widgets(module).items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = (name, widget.get("class"))
    assert bound, f"{module}.ui binds no widget to the parameter node"
    for parameter, (name, widget_class) in bound.items():
        assert parameter in params, f"{name} is bound to '{parameter}', which the parameter node lacks"
        assert params[parameter] in BINDABLE[widget_class], \
            f"{name} ({widget_class}) cannot show the {params[parameter]} parameter '{parameter}'"


@pytest.mark.parametrize("module", MODULES)
def test_ui_files_declare_their_custom_widgets_and_resources_exist(module):
    tree = ElementTree.parse(ROOT / module / "Resources" / "UI" / f"{module}.ui")
    declared = {c.findtext("class") for c in tree.iter("customwidget")}
    used = {w.get("class") for w in tree.iter("widget")}
    custom = {c for c in used if c.startswith(("ctk", "qMRML", "qSlicer"))}
    assert custom <= declared, f"undeclared custom widgets: {sorted(custom - declared)}"
    assert (ROOT / module / "Resources" / "Icons" / f"{module}.png").is_file()
    cmake = (ROOT / module / "CMakeLists.txt").read_text(encoding="utf-8")
    for path in (ROOT / module).rglob("*"):
        if path.suffix in (".py", ".ui", ".png") and "__pycache__" not in path.parts:
            assert str(path.relative_to(ROOT / module)).replace("${MODULE_NAME}", module) in \
                cmake.replace("${MODULE_NAME}", module), f"{path.name} is not installed by {module}/CMakeLists.txt"


def test_the_train_widget_has_the_suggested_column_and_its_buttons():
    widgets = ui_widgets("ISDNetTrain")
    table = widgets["volumesTable"]
    headers = [c.findtext("property/string") for c in table.findall("column")]
    assert headers == ["Use volume", "Segmentation", "Suggested"]
    assert table.find("property[@name='columnCount']/number").text == str(len(headers))
    for name in ("suggestButton", "annotateTopButton"):
        assert widgets[name].get("class") == "QPushButton"
    assert widgets["suggestStatusLabel"].get("class") == "QLabel"
    section = widgets["suggestCollapsibleButton"]
    assert {w.get("name") for w in section.iter("widget")} >= {"suggestButton", "annotateTopButton",
                                                               "suggestStatusLabel"}
    source = (ROOT / "ISDNetTrain" / "ISDNetTrain.py").read_text(encoding="utf-8")
    assert "table.setItem(row, 2, suggested)" in source, "the Suggested cell goes in the third column"
    assert 'slicer.util.selectModule("SegmentEditor")' in source


def test_libraries_use_neither_qt_nor_the_global_scene():
    for lib in (ROOT / "ISDNetLib",):
        for path in lib.glob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import,))
                        for alias in node.names}
            imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                         if isinstance(node, ast.ImportFrom) and node.module}
            assert not imported & {"qt", "ctk"}, f"{path} imports qt or ctk"
            assert not [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "mrmlScene"], \
                f"{path} uses the global scene"


def test_extension_cmake_and_description():
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for needed in ("find_package(Slicer REQUIRED)", 'EXTENSION_CATEGORY "Segmentation"', 'EXTENSION_DEPENDS "PyTorch"',
                   "EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                   "EXTENSION_SCREENSHOTURLS", "add_subdirectory(ISDNetTrain)", "add_subdirectory(ISDNetSegment)",
                   "isdnet/*.py"):
        assert needed in cmake, needed
    for path in (ROOT / "ISDNetLib").glob("*.py"):
        assert f"ISDNetLib/{path.name}" in cmake, f"{path.name} is not installed with the modules"
    entry = json.loads((ROOT / "ISDNet.json").read_text(encoding="utf-8"))
    # The Extensions Index's catalog-entry schema v1.0.1: required keys, and no key outside its properties.
    assert {"$schema", "category", "scm_url"} <= set(entry) and entry["$schema"].endswith("schema-v1.0.1.json#")
    assert set(entry) <= {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                          "build_subdirectory", "enabled", "tier"}
    assert entry["category"] == "Segmentation" and entry["build_dependencies"] == ["PyTorch"]
    assert "Slicer" in entry["scm_url"].rsplit("/", 1)[-1], "the index wants the repository named Slicer..."
    assert re.search(r"project\(ISDNet\)", cmake), "the project is named as the description file"
    assert "Apache License" in (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert re.search(r'EXTENSION_CONTRIBUTORS "[^"(]+ \([^)]+\)"', cmake), "contributors as Name (Organisation)"
    for image in ("ISDNet.png", "Screenshot.png"):
        assert (ROOT / "Resources" / image).is_file()
