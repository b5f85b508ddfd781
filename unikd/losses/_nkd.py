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
    non_target_softmax,
    row_dot,
    target_class,
    with_gradient,
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
        teacher_logits: (N, C); no gradient reaches them.
        target: class indices (N,) or probabilities (N, C); probability rows use their argmax as the target class,
            as the released code does.
        temperature: tau of Eq. 4 (1.0 on ImageNet in the paper).
        gamma: weight of the non-target term (1.5 in the paper).
        validate: check target values (range, rows summing to 1); None: only when on the CPU (no device sync).

    Returns:
        Scalar, mean over the batch. Its gradient is computed in closed form (no double backward).
    """
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits, like=student_logits)
    check_target(target, student_logits, validate)
    check_positive("temperature", temperature)
    with torch.no_grad():
        student, teacher = student_logits.detach(), teacher_logits.detach()
        target_column = target_class(target).unsqueeze(1)  # (N, 1)
        student_target, teacher_target = student.gather(1, target_column), teacher.gather(1, target_column)

        # Target part at temperature 1, from the non-target log-sum-exps: log S_t = -softplus(lse_nt - s_t) and
        # 1 - S_t = sigmoid(lse_nt - s_t) stay exact when S_t saturates.
        student_masked, student_non_target, student_log_norm = non_target_softmax(student, target_column)
        _, teacher_non_target, teacher_log_norm = non_target_softmax(teacher, target_column)
        teacher_target_prob = torch.sigmoid(teacher_target - teacher_log_norm)  # T_t
        loss_target = teacher_target_prob * F.softplus(student_log_norm - student_target)
        # d(-T_t log S_t)/ds = T_t (S - onehot) = T_t (1 - S_t) (N(S) - onehot), N(S) the non-target softmax, and
        # d(gamma T^2 CE(N(T^tau), N(S^tau)))/ds = gamma T (N(S^tau) - N(T^tau)).
        target_weight = teacher_target_prob * torch.sigmoid(student_log_norm - student_target)
        scale = gamma * temperature
        if temperature == 1.0:
            gradient = student_non_target.mul_(target_weight + scale)
        else:
            gradient = student_non_target.mul_(target_weight)
            student_masked, student_non_target, student_log_norm = non_target_softmax(
                student / temperature, target_column
            )
            _, teacher_non_target, _ = non_target_softmax(teacher / temperature, target_column)
            gradient.add_(student_non_target, alpha=scale)
        gradient.sub_(teacher_non_target, alpha=scale)
        gradient.scatter_add_(1, target_column, -target_weight)
        gradient.div_(student.shape[0])

        # CE(N(T^tau), N(S^tau)) = -sum_i q_i (z_i - lse_nt) = lse_nt - q . z, with q zero at the target.
        non_target_ce = student_log_norm - row_dot(teacher_non_target, student_masked)
        value = (loss_target + gamma * temperature**2 * non_target_ce).mean()
    return with_gradient(student_logits, value, gradient)


class NKDLoss(LossModule):
    """Module form of :func:`nkd_loss`: ``NKDLoss(temperature=1.0, gamma=1.5)(student, teacher, target)``."""

    loss_fn = staticmethod(nkd_loss)
