"""The shape most methods share: a weighted cross-entropy plus one weighted distillation term.

    total = ce_weight * CE(student, target) + term_weight * schedule(progress) * term(student, target, teacher)

A method subclasses ``CEPlusTerm``, declares its hyper-parameters as keyword arguments of its own ``__init__`` (so
that ``method_defaults`` reads them with ``inspect.signature``), and implements ``term``. The two loss terms are
returned separately (``loss_ce`` and ``loss_<term_name>``) so the trainer logs each.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from unikd.losses import cross_entropy
from unikd.methods.base import Method, StudentOutput


class CEPlusTerm(Method):
    """``ce_weight * CE + term_weight * schedule(progress) * term``; a zero weight drops that entry from the dict."""

    term_name: ClassVar[str]

    def __init__(
        self, num_classes: int, feature_dim: int | None = None, *, ce_weight: float = 1.0, term_weight: float = 1.0
    ) -> None:
        super().__init__(num_classes, feature_dim)
        self.ce_weight = ce_weight
        self.term_weight = term_weight

    def term(self, student: StudentOutput, target: torch.Tensor, teacher_logits: torch.Tensor | None) -> torch.Tensor:
        """The unweighted distillation term, a scalar (batch mean)."""
        raise NotImplementedError

    def schedule(self, progress: float) -> float:
        """Multiplier of the distillation term at ``progress`` epochs (1 unless the method warms up)."""
        return 1.0

    def forward(
        self,
        student: StudentOutput,
        target: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        progress: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        if self.needs_teacher and teacher_logits is None:
            raise ValueError(
                f"method '{self.name}' needs teacher_logits: set model.teacher (and model.teacher_checkpoint) "
                "in the config, or choose a method without a teacher"
            )
        terms = {}
        if self.ce_weight:
            terms["loss_ce"] = self.ce_weight * cross_entropy(student.logits, target)
        if self.term_weight:
            weight = self.term_weight * self.schedule(progress)
            terms[f"loss_{self.term_name}"] = weight * self.term(student, target, teacher_logits)
        return terms
