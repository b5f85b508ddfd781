"""Yang et al., "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach with Normalized Loss
and Customized Soft Labels" (ICCV 2023), Section 4: Universal Self-Knowledge Distillation (USKD), Eqs. 6-13, with
the ablation variants of its Tables 6, 8, 9, 12 and 15.

USKD needs no teacher. It builds two soft labels from the student itself:
  * the soft target value: the squared target probability, smoothed over the batch: ``S_t^2 + V_t - mean(S_t^2)``;
  * a Zipf distribution over the non-target classes: class i gets ``1 / rank_i``, ranked by Eq. 10 from the
    student's probabilities and those of a weak linear head on an intermediate feature (Eq. 8), then renormalised
    over the non-target classes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from unikd.losses._common import (
    LossModule,
    check_choice,
    check_logits,
    check_target,
    full_precision,
    non_target_softmax,
    row_dot,
    with_gradient,
)
from unikd.losses._nkd import NKD_TARGET_LOSSES

# Table 9 (and the released code's variant).
USKD_RANKS = ("paper", "released", "weak", "final", "sum")
# Table 12 (with / without the square), Table 8 (without the square; a trained model's T_t), Table 15 (S2, EMA).
USKD_TARGET_SOFT_LABELS = ("squared", "unsquared", "softmax", "sqrt", "max", "mean", "teacher", "ema")
# Table 15: the target part, as NKD's (Table 14).
USKD_TARGET_LOSSES = NKD_TARGET_LOSSES
# Soft target values read from another model's logits (``teacher_logits``), not from the student.
MODEL_SOFT_LABELS = ("teacher", "ema")
# Guard of the released code against 1 - W_t = 0 in the rank denominators; kept in both normalised rank modes.
_RANK_EPS = 1e-6


class USKDSoftLabels(NamedTuple):
    """The soft labels USKD teaches the student (paper Fig. 3); detached.

    target_classes: (N, k) long, the target classes (k = 1 for index targets, 2 for probability targets).
    target_values: (N, k) soft target value of each target class (zero where the label value is zero).
    non_target: (N, C) Zipf distribution over the non-target classes: zero at the targets, rows sum to 1 (or 0 when
        every class is a target, C = 2 with two targets).
    """

    target_classes: torch.Tensor
    target_values: torch.Tensor
    non_target: torch.Tensor


def _targets(target: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Target classes (N, k) and label values (N, k): the index itself with value 1, or the two largest entries.

    A probability row with a single non-zero entry repeats its first class as the second target (value 0), so that
    no arbitrary zero-valued class is treated as a target (the released code would mask one).
    """
    if target.dim() == 1:
        classes = target.unsqueeze(1)
        return classes, torch.ones(classes.shape, dtype=dtype, device=target.device)
    values, classes = target.topk(2, dim=1)
    classes = torch.where(values > 0, classes, classes[:, :1])
    return classes, values.to(dtype)


def _descending_order(scores: torch.Tensor) -> torch.Tensor:
    """Column indices (N, C) that sort each row of ``scores`` in descending order, ties by the lower index.

    On the CPU in float32, each score and its column index are packed into one int64 key (the float's bits mapped to
    a monotone integer, negated, in the high half; the index in the low half) and sorted with numpy, whose SIMD sort
    of plain integers is several times faster than torch's CPU sort with indices. Elsewhere: a stable torch sort.
    """
    if scores.device.type != "cpu" or scores.dtype != torch.float32:
        return scores.argsort(dim=1, descending=True, stable=True)
    bits = (scores + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0, which the float order ties with it
    monotone = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # orders like the floats (no NaN here: scores are finite)
    keys = (monotone.to(torch.int64).neg_() << 32) | torch.arange(scores.shape[1], dtype=torch.int64)
    keys = keys.numpy()
    keys.sort(axis=1)
    return torch.from_numpy(keys & 0xFFFFFFFF)


def _smoothed(probs: torch.Tensor, values: torch.Tensor, kind: str) -> torch.Tensor:
    """The soft target values of one batch (or group) of rows from S_t (n, k) and the label values V_t (n, k)."""
    if kind == "squared":
        squared = probs**2
        return squared + values - squared.mean(dim=0, keepdim=True)
    if kind == "unsquared":
        return probs + values - probs.mean(dim=0, keepdim=True)
    if kind == "softmax":
        return probs.softmax(dim=0) * values.sum(dim=0, keepdim=True)
    if kind == "sqrt":
        return (probs - probs.amin(dim=0, keepdim=True)).sqrt() * values
    if kind == "max":
        return probs / probs.amax(dim=0, keepdim=True) * values
    return probs / probs.mean(dim=0, keepdim=True) * values  # "mean"


def _soft_target_values(
    student_probs: torch.Tensor,
    classes: torch.Tensor,
    values: torch.Tensor,
    is_target: torch.Tensor,
    kind: str,
    group: int,
    teacher_logits: torch.Tensor | None,
) -> torch.Tensor:
    """Soft target value of each target column (N, k), zero where the label value is zero (as released).

    The batch statistics (mean, min, max, softmax, sum over rows) run over groups of ``group`` consecutive rows
    (0: the whole batch; a shorter last group takes the remaining rows).
    """
    if kind in MODEL_SOFT_LABELS:
        return F.softmax(teacher_logits, dim=1).gather(1, classes) * values * is_target
    target_probs = student_probs.gather(1, classes)
    if group == 0 or group >= target_probs.shape[0]:
        smoothed = _smoothed(target_probs, values, kind)
    else:
        pieces = zip(target_probs.split(group), values.split(group), strict=True)
        smoothed = torch.cat([_smoothed(probs, group_values, kind) for probs, group_values in pieces])
    return smoothed * is_target


def _rank_scores(
    student_probs: torch.Tensor,
    student_log_probs: torch.Tensor,
    weak_probs: torch.Tensor | None,
    classes: torch.Tensor,
    is_target: torch.Tensor,
    rank: str,
) -> torch.Tensor:
    """Scores R (N, C) whose descending order ranks the classes (see ``rank`` in :func:`uskd_loss`)."""
    if rank == "weak":
        return weak_probs
    if rank == "final":
        return student_probs
    if rank == "sum":
        return weak_probs + student_probs
    student_term = student_probs if rank == "paper" else student_log_probs
    weak_target_mass = (weak_probs.gather(1, classes) * is_target).sum(dim=1, keepdim=True)
    student_target_mass = (student_term.gather(1, classes) * is_target).sum(dim=1, keepdim=True)
    return weak_probs / (1 - weak_target_mass + _RANK_EPS) + student_term / (1 - student_target_mass + _RANK_EPS)


def _zipf_non_target(scores: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Zipf over all C classes ranked by ``scores`` (one sort), renormalised over the non-target classes (N, C)."""
    order = _descending_order(scores)
    zipf_table = torch.arange(1, scores.shape[1] + 1, dtype=scores.dtype, device=scores.device).reciprocal_()
    zipf = torch.empty_like(scores).scatter_(1, order, zipf_table.expand_as(scores))
    zipf = zipf.scatter(1, classes, 0.0)
    # A row whose classes are all targets (C = 2, two targets) has no non-target class: an all-zero row, so L_non = 0.
    zipf_mass = zipf.sum(dim=1, keepdim=True).clamp_min(torch.finfo(zipf.dtype).tiny)
    return zipf / zipf_mass


def _zipf_soft_labels(student_probs, student_log_probs, weak_logits, classes, is_target, rank) -> torch.Tensor:
    weak_probs = None if rank == "final" else F.softmax(weak_logits, dim=1)
    scores = _rank_scores(student_probs, student_log_probs, weak_probs, classes, is_target, rank)
    return _zipf_non_target(scores, classes)


def _target_term(
    student: torch.Tensor,
    log_probs: torch.Tensor,
    probs: torch.Tensor,
    classes: torch.Tensor,
    is_target: torch.Tensor,
    soft_target: torch.Tensor,
    target_loss: str,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha * the target part (N, 1) and its gradient (N, C) w.r.t. the logits; uses up ``probs``.

    T1 = -sum_k P_k log S_k has gradient sum_k P_k (S - e_k); T2 = -sum_k (1 - P_k) log(1 - S_k) (target columns
    with a non-zero label only) has gradient sum_k (1 - P_k) S_k (e_k - N_k(S)), N_k the softmax without class k.
    """
    loss = 0.0
    if target_loss in ("t1", "t1+t2"):
        loss = -(soft_target * log_probs.gather(1, classes)).sum(dim=1, keepdim=True)
        gradient = probs.mul_(alpha * soft_target.sum(dim=1, keepdim=True))
        gradient.scatter_add_(1, classes, -alpha * soft_target)
    else:
        gradient = probs.zero_()
    if target_loss in ("t2", "t1+t2"):
        rest_weights = (1 - soft_target) * is_target
        for k in range(classes.shape[1]):
            column = classes[:, k : k + 1]
            _, without_k, log_norm = non_target_softmax(student, column)
            odds = student.gather(1, column) - log_norm  # log(S_k / (1 - S_k))
            loss = loss + rest_weights[:, k : k + 1] * F.softplus(odds)  # -(1 - P_k) log(1 - S_k)
            weight = alpha * rest_weights[:, k : k + 1] * torch.sigmoid(odds)
            gradient.addcmul_(without_k, weight, value=-1.0).scatter_add_(1, column, weight)
    return alpha * loss, gradient


def _check_uskd_inputs(
    student_logits, weak_logits, target, teacher_logits, rank, target_soft_label, batch_mean_group, validate, *, needs
) -> None:
    check_logits("student_logits", student_logits)
    check_choice("rank", rank, USKD_RANKS)
    check_choice("target_soft_label", target_soft_label, USKD_TARGET_SOFT_LABELS)
    if needs["weak"]:
        if weak_logits is None:
            raise ValueError(
                "weak_logits: needed for the rank (beta > 0 with rank other than 'final') and for L_weak (mu > 0); "
                "pass the weak head's logits (N, C)"
            )
        check_logits("weak_logits", weak_logits, like=student_logits)
    check_target(target, student_logits, validate)
    if isinstance(batch_mean_group, bool) or not isinstance(batch_mean_group, int) or batch_mean_group < 0:
        raise ValueError(f"batch_mean_group: must be an integer >= 0 (0: the whole batch), got {batch_mean_group!r}")
    if target_soft_label in MODEL_SOFT_LABELS:
        if teacher_logits is None:
            raise ValueError(
                f"teacher_logits: target_soft_label={target_soft_label!r} reads the target probability of another "
                "model; pass its logits (N, C) (a trained teacher, or the EMA copy of the student)"
            )
        check_logits("teacher_logits", teacher_logits, like=student_logits)
    elif teacher_logits is not None:
        raise ValueError(
            f"teacher_logits: only used with target_soft_label 'teacher' or 'ema', not {target_soft_label!r}; "
            "drop them or choose one of those"
        )


@full_precision
def uskd_soft_labels(
    student_logits: torch.Tensor,
    weak_logits: torch.Tensor | None,
    target: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    rank: str = "paper",
    target_soft_label: str = "squared",
    batch_mean_group: int = 0,
    validate: bool | None = None,
) -> USKDSoftLabels:
    """The soft target values and the Zipf non-target distribution USKD would train on, for inspection/plots.

    The soft target uses batch statistics, so pass the whole batch. Arguments as in :func:`uskd_loss`.
    """
    needs = {"weak": rank != "final"}
    _check_uskd_inputs(
        student_logits,
        weak_logits,
        target,
        teacher_logits,
        rank,
        target_soft_label,
        batch_mean_group,
        validate,
        needs=needs,
    )
    with torch.no_grad():
        classes, values = _targets(target, student_logits.dtype)
        is_target = (values > 0).to(student_logits.dtype)
        log_probs = F.log_softmax(student_logits, dim=1)
        probs = log_probs.exp()
        teacher = None if teacher_logits is None else teacher_logits.detach()
        soft_target = _soft_target_values(
            probs, classes, values, is_target, target_soft_label, batch_mean_group, teacher
        )
        weak = None if weak_logits is None else weak_logits.detach()
        non_target = _zipf_soft_labels(probs, log_probs, weak, classes, is_target, rank)
        return USKDSoftLabels(classes, soft_target, non_target)


@full_precision
def uskd_loss(
    student_logits: torch.Tensor,
    weak_logits: torch.Tensor | None,
    target: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    alpha: float = 1.0,
    beta: float = 0.1,
    mu: float = 0.005,
    rank: str = "paper",
    target_soft_label: str = "squared",
    target_loss: str = "t1",
    batch_mean_group: int = 0,
    validate: bool | None = None,
) -> torch.Tensor:
    """USKD without the plain CE term (the caller adds it, Eq. 13): ``alpha * L_target + beta * L_non + L_weak``.

        L_target = -sum_t P_t log S_t (Eq. 7), with the soft target value P_t (detached); by default (Eq. 6)
                   P_t = S_t^2 + V_t - mean_batch(S_t^2), V_t the label value;
        L_non    = -sum_{i not target} Z_i log N(S_i), the Zipf soft label Z_i proportional to 1 / rank_i, renormalised
                   over the non-target classes, against the student's softmax over the non-target logits (Eq. 11-12);
        L_weak   = mu * CE(weak_logits, 0.9 * y + 0.1 / C), which trains the weak head (and, through the feature, the
                   backbone), Eq. 9.
    Defaults are the paper's ImageNet setting (CIFAR-100: alpha=0.1, beta=0.1, mu=0.1). A zero ``alpha`` or ``beta``
    (Table 6: non-target-only / target-only USKD) skips that part's soft labels entirely (no soft target values;
    no rank, sort or non-target softmax); a zero ``mu`` skips L_weak, and ``weak_logits`` may then be None when the
    rank does not read them either.

    ``rank`` (Table 9) orders the classes for the Zipf label, with W, S the weak head's and the student's
    probabilities and t the target:
        "paper":    R_i = W_i / (1 - W_t) + S_i / (1 - S_t)              (Eq. 10, normalisation; default)
        "released": R_i = W_i / (1 - W_t) + log S_i / (1 - log S_t)      (the authors' code today: its student term
                    uses log-probabilities, so the student's own rank dominates and the weak head mostly breaks ties.
                    The first release (March 2023; yzd-v/cls_KD commit 87a7197, mmcls/distillation/losses/uskd.py)
                    ranked with probabilities like Eq. 10; the log-probability rank came with a later refactor to
                    log_softmax (commit 1c2c0ff, kept in the mmcls 1.x port mmcls/models/dis_losses/uskd.py).)
        "weak":     R_i = W_i                                            (weak logit only; logits rank alike)
        "final":    R_i = S_i                                            (final logit only)
        "sum":      R_i = W_i + S_i                                      (combination without normalisation)
    Both normalised modes add the released code's 1e-6 to the denominators. Ties rank by the lower class index.

    ``target_soft_label`` is P_t, per target column over the batch (``batch_mean_group`` rows at a time):
        "squared":   S_t^2 + V_t - mean(S_t^2)         (Eq. 6, default; Table 12 "with square")
        "unsquared": S_t + V_t - mean(S_t)             (Table 12 "without square"; Table 8's smoothing of choice)
        "softmax":   softmax(S_t) * sum(V_t)           (Table 8; softmax and sum over the batch rows)
        "sqrt":      sqrt(S_t - min(S_t))              (Table 8)
        "max":       S_t / max(S_t)                    (Table 8)
        "mean":      S_t / mean(S_t)                   (Table 8)
        "teacher":   T_t = softmax(teacher_logits)_t   (Table 8: a trained model's target probability)
        "ema":       the same formula; the logits come from an EMA copy of the student's weights (Table 15, S2)
    The paper states the Table 8 rules for hard labels (V_t = 1); for probability targets the rules without V_t are
    multiplied by V_t, "teacher"/"ema" too. Every rule is zero where V_t is zero, as the released code does.

    ``target_loss`` (Table 15) is the target part, as in :func:`unikd.losses.nkd_loss`:
        "t1":    -sum_t P_t log S_t                     (default)
        "t2":    -sum_t (1 - P_t) log(1 - S_t)          (over the target columns with V_t > 0)
        "t1+t2": both (DKD's binary form)
    P_t can exceed 1 (Eq. 6 adds V_t), so 1 - P_t can be negative: "t2" then pushes S_t up, as its formula says.

    Args:
        student_logits: (N, C) final logits.
        weak_logits: (N, C) output of the weak linear head on the intermediate feature (Eq. 8); the caller owns the
            head. Used for the rank without gradient and for L_weak with gradient; None when neither needs them.
        target: class indices (N,), or probabilities (N, C) whose two largest entries are two targets, each with its
            own soft target value, as in the released code.
        teacher_logits: (N, C) the logits of the model whose target probability is the soft target
            (``target_soft_label`` "teacher" or "ema" only); no gradient reaches them.
        alpha, beta, mu: weights of L_target, L_non and L_weak (>= 0).
        rank, target_soft_label, target_loss: see above.
        batch_mean_group: rows per batch statistic of the soft target value; 0 (default) is the whole batch (per
            process under DDP, as released). With the paper's 16 images per GPU, ``batch_mean_group=16`` on one
            device with batch 128 gives each group of 16 the statistics it had on its own GPU.
        validate: check target values; None: only when on the CPU (no device sync).

    Returns:
        Scalar, mean over the batch. The student's gradient is computed in closed form (no double backward); the
        weak head's goes through autograd.
    """
    needs = {"weak": mu != 0 or (beta != 0 and rank != "final")}
    _check_uskd_inputs(
        student_logits,
        weak_logits,
        target,
        teacher_logits,
        rank,
        target_soft_label,
        batch_mean_group,
        validate,
        needs=needs,
    )
    check_choice("target_loss", target_loss, USKD_TARGET_LOSSES)
    with torch.no_grad():
        student = student_logits.detach()
        classes, values = _targets(target, student.dtype)
        is_target = (values > 0).to(student.dtype)
        log_probs = F.log_softmax(student, dim=1)
        probs = log_probs.exp()
        per_sample, gradient = 0.0, None
        if beta != 0:  # soft labels first: the target term below uses up ``probs``
            weak = None if weak_logits is None else weak_logits.detach()
            zipf = _zipf_soft_labels(probs, log_probs, weak, classes, is_target, rank)
        if alpha != 0:
            teacher = None if teacher_logits is None else teacher_logits.detach()
            soft_target = _soft_target_values(
                probs, classes, values, is_target, target_soft_label, batch_mean_group, teacher
            )
            per_sample, gradient = _target_term(
                student, log_probs, probs, classes, is_target, soft_target, target_loss, alpha
            )
        if beta != 0:
            masked, non_target_probs, log_norm = non_target_softmax(student, classes)
            zipf_mass = zipf.sum(dim=1, keepdim=True)  # 1, or 0 when every class is a target
            # -sum_i Z_i log N(S)_i = mass * lse_nt - Z . s, with Z zero at the targets; d/ds = mass * N(S) - Z.
            per_sample = per_sample + beta * (zipf_mass * log_norm - row_dot(zipf, masked))
            non_target_gradient = non_target_probs.mul_(beta * zipf_mass)
            gradient = non_target_gradient if gradient is None else gradient.add_(non_target_gradient)
            gradient.sub_(zipf, alpha=beta)
        if gradient is None:  # alpha = beta = 0: only L_weak
            per_sample, gradient = student.new_zeros(()), torch.zeros_like(student)
        value = per_sample.mean()
        gradient.div_(student.shape[0])
    student_term = with_gradient(student_logits, value, gradient)
    if mu == 0:
        return student_term
    return student_term + mu * F.cross_entropy(weak_logits, target, label_smoothing=0.1)


class USKDLoss(LossModule):
    """Module form of :func:`uskd_loss`: ``USKDLoss(alpha=1.0, beta=0.1, mu=0.005)(student, weak, target)``.

    The weak head is not part of this module (the caller owns it, see ``unikd.methods.uskd``).
    """

    loss_fn = staticmethod(uskd_loss)
