"""The validation of a training: which labeled cases are held out, and their Dice after each epoch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .dataset import Case
from .estimate import validation_indices
from .geometry import PreparedVolume
from .infer import predict_slices
from .metrics import dice_per_class


def split_validation(cases: Sequence[Case], fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Hold out ``fraction`` of the labeled cases (at least one when there are two or more) to pick the best epoch.

    With a single labeled case, or fraction 0, nothing is held out and the last epoch's model is kept.
    """
    cases = list(cases)
    held = validation_indices(len(cases), fraction, seed)
    return [c for i, c in enumerate(cases) if i not in held], [c for i, c in enumerate(cases) if i in held]



def validation_dice(segmenter: torch.nn.Module, volumes: Sequence[PreparedVolume], num_classes: int,
                    device: torch.device, dtype: torch.dtype, batch_size: int, slice_size: tuple[int, int]) -> float:
    """Mean over volumes of the mean foreground Dice, on the model's slice grid, slices padded as in training."""
    scores = []
    for volume in volumes:
        prediction = np.empty(volume.image.shape, dtype=np.uint8)
        for start, probs, _ in predict_slices(segmenter, volume.image, batch_size=batch_size, device=device,
                                              dtype=dtype, slice_size=slice_size, fill=volume.minimum):
            prediction[start:start + len(probs)] = probs.argmax(1).cpu().numpy()
        per_class = dice_per_class(prediction, np.asarray(volume.label), range(1, num_classes))
        scores.append(float(np.mean(list(per_class.values()))))
    return float(np.mean(scores))
