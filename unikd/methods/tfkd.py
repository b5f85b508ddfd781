"""Yuan et al. 2020, "Revisiting Knowledge Distillation via Label Smoothing Regularization", Tf-KD_reg
(the manually designed teacher).

The released code (``my_loss_function.loss_kd_regularization``) computes

    (1 - alpha) * CE + alpha * multiplier * nn.KLDivLoss()(log_softmax(s), softmax(u / T))

where ``nn.KLDivLoss()`` averages over all N * C elements. ``unikd.losses.tfkd_loss`` is the same KL summed over
classes and averaged over the batch, so the released weight of the KL term is ``alpha * multiplier / C`` times
``tfkd_loss``. The hyper-parameters here are the released ones, with the defaults of its CIFAR-100 ResNet18
config (``experiments/base_experiments/base_resnet18/params.json``: reg_alpha=0.1, reg_temperature=20,
multiplier=100; correct_prob=0.99 is hard-coded there), which for C=100 gives a ``tfkd_loss`` weight of 0.1.
"""

from __future__ import annotations

import torch

from unikd.losses import tfkd_loss
from unikd.methods._ce_plus_term import CEPlusTerm
from unikd.methods.base import StudentOutput


class TfKD(CEPlusTerm):
    """``(1 - alpha) * CE + (alpha * multiplier / C) * tfkd_loss``."""

    name = "tfkd"
    term_name = "tfkd"

    def __init__(
        self,
        num_classes: int,
        feature_dim: int | None = None,
        *,
        alpha: float = 0.1,
        multiplier: float = 100.0,
        temperature: float = 20.0,
        correct_prob: float = 0.99,
    ) -> None:
        super().__init__(num_classes, feature_dim, ce_weight=1.0 - alpha, term_weight=alpha * multiplier / num_classes)
        self.temperature = temperature
        self.correct_prob = correct_prob

    def term(self, student: StudentOutput, target: torch.Tensor, teacher_logits: torch.Tensor | None) -> torch.Tensor:
        return tfkd_loss(student.logits, target, temperature=self.temperature, correct_prob=self.correct_prob)
