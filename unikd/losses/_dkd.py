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
    non_target_softmax,
    row_dot,
    with_gradient,
)


def _dkd_value_and_gradient(
    student_scaled: torch.Tensor,
    teacher_scaled: torch.Tensor,
    target_column: torch.Tensor,
    alpha: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``alpha * TCKD + beta * NCKD`` (N, 1) and its gradient w.r.t. the scaled student logits (N, C).

    Built from the softmax over the non-target classes and the non-target log-sum-exp, so log(1 - p_t) is never
    formed by subtraction: a saturated p_t (huge logits) stays finite and exact.
    """
    student_masked, student_non_target, student_log_norm = non_target_softmax(student_scaled, target_column)
    teacher_masked, teacher_non_target, teacher_log_norm = non_target_softmax(teacher_scaled, target_column)
    # log p_t = -softplus(lse_nt - z_t), log(1 - p_t) = -softplus(z_t - lse_nt).
    student_gap = student_log_norm - student_scaled.gather(1, target_column)
    teacher_gap = teacher_log_norm - teacher_scaled.gather(1, target_column)
    student_log_target, student_log_rest = -F.softplus(student_gap), -F.softplus(-student_gap)
    teacher_log_target, teacher_log_rest = -F.softplus(teacher_gap), -F.softplus(-teacher_gap)
    teacher_target, teacher_rest = teacher_log_target.exp(), teacher_log_rest.exp()

    # TCKD: KL between the binary distributions b = [p_t, 1 - p_t] (Eq. 2).
    tckd = teacher_target * (teacher_log_target - student_log_target) + teacher_rest * (
        teacher_log_rest - student_log_rest
    )
    # NCKD: KL between the non-target distributions (Eq. 3): sum_i q_i (log q_i - log p_i)
    # = q . (z^t - z^s) - lse^t_nt + lse^s_nt, with q zero at the target.
    nckd = row_dot(teacher_non_target, teacher_masked - student_masked) - teacher_log_norm + student_log_norm

    # d/dz_j: alpha * (p_j - b^t_t [j = t] - b^t_rest p-hat_j) + beta * (p-hat_j - q-hat_j), with
    # p_j = (1 - p_t) p-hat_j off the target.
    gradient = student_non_target.mul_(alpha * (student_log_rest.exp() - teacher_rest) + beta)
    gradient.sub_(teacher_non_target, alpha=beta)
    gradient.scatter_add_(1, target_column, alpha * (student_log_target.exp() - teacher_target))
    return alpha * tckd + beta * nckd, gradient


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
        Scalar, mean over the batch (the DKD warm-up weight is the caller's business). Its gradient is computed in
        closed form (no double backward).
    """
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits, like=student_logits)
    check_target(target, student_logits, validate)
    check_positive("temperature", temperature)
    with torch.no_grad():
        student_scaled = student_logits.detach() / temperature
        teacher_scaled = teacher_logits.detach() / temperature
        if target.dim() == 1:
            columns, weights = target.unsqueeze(1), torch.ones_like(student_scaled[:, :1])
        else:
            weights, columns = target.topk(2, dim=1)  # (N, 2) each
            weights = weights / weights.sum(dim=1, keepdim=True)
        value, gradient = 0.0, torch.zeros_like(student_scaled)
        for k in range(columns.shape[1]):
            per_sample, per_sample_gradient = _dkd_value_and_gradient(
                student_scaled, teacher_scaled, columns[:, k : k + 1], alpha, beta
            )
            weight = weights[:, k : k + 1]
            value = value + (weight * per_sample).mean()
            gradient.add_(per_sample_gradient.mul_(weight))
        # T^2 on the loss; d(z = s / T)/ds = 1 / T; mean over the batch.
        gradient.mul_(temperature / student_scaled.shape[0])
    return with_gradient(student_logits, value * temperature**2, gradient)


class DKDLoss(LossModule):
    """Module form of :func:`dkd_loss`: ``DKDLoss(temperature=4.0, alpha=1.0, beta=8.0)(student, teacher, target)``."""

    loss_fn = staticmethod(dkd_loss)
