"""Liang et al., "Efficient One Pass Self-distillation with Zipf's Label Smoothing" (ECCV 2022): Zipf's LS, the
dense-vote, hard-rank variant of the released code (``--dense --rank hard --distribution rank_zipf``)."""

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
    mask_columns,
    target_class,
)


def zipf_ls_distribution(dense_logits: torch.Tensor, target_column: torch.Tensor, *, power: float) -> torch.Tensor:
    """Zipf soft label over the non-target classes (N, C), zero at the target, rows summing to 1.

    Each of the L locations votes for its argmax class; classes are ranked by votes with ties sharing the smallest
    rank (scipy's ``rankdata(method="min")``, so all classes without a vote share one rank), and class i gets
    ``rank_i ** -power`` (paper Eq. 4-5).
    """
    n, _, c = dense_logits.shape
    votes = torch.zeros(n, c, dtype=dense_logits.dtype, device=dense_logits.device)
    votes.scatter_add_(1, dense_logits.argmax(dim=2), torch.ones_like(dense_logits[..., 0]))
    ascending = votes.sort(dim=1).values
    # rank_i = 1 + number of classes with strictly more votes.
    rank = 1 + c - torch.searchsorted(ascending, votes, right=True)
    zipf = rank.to(dense_logits.dtype).pow(-power).scatter(1, target_column, 0.0)
    return zipf / zipf.sum(dim=1, keepdim=True)


@full_precision
def zipf_ls_loss(
    student_logits: torch.Tensor,
    dense_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    power: float = 1.0,
    validate: bool | None = None,
) -> torch.Tensor:
    """KL(Zipf || softmax over the student's non-target logits), summed over classes, mean over the batch.

    The caller adds CE and weighs this term (``loss_lambda`` in the released code).

    Args:
        student_logits: (N, C) final logits.
        dense_logits: (N, L, C) the classifier applied at each of the L locations of the last feature map; only
            their argmax votes are used (no gradient).
        target: class indices (N,) or probabilities (N, C); probability rows use their argmax as the target.
        power: Zipf exponent (1.0 released default).
    """
    check_logits("student_logits", student_logits)
    check_target(target, student_logits, validate)
    check_positive("power", power)
    n, c = student_logits.shape
    if not isinstance(dense_logits, torch.Tensor) or dense_logits.dim() != 3:
        got = tuple(dense_logits.shape) if isinstance(dense_logits, torch.Tensor) else type(dense_logits).__name__
        raise ValueError(
            f"dense_logits: Zipf's LS needs per-location logits of the last feature map, shape (N, L, C) = ({n}, L, "
            f"{c}); got {got}. It does not apply to models without a spatial feature map of class scores (e.g. ViTs)"
        )
    if dense_logits.shape[0] != n or dense_logits.shape[2] != c:
        raise ValueError(f"dense_logits: shape {tuple(dense_logits.shape)} does not match student_logits ({n}, {c})")
    target_column = target_class(target).unsqueeze(1)
    zipf = zipf_ls_distribution(dense_logits.detach().to(student_logits.dtype), target_column, power=power)
    log_non_target = F.log_softmax(mask_columns(student_logits, target_column), dim=1)
    return -(zipf * log_non_target).sum(dim=1).mean() - entropy(zipf)


class ZipfLSLoss(LossModule):
    """Module form of :func:`zipf_ls_loss`: ``ZipfLSLoss(power=1.0)(logits, dense_logits, target)``."""

    loss_fn = staticmethod(zipf_ls_loss)
