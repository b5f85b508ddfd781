"""Yang et al., "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach with Normalized Loss
and Customized Soft Labels" (ICCV 2023), Section 3: Normalized KD (NKD), with the ablation variants of its Tables 5
and 14."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unikd.losses._common import (
    LossModule,
    check_choice,
    check_logits,
    check_positive,
    check_target,
    full_precision,
    non_target_softmax,
    row_dot,
    target_class,
    with_gradient,
)

# Table 14: the target part. Table 5: the non-target part.
NKD_TARGET_LOSSES = ("t1", "t2", "t1+t2")
NKD_NON_TARGET_LOSSES = ("normalized", "kd", "none")


def target_part(student_odds: torch.Tensor, teacher_odds: torch.Tensor, target_loss: str) -> tuple[torch.Tensor, ...]:
    """Per-sample target term (N, 1) and its gradient weight w (N, 1): d term / d s = w * (N(S) - e_t).

    ``student_odds`` and ``teacher_odds`` are the target-class log-odds z_t - lse_{i != t} z_i, so S_t = sigmoid(odds)
    and 1 - S_t = sigmoid(-odds) stay exact when S_t saturates. N(S) is the softmax over the non-target classes and
    e_t the one-hot target: d(-log S_t)/ds = (1 - S_t)(N(S) - e_t) and d(-log(1 - S_t))/ds = -S_t (N(S) - e_t).
    """
    loss, weight = 0.0, 0.0
    if target_loss in ("t1", "t1+t2"):  # T1 = -T_t log S_t
        teacher_target = torch.sigmoid(teacher_odds)
        loss = teacher_target * F.softplus(-student_odds)
        weight = teacher_target * torch.sigmoid(-student_odds)
    if target_loss in ("t2", "t1+t2"):  # T2 = -(1 - T_t) log(1 - S_t)
        teacher_rest = torch.sigmoid(-teacher_odds)
        loss = loss + teacher_rest * F.softplus(student_odds)
        weight = weight - teacher_rest * torch.sigmoid(student_odds)
    return loss, weight


def _non_target_part(
    non_target_loss: str,
    student_masked: torch.Tensor,
    student_log_norm: torch.Tensor,
    teacher_non_target: torch.Tensor,
    student_odds: torch.Tensor,
    teacher_odds: torch.Tensor,
) -> tuple[torch.Tensor, float | torch.Tensor, torch.Tensor | None, float | torch.Tensor]:
    """Per-sample non-target term at one temperature (N, 1), and (a, b, c) such that its gradient with respect to
    the scaled logits z is ``a * N(S) + b * e_t - c * N(T)`` (b None: zero).

    normalized: CE(N(T), N(S)) = lse_nt - N(T) . z, gradient N(S) - N(T).
    kd: -sum_{i != t} T_i log S_i = (1 - T_t) (CE(N(T), N(S)) - log(1 - S_t)), gradient
        (1 - T_t) ((1 - S_t) N(S) + S_t e_t - N(T)).
    """
    cross_entropy = student_log_norm - row_dot(teacher_non_target, student_masked)
    if non_target_loss == "normalized":
        return cross_entropy, 1.0, None, 1.0
    teacher_rest = torch.sigmoid(-teacher_odds)  # 1 - T_t
    value = teacher_rest * (cross_entropy + F.softplus(student_odds))
    return value, teacher_rest * torch.sigmoid(-student_odds), teacher_rest * torch.sigmoid(student_odds), teacher_rest


@full_precision
def nkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: float = 1.0,
    gamma: float = 1.5,
    target_loss: str = "t1",
    non_target_loss: str = "normalized",
    validate: bool | None = None,
) -> torch.Tensor:
    """NKD term of paper Eq. 4 (the caller adds the plain cross-entropy of Eq. 5):

        L_NKD = -T_t log S_t - gamma * temperature^2 * sum_{i != t} N(T_i^tau) log N(S_i^tau)

    T_t and S_t are the teacher's and student's target-class probabilities at temperature 1; N(.) renormalises the
    non-target classes, i.e. a softmax over the non-target logits divided by ``temperature``. The defaults are the
    paper's NKD; the two options are its ablations (each part can be chosen independently):

    ``target_loss`` (Table 14, the target part, at temperature 1):
        "t1":    T1 = -T_t log S_t                                   (NKD, Eq. 4)
        "t2":    T2 = -(1 - T_t) log(1 - S_t)
        "t1+t2": T1 + T2, the binary cross-entropy of [T_t, 1 - T_t] to [S_t, 1 - S_t] (DKD's binary form)
    ``non_target_loss`` (Table 5, the non-target part, at temperature tau, weighted gamma * tau^2):
        "normalized": -sum_{i != t} N(T_i^tau) log N(S_i^tau)        (NKD, Eq. 4)
        "kd":         -sum_{i != t} T_i^tau log S_i^tau, KD's un-normalised non-target term (Eq. 2); it equals
                      (1 - T_t^tau) * ("normalized" - log(1 - S_t^tau))
        "none":       no non-target term (the target term only)
    For "kd" the paper's Table 5 gives no weight; gamma * tau^2 is kept, so only the normalisation changes between
    rows (gamma=1 and tau=1 give exactly KD's non-target term).

    Args:
        student_logits: (N, C).
        teacher_logits: (N, C); no gradient reaches them.
        target: class indices (N,) or probabilities (N, C); probability rows use their argmax as the target class,
            as the released code does.
        temperature: tau of Eq. 4 (1.0 on ImageNet in the paper).
        gamma: weight of the non-target term (1.5 in the paper).
        target_loss: "t1" (default), "t2" or "t1+t2", see above.
        non_target_loss: "normalized" (default), "kd" or "none", see above.
        validate: check target values (range, rows summing to 1); None: only when on the CPU (no device sync).

    Returns:
        Scalar, mean over the batch. Its gradient is computed in closed form (no double backward).
    """
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits, like=student_logits)
    check_target(target, student_logits, validate)
    check_positive("temperature", temperature)
    check_choice("target_loss", target_loss, NKD_TARGET_LOSSES)
    check_choice("non_target_loss", non_target_loss, NKD_NON_TARGET_LOSSES)
    with torch.no_grad():
        student, teacher = student_logits.detach(), teacher_logits.detach()
        target_column = target_class(target).unsqueeze(1)  # (N, 1)
        student_target, teacher_target = student.gather(1, target_column), teacher.gather(1, target_column)

        # Target part at temperature 1, from the non-target log-sum-exps (log-odds of the target class), so that
        # log S_t = -softplus(-odds) and log(1 - S_t) = -softplus(odds) stay exact when S_t saturates.
        student_masked, student_non_target, student_log_norm = non_target_softmax(student, target_column)
        _, teacher_non_target, teacher_log_norm = non_target_softmax(teacher, target_column)
        student_odds, teacher_odds = student_target - student_log_norm, teacher_target - teacher_log_norm
        loss_target, target_weight = target_part(student_odds, teacher_odds, target_loss)

        # The non-target part's gradient w.r.t. s is gamma * tau * (a N(S^tau) + b e_t - c N(T^tau)); at tau = 1
        # the target part's softmaxes serve it too.
        scale = gamma * temperature
        if non_target_loss == "none":
            non_target, b, c = 0.0, None, 0.0
            gradient = student_non_target.mul_(target_weight)
        elif temperature == 1.0:
            non_target, a, b, c = _non_target_part(
                non_target_loss, student_masked, student_log_norm, teacher_non_target, student_odds, teacher_odds
            )
            gradient = student_non_target.mul_(target_weight + scale * a)
        else:
            gradient = student_non_target.mul_(target_weight)
            student_masked, student_non_target, student_log_norm = non_target_softmax(
                student / temperature, target_column
            )
            _, teacher_non_target, teacher_log_norm = non_target_softmax(teacher / temperature, target_column)
            non_target, a, b, c = _non_target_part(
                non_target_loss,
                student_masked,
                student_log_norm,
                teacher_non_target,
                student_target / temperature - student_log_norm,
                teacher_target / temperature - teacher_log_norm,
            )
            if isinstance(a, float):
                gradient.add_(student_non_target, alpha=scale * a)
            else:
                gradient.addcmul_(student_non_target, a, value=scale)
        if isinstance(c, torch.Tensor):
            gradient.addcmul_(teacher_non_target, c, value=-scale)
        elif c:
            gradient.sub_(teacher_non_target, alpha=scale * c)
        gradient.scatter_add_(1, target_column, -target_weight if b is None else scale * b - target_weight)
        gradient.div_(student.shape[0])
        value = (loss_target + gamma * temperature**2 * non_target).mean()
    return with_gradient(student_logits, value, gradient)


class NKDLoss(LossModule):
    """Module form of :func:`nkd_loss`: ``NKDLoss(temperature=1.0, gamma=1.5)(student, teacher, target)``."""

    loss_fn = staticmethod(nkd_loss)
