"""Yang et al., "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach with Normalized Loss
and Customized Soft Labels" (ICCV 2023), Section 4: Universal Self-Knowledge Distillation (USKD), Eqs. 6-13.

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

USKD_RANKS = ("paper", "released")
# Guard of the released code against 1 - W_t = 0 in the rank denominators; kept in both rank modes.
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


def _soft_labels(
    student_probs: torch.Tensor,
    student_log_probs: torch.Tensor,
    weak_logits: torch.Tensor,
    classes: torch.Tensor,
    values: torch.Tensor,
    rank: str,
) -> USKDSoftLabels:
    """Soft labels from the detached student's probabilities and log-probabilities (N, C) and weak logits (N, C)."""
    is_target = (values > 0).to(student_probs.dtype)  # (N, k)

    # Soft target value: S_t^2 + V_t - batch mean of S_t^2 (per target column), zero where V_t = 0.
    squared_target_probs = student_probs.gather(1, classes) ** 2
    target_values = (squared_target_probs + values - squared_target_probs.mean(dim=0, keepdim=True)) * is_target

    # Rank, Eq. 10: R_i = W_i / (1 - W_t) + S_i / (1 - S_t). The released code uses log S in the student term.
    weak_probs = F.softmax(weak_logits, dim=1)
    student_term = student_probs if rank == "paper" else student_log_probs
    weak_target_mass = (weak_probs.gather(1, classes) * is_target).sum(dim=1, keepdim=True)
    student_target_mass = (student_term.gather(1, classes) * is_target).sum(dim=1, keepdim=True)
    scores = weak_probs / (1 - weak_target_mass + _RANK_EPS) + student_term / (1 - student_target_mass + _RANK_EPS)

    # Zipf over all C classes (one sort), then renormalised over the non-target classes.
    order = _descending_order(scores)
    zipf_table = torch.arange(1, scores.shape[1] + 1, dtype=scores.dtype, device=scores.device).reciprocal_()
    zipf = torch.empty_like(scores).scatter_(1, order, zipf_table.expand_as(scores))
    zipf = zipf.scatter(1, classes, 0.0)
    # A row whose classes are all targets (C = 2, two targets) has no non-target class: an all-zero row, so L_non = 0.
    zipf_mass = zipf.sum(dim=1, keepdim=True).clamp_min(torch.finfo(zipf.dtype).tiny)
    return USKDSoftLabels(classes, target_values, zipf / zipf_mass)


def _check_uskd_inputs(student_logits, weak_logits, target, rank, validate) -> None:
    check_logits("student_logits", student_logits)
    check_logits("weak_logits", weak_logits, like=student_logits)
    check_target(target, student_logits, validate)
    check_choice("rank", rank, USKD_RANKS)


@full_precision
def uskd_soft_labels(
    student_logits: torch.Tensor,
    weak_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    rank: str = "paper",
    validate: bool | None = None,
) -> USKDSoftLabels:
    """The soft target values and the Zipf non-target distribution USKD would train on, for inspection/plots.

    The soft target uses the batch mean of S_t^2, so pass the whole batch. Arguments as in :func:`uskd_loss`.
    """
    _check_uskd_inputs(student_logits, weak_logits, target, rank, validate)
    with torch.no_grad():
        classes, values = _targets(target, student_logits.dtype)
        log_probs = F.log_softmax(student_logits, dim=1)
        return _soft_labels(log_probs.exp(), log_probs, weak_logits, classes, values, rank)


@full_precision
def uskd_loss(
    student_logits: torch.Tensor,
    weak_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 0.1,
    mu: float = 0.005,
    rank: str = "paper",
    validate: bool | None = None,
) -> torch.Tensor:
    """USKD without the plain CE term: ``alpha * L_target + beta * L_non + L_weak``.

    L_target = -sum_t T_t log S_t with the soft target value T_t (detached);
    L_non = -sum_{i not target} Z_i log N(S_i), the Zipf soft label Z against the student's softmax over the
    non-target logits; L_weak = mu * CE(weak_logits, 0.9 * y + 0.1 / C), which trains the weak head (and, through the
    feature, the backbone). Defaults are the paper's ImageNet setting (CIFAR-100: alpha=0.1, beta=0.1, mu=0.1).

    Args:
        student_logits: (N, C) final logits.
        weak_logits: (N, C) output of the weak linear head on the intermediate feature (Eq. 8); the caller owns the
            head. Used for the rank without gradient and for L_weak with gradient.
        target: class indices (N,), or probabilities (N, C) whose two largest entries are two targets, each with its
            own soft target value, as in the released code.
        rank: "paper" (Eq. 10 with probabilities) or "released" (the authors' code: log-probabilities in the student
            term, so the student's own rank dominates and the weak head mostly breaks ties).
        validate: check target values; None: only when on the CPU (no device sync).

    Returns:
        Scalar, mean over the batch. The student's gradient is computed in closed form (no double backward); the
        weak head's goes through autograd.
    """
    _check_uskd_inputs(student_logits, weak_logits, target, rank, validate)
    with torch.no_grad():
        student = student_logits.detach()
        classes, values = _targets(target, student.dtype)
        log_probs = F.log_softmax(student, dim=1)
        probs = log_probs.exp()
        soft = _soft_labels(probs, log_probs, weak_logits.detach(), classes, values, rank)
        masked, non_target_probs, log_norm = non_target_softmax(student, classes)
        zipf_mass = soft.non_target.sum(dim=1, keepdim=True)  # 1, or 0 when every class is a target

        loss_target = -(soft.target_values * log_probs.gather(1, classes)).sum(dim=1, keepdim=True)
        # -sum_i Z_i log N(S)_i = mass * lse_nt - Z . s, with Z zero at the targets.
        loss_non_target = zipf_mass * log_norm - row_dot(soft.non_target, masked)
        value = (alpha * loss_target + beta * loss_non_target).mean()

        # d/ds: alpha * (sum_k T_k S - sum_k T_k e_k) + beta * (mass * N(S) - Z).
        gradient = probs.mul_(alpha * soft.target_values.sum(dim=1, keepdim=True))
        gradient.scatter_add_(1, classes, -alpha * soft.target_values)
        gradient.add_(non_target_probs.mul_(beta * zipf_mass)).sub_(soft.non_target, alpha=beta)
        gradient.div_(student.shape[0])
    loss_weak = mu * F.cross_entropy(weak_logits, target, label_smoothing=0.1)
    return with_gradient(student_logits, value, gradient) + loss_weak


class USKDLoss(LossModule):
    """Module form of :func:`uskd_loss`: ``USKDLoss(alpha=1.0, beta=0.1, mu=0.005)(student, weak, target)``.

    The weak head is not part of this module (the caller owns it, see ``unikd.methods.uskd``).
    """

    loss_fn = staticmethod(uskd_loss)
