"""The contract every distillation method implements.

A method turns one batch's model outputs into a dict of named, already-weighted loss terms; the trainer sums
and logs them. Adding a method is one new file in this package plus one line in ``unikd/methods/__init__.py``.

    method = create_method("uskd", num_classes=100, feature_dim=256)
    out = forward_student(student, images, method.student_output)     # StudentOutput
    terms = method(out, target, teacher_logits=None, progress=epoch / epochs)
    loss = sum(terms.values())
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn


@dataclass
class StudentOutput:
    """What the student produced for one batch.

    logits: (N, C). feature: (N, D) pooled intermediate feature (USKD Eq. 8), present when the method asks for
    ``student_output = "feature"``. dense_logits: (N, L, C) classifier applied at each of the L locations of the
    last feature map (Zipf's LS), present when the method asks for ``student_output = "dense_logits"``.
    """

    logits: torch.Tensor
    feature: torch.Tensor | None = None
    dense_logits: torch.Tensor | None = None


class Method(nn.Module):
    """Base class of a distillation method.

    Subclasses set the class attributes and implement ``forward``. A method is an ``nn.Module`` so that methods
    with trainable parts (USKD's weak head) are trained, checkpointed and wrapped by DDP with the student.

    Class attributes:
        name: registry name (``method.name`` in configs).
        needs_teacher: the trainer must supply ``teacher_logits``.
        student_output: extra student output the method needs: ``None``, ``"feature"`` or ``"dense_logits"``.
    """

    name: ClassVar[str]
    needs_teacher: ClassVar[bool] = False
    student_output: ClassVar[Literal["feature", "dense_logits"] | None] = None

    def __init__(self, num_classes: int, feature_dim: int | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.feature_dim = feature_dim

    def forward(
        self,
        student: StudentOutput,
        target: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        progress: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """Return the named loss terms, each a weighted scalar.

        Args:
            student: the student's outputs for the batch.
            target: class indices (N,) or probabilities (N, C) (mixup/cutmix).
            teacher_logits: (N, C), detached, when ``needs_teacher``.
            progress: training progress in epochs as a float (epoch + fraction done), for schedules such as
                DKD's warm-up. Explicit, never hidden in kwargs.
        """
        raise NotImplementedError
