"""Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022): DKD = alpha * TCKD + beta * NCKD (Eq. 7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unikd.losses._common import (
    LossModule,
    check_logits,
    check_positive,
    check_target,
    full_precision,
    mask_columns,
)


def _log1mexp(log_p: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(log_p)) for log_p <= 0, accurate at both ends (Maechler, 2012)."""
    return torch.where(log_p > -0.6931471805599453, torch.log(-torch.expm1(log_p)), torch.log1p(-torch.exp(log_p)))


def _dkd_per_sample(
    student_scaled: torch.Tensor,
    teacher_scaled: torch.Tensor,
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    target_column: torch.Tensor,
    alpha: float,
    beta: float,
) -> torch.Tensor:
    """alpha * TCKD + beta * NCKD for each sample (N,), logits already divided by the temperature."""
    # TCKD: KL between the binary distributions b = [p_t, 1 - p_t] (Eq. 2), from log-probabilities so that a
    # saturated p_t neither overflows nor cancels.
    student_log_target = student_log_probs.gather(1, target_column).squeeze(1)
    teacher_log_target = teacher_log_probs.gather(1, target_column).squeeze(1)
    student_log_rest, teacher_log_rest = _log1mexp(student_log_target), _log1mexp(teacher_log_target)
    tckd = teacher_log_target.exp() * (teacher_log_target - student_log_target) + teacher_log_rest.exp() * (
        teacher_log_rest - student_log_rest
    )
    # NCKD: KL between the distributions over the non-target classes only (Eq. 3, the p-hat terms).
    teacher_non_target = F.softmax(mask_columns(teacher_scaled, target_column), dim=1)
    student_non_target_log = F.log_softmax(mask_columns(student_scaled, target_column), dim=1)
    nckd = torch.special.xlogy(teacher_non_target, teacher_non_target) - teacher_non_target * student_non_target_log
    return alpha * tckd + beta * nckd.sum(dim=1)


@full_precision
def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: float = 4.0,
    alpha: float = 1.0,
    beta: float = 8.0,
    validate: bool | None = None,
) -> torch.Tensor:
    """DKD, paper Eq. 7: ``temperature^2 * (alpha * TCKD + beta * NCKD)``, mean over the batch.

    Probability targets (not supported by the released code): DKD decomposes around one target class, so a mixed
    label is treated as a mixture of hard labels: the loss is the expectation of the hard-label DKD over the two
    largest label entries, weighted by their values renormalised to sum to 1. This is exact for mixup/cutmix rows
    (at most two non-zero entries) and equals the hard-label loss for one-hot rows.

    Args:
        student_logits: (N, C).
        teacher_logits: (N, C); detached here.
        target: class indices (N,) or probabilities (N, C).
        temperature, alpha, beta: as in the paper (defaults: CIFAR-100 setting T=4, alpha=1, beta=8).
        validate: check target values; None: only when on the CPU (no device sync).

    Returns:
        Scalar, mean over the batch (the DKD warm-up weight is the caller's business).
    """
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits, like=student_logits)
    check_target(target, student_logits, validate)
    check_positive("temperature", temperature)
    student_scaled = student_logits / temperature
    teacher_scaled = teacher_logits.detach() / temperature
    student_log_probs = F.log_softmax(student_scaled, dim=1)
    teacher_log_probs = F.log_softmax(teacher_scaled, dim=1)
    if target.dim() == 1:
        columns, weights = target.unsqueeze(1), None
    else:
        weights, columns = target.topk(2, dim=1)  # (N, 2) each
        weights = weights / weights.sum(dim=1, keepdim=True)
    loss = 0.0
    for k in range(columns.shape[1]):
        per_sample = _dkd_per_sample(
            student_scaled, teacher_scaled, student_log_probs, teacher_log_probs, columns[:, k : k + 1], alpha, beta
        )
        loss = loss + (per_sample if weights is None else weights[:, k] * per_sample)
    return loss.mean() * temperature**2


class DKDLoss(LossModule):
    """Module form of :func:`dkd_loss`: ``DKDLoss(temperature=4.0, alpha=1.0, beta=8.0)(student, teacher, target)``."""

    loss_fn = staticmethod(dkd_loss)
