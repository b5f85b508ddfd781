"""Liang et al. 2022, "Efficient One Pass Self-distillation with Zipf's Label Smoothing" (ECCV 2022).

The student's classifier is applied at every location of its last feature map (``dense_logits``); their votes rank
the classes and the non-target classes get a Zipf (1 / rank^power) distribution that the student's non-target
softmax is pulled towards. Default ``loss_lambda=0.1`` and ``power=1`` are the released CIFAR-100 command
(megvii-research/zipfls README: ``--loss_lambda 0.1 --dense``); the total is ``CE + loss_lambda * L_zipf``.
``upsample="bilinear"`` is the released ``--upsample bilinear`` of that command: the votes come from the map
upsampled 2x (``align_corners=False``), which equals upsampling the feature map before the linear classifier.
"""

from __future__ import annotations

from typing import Literal

import torch

from unikd.losses import zipf_ls_loss
from unikd.methods._ce_plus_term import CEPlusTerm
from unikd.methods.base import StudentOutput


class ZipfLS(CEPlusTerm):
    """``CE + loss_lambda * KL(zipf || student non-target softmax)``."""

    name = "zipf_ls"
    student_output = "dense_logits"
    term_name = "zipf"

    def __init__(
        self,
        num_classes: int,
        feature_dim: int | None = None,
        *,
        loss_lambda: float = 0.1,
        power: float = 1.0,
        upsample: Literal["none", "bilinear"] = "none",
    ) -> None:
        super().__init__(num_classes, feature_dim, term_weight=loss_lambda)
        self.power = power
        self.upsample = upsample

    def term(self, student: StudentOutput, target: torch.Tensor, teacher_logits: torch.Tensor | None) -> torch.Tensor:
        return zipf_ls_loss(student.logits, student.dense_logits, target, power=self.power, upsample=self.upsample)
