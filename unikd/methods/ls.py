"""Label smoothing (Szegedy et al. 2016): cross-entropy against ``(1 - smoothing) * target + smoothing / C``."""

from __future__ import annotations

import torch

from unikd.losses import label_smoothing_loss
from unikd.methods.base import Method, StudentOutput


class LabelSmoothing(Method):
    """``loss_ls``, the smoothed cross-entropy, which replaces the plain CE term."""

    name = "ls"

    def __init__(self, num_classes: int, feature_dim: int | None = None, *, smoothing: float = 0.1) -> None:
        super().__init__(num_classes, feature_dim)
        self.smoothing = smoothing

    def forward(
        self,
        student: StudentOutput,
        target: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        progress: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        return {"loss_ls": label_smoothing_loss(student.logits, target, smoothing=self.smoothing)}
