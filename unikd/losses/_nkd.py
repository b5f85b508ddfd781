"""Yang et al., "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach with Normalized Loss
and Customized Soft Labels" (ICCV 2023), Section 3: Normalized KD (NKD)."""

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
    soft_cross_entropy,
    target_class,
)


@full_precision
def nkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: float = 1.0,
    gamma: float = 1.5,
    validate: bool | None = None,
) -> torch.Tensor:
    """NKD term of paper Eq. 4 (the caller adds the plain cross-entropy of Eq. 5):

        L_NKD = -T_t log S_t - gamma * temperature^2 * sum_{i != t} N(T_i^tau) log N(S_i^tau)

    T_t and S_t are the teacher's and student's target-class probabilities at temperature 1; N(.) renormalises the
    non-target classes, i.e. a softmax over the non-target logits divided by ``temperature``.

    Args:
        student_logits: (N, C).
        teacher_logits: (N, C); detached here.
        target: class indices (N,) or probabilities (N, C); probability rows use their argmax as the target class,
            as the released code does.
        temperature: tau of Eq. 4 (1.0 on ImageNet in the paper).
        gamma: weight of the non-target term (1.5 in the paper).
        validate: check target values (range, rows summing to 1); None: only when on the CPU (no device sync).

    Returns:
        Scalar, mean over the batch.
    """
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits, like=student_logits)
    check_target(target, student_logits, validate)
    check_positive("temperature", temperature)
    teacher_logits = teacher_logits.detach()
    target_column = target_class(target).unsqueeze(1)  # (N, 1)

    # -T_t log S_t: the target part, at temperature 1.
    teacher_target_prob = F.softmax(teacher_logits, dim=1).gather(1, target_column)
    student_target_log_prob = F.log_softmax(student_logits, dim=1).gather(1, target_column)
    loss_target = -(teacher_target_prob * student_target_log_prob).mean()

    # Normalised non-target distributions: softmax over the non-target logits only.
    teacher_non_target = F.softmax(mask_columns(teacher_logits / temperature, target_column), dim=1)
    student_non_target_logits = mask_columns(student_logits / temperature, target_column)
    loss_non_target = soft_cross_entropy(student_non_target_logits, teacher_non_target)
    return loss_target + gamma * temperature**2 * loss_non_target


class NKDLoss(LossModule):
    """Module form of :func:`nkd_loss`: ``NKDLoss(temperature=1.0, gamma=1.5)(student, teacher, target)``."""

    loss_fn = staticmethod(nkd_loss)
