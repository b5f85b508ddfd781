"""Plain cross-entropy training: the reference every method is compared against."""

from __future__ import annotations

import torch

from unikd.losses import cross_entropy
from unikd.methods.base import Method, StudentOutput


class Baseline(Method):
    """``loss_ce`` only (hard or mixup/cutmix probability targets)."""

    name = "baseline"

    def forward(
        self,
        student: StudentOutput,
        target: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        progress: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        return {"loss_ce": cross_entropy(student.logits, target)}
