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
    mask_columns,
    soft_cross_entropy,
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


def _soft_labels(
    student_log_probs: torch.Tensor, weak_logits: torch.Tensor, classes: torch.Tensor, values: torch.Tensor, rank: str
) -> USKDSoftLabels:
    """Soft labels from detached student log-probabilities (N, C) and weak logits (N, C)."""
    is_target = (values > 0).to(student_log_probs.dtype)  # (N, k)
    student_probs = student_log_probs.exp()

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
    order = scores.argsort(dim=1, descending=True)
    positions = torch.arange(1, scores.shape[1] + 1, dtype=scores.dtype, device=scores.device).expand_as(order)
    zipf = torch.empty_like(scores).scatter_(1, order, positions.reciprocal())
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
        return _soft_labels(F.log_softmax(student_logits, dim=1), weak_logits, classes, values, rank)


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
        Scalar, mean over the batch.
    """
    _check_uskd_inputs(student_logits, weak_logits, target, rank, validate)
    classes, values = _targets(target, student_logits.dtype)
    student_log_probs = F.log_softmax(student_logits, dim=1)
    soft = _soft_labels(student_log_probs.detach(), weak_logits.detach(), classes, values, rank)

    loss_target = -(soft.target_values * student_log_probs.gather(1, classes)).sum(dim=1).mean()
    loss_non_target = soft_cross_entropy(mask_columns(student_logits, classes), soft.non_target)
    loss_weak = mu * F.cross_entropy(weak_logits, target, label_smoothing=0.1)
    return alpha * loss_target + beta * loss_non_target + loss_weak


class USKDLoss(LossModule):
    """Module form of :func:`uskd_loss`: ``USKDLoss(alpha=1.0, beta=0.1, mu=0.005)(student, weak, target)``.

    The weak head is not part of this module (the caller owns it, see ``unikd.methods.uskd``).
    """

    loss_fn = staticmethod(uskd_loss)
