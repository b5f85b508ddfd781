"""Yang et al. 2023, "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach with
Normalized Loss and Customized Soft Labels" (ICCV 2023), NKD: ``L = CE + L_NKD`` (Eq. 5, L_NKD of Eq. 4).

Defaults are the paper's ImageNet setting: T=1, gamma=1.5, CE weight 1. ``target_loss`` and ``non_target_loss``
select the ablation variants of the paper's Table 14 (target part T1, T2 or T1 + T2) and Table 5 (normalised,
KD's un-normalised, or no non-target part); see ``unikd.losses.nkd_loss``.
"""

from __future__ import annotations

from typing import Literal

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
        target_loss: Literal["t1", "t2", "t1+t2"] = "t1",
        non_target_loss: Literal["normalized", "kd", "none"] = "normalized",
    ) -> None:
        super().__init__(num_classes, feature_dim, ce_weight=ce_weight)
        self.temperature = temperature
        self.gamma = gamma
        self.target_loss = target_loss
        self.non_target_loss = non_target_loss

    def term(self, student: StudentOutput, target: torch.Tensor, teacher_logits: torch.Tensor | None) -> torch.Tensor:
        return nkd_loss(
            student.logits,
            teacher_logits,
            target,
            temperature=self.temperature,
            gamma=self.gamma,
            target_loss=self.target_loss,
            non_target_loss=self.non_target_loss,
        )
