"""Render layout previews of the two Slicer modules' panels from their Designer .ui files, for the README.

The Slicer application cannot run on the build machines, so this loads each module's real .ui file with Qt
(PySide6, offscreen), standing in plain Qt widgets for Slicer's and CTK's (a collapsible button becomes a group
box, a node selector a combo box, a path editor a line edit), fills in example content and saves a PNG. It
shows the panel's layout and wording, not Slicer's own styling.

    pip install PySide6-Essentials && python docs/render_module_previews.py
"""

from __future__ import annotations

import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "Resources" / "Screenshots"
STAND_INS = {"qMRMLWidget": "QWidget", "ctkCollapsibleButton": "QGroupBox", "ctkPathLineEdit": "QLineEdit",
             "qMRMLNodeComboBox": "QComboBox"}
SLICER_ONLY_PROPERTIES = {"SlicerParameterName", "nodeTypes", "noneEnabled", "noneDisplay", "addEnabled",
                          "removeEnabled", "showChildNodeTypes", "filters", "nameFilters", "settingKey",
                          "collapsed"}
EXAMPLES = {
    "ISDNetTrain": {
        "combos": {"methodComboBox": ["isdnet", "hung", "adv", "adv-classifier", "baseline"],
                   "sliceAxisComboBox": ["auto", "x", "y", "z"], "deviceComboBox": ["auto", "cpu", "cuda", "mps"]},
        "lines": {"outputModelPathLineEdit": "/data/liver-study/isdnet-liver.safetensors"},
        "table": [["liver_01", "liver_01 segmentation"], ["liver_02", "liver_02 segmentation"],
                  ["liver_03", "(unlabeled)"], ["liver_04", "(unlabeled)"], ["liver_05", "(unlabeled)"]],
        "spins": {"epochsSpinBox": 40, "lambdaAdvSpinBox": 0.001, "lambdaSemiSpinBox": 1.0, "tSemiSpinBox": 0.1},
        "labels": {"volumesSummaryLabel": "2 labeled, 3 unlabeled volumes"},
        "log": '{"event": "epoch", "epoch": 17, "epochs": 40, "losses": {"dice": 0.081, "adv": 0.69, '
               '"semi": 0.12, "d": 1.21, "d0": 1.37, "w_mean": 0.51}, "val_dice": 0.874, "eta_s": 372.0}',
        "progress": 45,
        "status": "Epoch 18 of 40, iteration 12 of 20 - about 6 min left. Best validation Dice 0.874.",
    },
    "ISDNetSegment": {
        "combos": {"inputVolumeSelector": ["liver_07"], "outputSegmentationSelector": ["(new) liver_07 ISDNet"],
                   "deviceComboBox": ["auto", "cpu", "cuda", "mps"]},
        "lines": {"modelPathLineEdit": "/data/liver-study/isdnet-liver.safetensors"},
        "table": [["1", "liver", ""], ["2", "lesion", ""]],
        "info": "isdnet, trained on 2 labeled and 3 unlabeled volumes; validation Dice 0.874 (epoch 36).",
        "progress": 100,
        "status": "Segmented liver_07: 2 segments.",
    },
}


def plain_qt_ui(path: Path) -> bytes:
    """The .ui file with Slicer/CTK classes replaced by their plain Qt stand-ins and Slicer-only properties gone."""
    tree = ET.parse(path)
    root = tree.getroot()
    for custom in root.findall("customwidgets"):
        root.remove(custom)
    for widget in root.iter("widget"):
        cls = widget.get("class", "")
        widget.set("class", STAND_INS.get(cls, cls))
        for prop in list(widget.findall("property")):
            name = prop.get("name")
            if name in SLICER_ONLY_PROPERTIES:
                widget.remove(prop)
            elif cls == "ctkCollapsibleButton" and name == "text":
                prop.set("name", "title")
    return ET.tostring(root)


def render(module: str) -> Path:
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice
    from PySide6.QtGui import QColor
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import (
        QAbstractSpinBox,
        QComboBox,
        QLabel,
        QLineEdit,
        QPlainTextEdit,
        QProgressBar,
        QTableWidget,
        QTableWidgetItem,
    )

    ui_file = ROOT / module / "Resources" / "UI" / f"{module}.ui"
    data = QByteArray(plain_qt_ui(ui_file))  # kept referenced: the buffer does not own it
    buffer = QBuffer(data)
    buffer.open(QIODevice.ReadOnly)
    loader = QUiLoader()
    panel = loader.load(buffer)
    example = EXAMPLES[module]
    for name, items in example["combos"].items():
        panel.findChild(QComboBox, name).addItems(items)
    for name, text in example["lines"].items():
        panel.findChild(QLineEdit, name).setText(text)
    table = panel.findChild(QTableWidget)
    table.setRowCount(len(example["table"]))
    for r, row in enumerate(example["table"]):
        for c, text in enumerate(row):
            table.setItem(r, c, QTableWidgetItem(text))
    if module == "ISDNetSegment":
        for r, color in enumerate(((221, 130, 101), (144, 238, 144))):
            table.item(r, 2).setBackground(QColor(*color))
        panel.findChild(QLabel, "modelInfoLabel").setText(example["info"])
    for name, value in example.get("spins", {}).items():
        panel.findChild(QAbstractSpinBox, name).setValue(value)
    for name, text in example.get("labels", {}).items():
        panel.findChild(QLabel, name).setText(text)
    if "log" in example:
        panel.findChild(QPlainTextEdit).setPlainText(example["log"])
    panel.findChild(QProgressBar).setValue(example["progress"])
    panel.findChild(QLabel, "statusLabel").setText(example["status"])
    panel.resize(460, min(panel.sizeHint().height() + 40, 900))
    OUT.mkdir(parents=True, exist_ok=True)
    target = OUT / f"{module}-panel.png"
    panel.grab().save(str(target))
    return target


def main() -> None:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtWidgets import QApplication

    app = QApplication(sys.argv[:1])
    for module in EXAMPLES:
        print(render(module))
    app.quit()


if __name__ == "__main__":
    main()
