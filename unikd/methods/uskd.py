"""Yang et al. 2023 (ICCV), USKD: universal self-knowledge distillation with customized soft labels (Eq. 7-11).

The student teaches itself: its target soft label comes from its own target probability (Eq. 7) and its
non-target soft labels from a Zipf distribution ranked by a weak head on an intermediate feature (Eq. 8-10). The
method owns that weak head, ``nn.Linear(feature_dim, num_classes)``, so it is trained and checkpointed with the
student (``ckpt["method"]``).

Defaults are the paper's ImageNet setting (alpha=1, beta=0.1, mu=0.005); the released CIFAR-100 configs use
alpha=0.1, beta=0.1, mu=0.1. ``rank`` chooses how non-target classes are ranked: ``"paper"`` (Eq. 10, on
probabilities) or ``"released"`` (the released code's log-probability variant); see ``unikd.losses.uskd_loss``.
"""

from __future__ import annotations

import torch
from torch import nn

from unikd._errors import ConfigError
from unikd.losses import USKD_RANKS, uskd_loss
from unikd.methods._ce_plus_term import CEPlusTerm
from unikd.methods.base import StudentOutput


class USKD(CEPlusTerm):
    """``CE + alpha * L_target + beta * L_non-target + mu * L_weak`` (Eq. 11); the weak head is ``weak_head``."""

    name = "uskd"
    student_output = "feature"
    term_name = "uskd"

    def __init__(
        self,
        num_classes: int,
        feature_dim: int | None = None,
        *,
        alpha: float = 1.0,
        beta: float = 0.1,
        mu: float = 0.005,
        rank: str = "paper",
    ) -> None:
        if feature_dim is None:
            raise ValueError(
                "method 'uskd' needs feature_dim (the width of the student feature its weak head reads); "
                "get it with unikd.models.feature_dim(model, layer)"
            )
        if rank not in USKD_RANKS:
            raise ConfigError(f"method.rank: {rank!r} is not one of {', '.join(USKD_RANKS)}")
        super().__init__(num_classes, feature_dim)
        self.alpha = alpha
        self.beta = beta
        self.mu = mu
        self.rank = rank
        self.weak_head = nn.Linear(feature_dim, num_classes)

    def term(self, student: StudentOutput, target: torch.Tensor, teacher_logits: torch.Tensor | None) -> torch.Tensor:
        weak_logits = self.weak_head(student.feature)
        return uskd_loss(
            student.logits, weak_logits, target, alpha=self.alpha, beta=self.beta, mu=self.mu, rank=self.rank
        )
