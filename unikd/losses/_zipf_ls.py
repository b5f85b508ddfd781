"""Liang et al., "Efficient One Pass Self-distillation with Zipf's Label Smoothing" (ECCV 2022): Zipf's LS, the
dense-vote, hard-rank variant of the released code (``--dense --rank hard --distribution rank_zipf``), optionally with
its ``--upsample bilinear`` (the released CIFAR command)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from unikd.losses._common import (
    LossModule,
    check_choice,
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


ZIPF_UPSAMPLES = ("none", "bilinear")


def upsample_dense_logits(dense_logits: torch.Tensor) -> torch.Tensor:
    """Dense logits (N, H, W, C), or (N, L, C) of a square H = W map, upsampled 2x bilinearly: (N, 4 H W, C).

    The released code (``F.upsample(featmap, scale_factor=2., mode="bilinear")``, so ``align_corners=False``)
    upsamples the feature map before the linear classifier; bilinear weights sum to 1, so upsampling the classifier's
    per-location outputs is the same map (up to rounding), without the (N, D, 2H, 2W) feature copy.
    """
    if dense_logits.dim() == 3:
        n, locations, c = dense_logits.shape
        side = math.isqrt(locations)
        if side * side != locations:
            raise ValueError(
                f"dense_logits: upsample='bilinear' needs the map's height and width; {locations} locations are not a "
                "square map, so pass the dense logits as (N, H, W, C)"
            )
        dense_logits = dense_logits.reshape(n, side, side, c)
    grid = dense_logits.permute(0, 3, 1, 2)  # (N, C, H, W)
    upsampled = F.interpolate(grid, scale_factor=2.0, mode="bilinear", align_corners=False)
    return upsampled.flatten(2).transpose(1, 2)


@full_precision
def zipf_ls_loss(
    student_logits: torch.Tensor,
    dense_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    power: float = 1.0,
    upsample: str = "none",
    validate: bool | None = None,
) -> torch.Tensor:
    """KL(Zipf || softmax over the student's non-target logits), summed over classes, mean over the batch.

    The caller adds CE and weighs this term (``loss_lambda`` in the released code).

    Args:
        student_logits: (N, C) final logits.
        dense_logits: (N, L, C) the classifier applied at each of the L locations of the last feature map, or the
            same as a map (N, H, W, C); only their argmax votes are used (no gradient).
        target: class indices (N,) or probabilities (N, C); probability rows use their argmax as the target.
        power: Zipf exponent (1.0 released default).
        upsample: "none" (default), or "bilinear": the votes come from the map upsampled 2x bilinearly (4 L
            locations), the released ``--upsample bilinear`` (see :func:`upsample_dense_logits`; an (N, L, C) input
            must then be a square map).
    """
    check_logits("student_logits", student_logits)
    check_target(target, student_logits, validate)
    check_positive("power", power)
    check_choice("upsample", upsample, ZIPF_UPSAMPLES)
    n, c = student_logits.shape
    if not isinstance(dense_logits, torch.Tensor) or dense_logits.dim() not in (3, 4):
        got = tuple(dense_logits.shape) if isinstance(dense_logits, torch.Tensor) else type(dense_logits).__name__
        raise ValueError(
            f"dense_logits: Zipf's LS needs per-location logits of the last feature map, shape (N, L, C) = ({n}, L, "
            f"{c}); got {got}. It does not apply to models without a spatial feature map of class scores (e.g. ViTs)"
        )
    if dense_logits.shape[0] != n or dense_logits.shape[-1] != c:
        raise ValueError(f"dense_logits: shape {tuple(dense_logits.shape)} does not match student_logits ({n}, {c})")
    dense = dense_logits.detach().to(student_logits.dtype)
    if upsample == "bilinear":
        dense = upsample_dense_logits(dense)
    elif dense.dim() == 4:
        dense = dense.flatten(1, 2)
    target_column = target_class(target).unsqueeze(1)
    zipf = zipf_ls_distribution(dense, target_column, power=power)
    log_non_target = F.log_softmax(mask_columns(student_logits, target_column), dim=1)
    return -(zipf * log_non_target).sum(dim=1).mean() - entropy(zipf)


class ZipfLSLoss(LossModule):
    """Module form of :func:`zipf_ls_loss`: ``ZipfLSLoss(power=1.0)(logits, dense_logits, target)``."""

    loss_fn = staticmethod(zipf_ls_loss)
