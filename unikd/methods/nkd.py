"""Yang et al. 2023, "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach with
Normalized Loss and Customized Soft Labels" (ICCV 2023), NKD (Eq. 6).

Defaults are the paper's ImageNet setting: T=1, gamma=1.5, CE weight 1.
"""

from __future__ import annotations

import torch

from unikd.losses import nkd_loss
from unikd.methods._ce_plus_term import CEPlusTerm
from unikd.methods.base import StudentOutput


class NKD(CEPlusTerm):
    """``ce_weight * CE + L_NKD`` (target term plus gamma * T^2 normalised non-target KD)."""

    name = "nkd"
    needs_teacher = True
    term_name = "nkd"

    def __init__(
        self,
        num_classes: int,
        feature_dim: int | None = None,
        *,
        temperature: float = 1.0,
        gamma: float = 1.5,
        ce_weight: float = 1.0,
    ) -> None:
        super().__init__(num_classes, feature_dim, ce_weight=ce_weight)
        self.temperature = temperature
        self.gamma = gamma

    def term(self, student: StudentOutput, target: torch.Tensor, teacher_logits: torch.Tensor | None) -> torch.Tensor:
        return nkd_loss(student.logits, teacher_logits, target, temperature=self.temperature, gamma=self.gamma)
