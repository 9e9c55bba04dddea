"""ISDNetSegment's logic: run a trained model on a volume node and import the result as a segmentation."""

from .logic import SegmentLogic, SegmentStatus, describe_model, read_model_header

__all__ = ["SegmentLogic", "SegmentStatus", "describe_model", "read_model_header"]
