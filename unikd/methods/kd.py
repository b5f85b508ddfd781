"""Hinton et al. 2015, "Distilling the Knowledge in a Neural Network" (KD).

Defaults are mdistiller's CIFAR-100 setting (``mdistiller/engine/cfg.py``: ``KD.TEMPERATURE=4``,
``KD.LOSS.CE_WEIGHT=0.1``, ``KD.LOSS.KD_WEIGHT=0.9``); the KD term includes the usual T^2 factor. Hinton et al. give
no single weighting; set ``ce_weight=1, kd_weight=1`` (or others) for other protocols.
"""

from __future__ import annotations

import torch

from unikd.losses import kd_loss
from unikd.methods._ce_plus_term import CEPlusTerm
from unikd.methods.base import StudentOutput


class KD(CEPlusTerm):
    """``ce_weight * CE + kd_weight * T^2 KL(teacher_T || student_T)``."""

    name = "kd"
    needs_teacher = True
    term_name = "kd"

    def __init__(
        self,
        num_classes: int,
        feature_dim: int | None = None,
        *,
        temperature: float = 4.0,
        ce_weight: float = 0.1,
        kd_weight: float = 0.9,
    ) -> None:
        super().__init__(num_classes, feature_dim, ce_weight=ce_weight, term_weight=kd_weight)
        self.temperature = temperature

    def term(self, student: StudentOutput, target: torch.Tensor, teacher_logits: torch.Tensor | None) -> torch.Tensor:
        return kd_loss(student.logits, teacher_logits, temperature=self.temperature)
