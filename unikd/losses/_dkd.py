"""Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022): DKD = alpha * TCKD + beta * NCKD (Eq. 7)."""

from __future__ import annotations

import torch

from unikd.losses._common import (
    LossModule,
    check_logits,
    check_positive,
    check_target,
    full_precision,
    mask_columns,
)


def _dkd_per_sample(
    student_scaled: torch.Tensor, teacher_scaled: torch.Tensor, target_column: torch.Tensor, alpha: float, beta: float
) -> torch.Tensor:
    """alpha * TCKD + beta * NCKD for each sample (N,), from logits already divided by the temperature (N, C).

    Everything is written with log-sum-exps over all classes and over the non-target classes, so log(1 - p_t) is
    never formed by subtraction: a saturated p_t (huge logits) stays finite and exact.
    """

    def log_parts(scaled):
        masked = mask_columns(scaled, target_column)
        log_norm, log_norm_non_target = scaled.logsumexp(dim=1), masked.logsumexp(dim=1)
        log_target = scaled.gather(1, target_column).squeeze(1) - log_norm  # log p_t
        log_rest = log_norm_non_target - log_norm  # log(1 - p_t)
        log_non_target = masked - log_norm_non_target.unsqueeze(1)  # log p-hat_i, Eq. 3
        return log_target, log_rest, log_non_target

    student_target, student_rest, student_non_target = log_parts(student_scaled)
    teacher_target, teacher_rest, teacher_non_target = log_parts(teacher_scaled)
    # TCKD: KL between the binary distributions b = [p_t, 1 - p_t] (Eq. 2).
    tckd = teacher_target.exp() * (teacher_target - student_target) + teacher_rest.exp() * (teacher_rest - student_rest)
    # NCKD: KL between the distributions over the non-target classes (Eq. 3); the target column has p-hat = 0.
    nckd = (teacher_non_target.exp() * (teacher_non_target - student_non_target)).sum(dim=1)
    return alpha * tckd + beta * nckd


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
    if target.dim() == 1:
        columns, weights = target.unsqueeze(1), None
    else:
        weights, columns = target.topk(2, dim=1)  # (N, 2) each
        weights = weights / weights.sum(dim=1, keepdim=True)
    loss = 0.0
    for k in range(columns.shape[1]):
        per_sample = _dkd_per_sample(student_scaled, teacher_scaled, columns[:, k : k + 1], alpha, beta)
        loss = loss + (per_sample if weights is None else weights[:, k] * per_sample)
    return loss.mean() * temperature**2


class DKDLoss(LossModule):
    """Module form of :func:`dkd_loss`: ``DKDLoss(temperature=4.0, alpha=1.0, beta=8.0)(student, teacher, target)``."""

    loss_fn = staticmethod(dkd_loss)
