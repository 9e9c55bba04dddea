"""Which nodes of a scene ISDNet made, and which of its segmentations a user has corrected and offers as labels.

ISDNet Segment marks its outputs with node attributes: what they are, and the volume they were made from. ISDNet
Train never offers a marked volume (a confidence or uncertainty map) as training data and never takes a prediction
as a label, unless the user has corrected it and said so ("Use as training label"), which marks it ``CORRECTED``.
"""

from __future__ import annotations

from typing import Any, Optional

OUTPUT_ATTRIBUTE = "ISDNet.Output"
SOURCE_ATTRIBUTE = "ISDNet.SourceVolume"
PREDICTION, CONFIDENCE, CORRECTED = "prediction", "confidence", "corrected"
UNCERTAINTY = "uncertainty"  # a map for "Review low-confidence regions"
VOLUME_KINDS = (CONFIDENCE, UNCERTAINTY)  # the outputs that are scalar volumes, not segmentations


def mark(node: Any, kind: str, source: Any) -> None:
    """Mark ``node`` as ISDNet's output of ``kind`` (PREDICTION, CONFIDENCE, UNCERTAINTY or CORRECTED) for the
    volume ``source``."""
    if kind not in (PREDICTION, CONFIDENCE, UNCERTAINTY, CORRECTED):
        raise ValueError(f"unknown ISDNet output kind {kind!r}")
    node.SetAttribute(OUTPUT_ATTRIBUTE, kind)
    node.SetAttribute(SOURCE_ATTRIBUTE, source.GetID())


def output_kind(node: Any) -> Optional[str]:
    """The mark of an ISDNet output, or None for a node the user made or loaded."""
    return node.GetAttribute(OUTPUT_ATTRIBUTE) or None


def _nodes(scene: Any, class_name: str) -> list[Any]:
    return [scene.GetNthNodeByClass(i, class_name) for i in range(scene.GetNumberOfNodesByClass(class_name))]


def output_of(scene: Any, volume: Any, kind: str) -> Optional[Any]:
    """The newest node ISDNet made of ``kind`` for ``volume``, if any (to reuse it on the next Apply)."""
    class_name = "vtkMRMLScalarVolumeNode" if kind in VOLUME_KINDS else "vtkMRMLSegmentationNode"
    found = [n for n in _nodes(scene, class_name)
             if output_kind(n) == kind and n.GetAttribute(SOURCE_ATTRIBUTE) == volume.GetID()]
    return found[-1] if found else None


def training_volumes(scene: Any) -> list[Any]:
    """The scalar volumes a user may train on: every one but label maps and ISDNet's own outputs."""
    return [v for v in _nodes(scene, "vtkMRMLScalarVolumeNode")
            if not v.IsA("vtkMRMLLabelMapVolumeNode") and output_kind(v) is None]


def uncorrected_predictions(scene: Any) -> list[Any]:
    """ISDNet's segmentations that no one has marked as corrected: never to be taken as labels."""
    return [n for n in _nodes(scene, "vtkMRMLSegmentationNode") if output_kind(n) == PREDICTION]


def corrected_label(scene: Any, volume: Any) -> Optional[Any]:
    """The segmentation of ``volume`` a user corrected and offered as its training label, if there is one."""
    return output_of(scene, volume, CORRECTED)


def use_as_training_label(segmentation: Any) -> None:
    """The user has corrected ISDNet's segmentation: from now on ISDNet Train offers it as its volume's label."""
    if output_kind(segmentation) is None:
        return  # the user's own segmentation: a label already
    segmentation.SetAttribute(OUTPUT_ATTRIBUTE, CORRECTED)

