"""Zhao et al. 2022, "Decoupled Knowledge Distillation" (DKD).

Defaults are the paper's CIFAR-100 setting as in mdistiller's ``engine/cfg.py``: T=4, alpha=1 (TCKD), beta=8
(NCKD), CE weight 1, and a linear warm-up of the DKD term over the first 20 epochs. The weight is
``min(progress / warmup, 1)`` with ``progress`` the fractional epoch count (0 at the first step); mdistiller uses
the same formula with the 1-based integer epoch, a staircase one epoch ahead of this ramp.
"""

from __future__ import annotations

import torch

from unikd.losses import dkd_loss
from unikd.methods._ce_plus_term import CEPlusTerm
from unikd.methods.base import StudentOutput


class DKD(CEPlusTerm):
    """``ce_weight * CE + min(progress / warmup, 1) * (alpha * TCKD + beta * NCKD)``."""

    name = "dkd"
    needs_teacher = True
    term_name = "dkd"

    def __init__(
        self,
        num_classes: int,
        feature_dim: int | None = None,
        *,
        temperature: float = 4.0,
        alpha: float = 1.0,
        beta: float = 8.0,
        ce_weight: float = 1.0,
        warmup: float = 20.0,
    ) -> None:
        super().__init__(num_classes, feature_dim, ce_weight=ce_weight)
        self.temperature = temperature
        self.alpha = alpha
        self.beta = beta
        self.warmup = warmup

    def schedule(self, progress: float) -> float:
        return min(progress / self.warmup, 1.0) if self.warmup > 0 else 1.0

    def term(self, student: StudentOutput, target: torch.Tensor, teacher_logits: torch.Tensor | None) -> torch.Tensor:
        return dkd_loss(
            student.logits, teacher_logits, target, temperature=self.temperature, alpha=self.alpha, beta=self.beta
        )
