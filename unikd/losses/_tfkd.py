"""Yuan et al., "Revisiting Knowledge Distillation via Label Smoothing Regularization" (CVPR 2020): Tf-KD_reg,
teacher-free KD with a manually designed teacher (Eq. 9)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unikd.losses._common import (
    LossModule,
    check_logits,
    check_positive,
    check_target,
    entropy,
    full_precision,
    soft_cross_entropy,
)


def tfkd_teacher(
    target: torch.Tensor,
    num_classes: int,
    *,
    correct_prob: float,
    temperature: float,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The manually designed teacher (N, C): ``softmax(p^d / T)`` with p^d = correct_prob on the target and
    (1 - correct_prob) / (C - 1) elsewhere (Eq. 9; the released code applies the softmax to p^d itself).

    For probability targets y, p^d = correct_prob * y + (1 - correct_prob) / (C - 1) * (1 - y), which is the
    original for one-hot y.
    """
    label = F.one_hot(target, num_classes) if target.dim() == 1 else target
    label = label.to(dtype)
    designed = correct_prob * label + (1 - correct_prob) / (num_classes - 1) * (1 - label)
    return F.softmax(designed / temperature, dim=1)


@full_precision
def tfkd_loss(
    student_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: float = 20.0,
    correct_prob: float = 0.99,
    validate: bool | None = None,
) -> torch.Tensor:
    """KL(teacher || softmax(student)) to the manually designed teacher, summed over classes, mean over the batch.

    The released code computes ``nn.KLDivLoss()(...)`` (mean over all N * C elements) times ``multiplier``; that
    equals this loss times ``multiplier / C`` (the released CIFAR-100 setting, multiplier=100, C=100, gives a factor
    of 1). The student is not divided by the temperature (as released). The caller mixes it with CE:
    ``(1 - alpha) * CE + alpha * multiplier / C * tfkd_loss``.

    Args:
        student_logits: (N, C).
        target: class indices (N,) or probabilities (N, C).
        temperature: T applied to the designed distribution (20 for CIFAR-100 ResNet18 in the released params).
        correct_prob: probability the designed teacher puts on the target (0.99 released).
    """
    check_logits("student_logits", student_logits)
    check_target(target, student_logits, validate)
    check_positive("temperature", temperature)
    if not 0.0 < correct_prob < 1.0:
        raise ValueError(f"correct_prob: must be in (0, 1), got {correct_prob}")
    teacher = tfkd_teacher(
        target, student_logits.shape[1], correct_prob=correct_prob, temperature=temperature, dtype=student_logits.dtype
    )
    return soft_cross_entropy(student_logits, teacher) - entropy(teacher)


class TfKDLoss(LossModule):
    """Module form of :func:`tfkd_loss`: ``TfKDLoss(temperature=20.0, correct_prob=0.99)(logits, target)``."""

    loss_fn = staticmethod(tfkd_loss)
