"""Plain cross-entropy and label smoothing (Szegedy et al., "Rethinking the Inception Architecture", CVPR 2016),
both through ``torch.nn.functional.cross_entropy``, which takes index or probability targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unikd.losses._common import LossModule, check_logits, check_target, full_precision


@full_precision
def cross_entropy(student_logits: torch.Tensor, target: torch.Tensor, *, validate: bool | None = None) -> torch.Tensor:
    """Cross-entropy of logits (N, C) to class indices (N,) or probabilities (N, C); mean over the batch."""
    check_logits("student_logits", student_logits)
    check_target(target, student_logits, validate)
    return F.cross_entropy(student_logits, target)


@full_precision
def label_smoothing_loss(
    student_logits: torch.Tensor, target: torch.Tensor, *, smoothing: float = 0.1, validate: bool | None = None
) -> torch.Tensor:
    """Cross-entropy to ``(1 - smoothing) * y + smoothing / C`` (torch's ``label_smoothing``); replaces plain CE.

    Args:
        student_logits: (N, C).
        target: class indices (N,) or probabilities (N, C).
        smoothing: in [0, 1].
    """
    check_logits("student_logits", student_logits)
    check_target(target, student_logits, validate)
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing: must be in [0, 1], got {smoothing}")
    return F.cross_entropy(student_logits, target, label_smoothing=smoothing)


class CrossEntropyLoss(LossModule):
    """Module form of :func:`cross_entropy`."""

    loss_fn = staticmethod(cross_entropy)


class LabelSmoothingLoss(LossModule):
    """Module form of :func:`label_smoothing_loss`: ``LabelSmoothingLoss(smoothing=0.1)(logits, target)``."""

    loss_fn = staticmethod(label_smoothing_loss)
