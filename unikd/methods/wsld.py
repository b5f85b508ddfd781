"""Zhou et al. 2021, "Rethinking Soft Labels for Knowledge Distillation: A Bias-Variance Tradeoff Perspective"
(weighted soft label distillation, WSLD).

Defaults are the paper's ImageNet setting: T=2, alpha=2.5 (weight of the WSLD term), CE weight 1.
"""

from __future__ import annotations

import torch

from unikd.losses import wsld_loss
from unikd.methods._ce_plus_term import CEPlusTerm
from unikd.methods.base import StudentOutput


class WSLD(CEPlusTerm):
    """``ce_weight * CE + alpha * L_WSLD``."""

    name = "wsld"
    needs_teacher = True
    term_name = "wsld"

    def __init__(
        self,
        num_classes: int,
        feature_dim: int | None = None,
        *,
        temperature: float = 2.0,
        alpha: float = 2.5,
        ce_weight: float = 1.0,
    ) -> None:
        super().__init__(num_classes, feature_dim, ce_weight=ce_weight, term_weight=alpha)
        self.temperature = temperature

    def term(self, student: StudentOutput, target: torch.Tensor, teacher_logits: torch.Tensor | None) -> torch.Tensor:
        return wsld_loss(student.logits, teacher_logits, target, temperature=self.temperature)
