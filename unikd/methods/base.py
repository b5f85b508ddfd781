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
from typing import Any, ClassVar, Literal

import torch
from torch import nn


@dataclass
class StudentOutput:
    """What the student produced for one batch.

    logits: (N, C). feature: (N, D) pooled intermediate feature (USKD Eq. 8), present when the method asks for
    ``student_output = "feature"``; with ``"feature_map"`` the same feature unpooled, as locations x channels
    (N, L, D) whose mean over L is the pooled one. dense_logits: (N, L, C) classifier applied at each of the L
    locations of the last feature map (Zipf's LS), present when the method asks for ``student_output =
    "dense_logits"``.
    """

    logits: torch.Tensor
    feature: torch.Tensor | None = None
    dense_logits: torch.Tensor | None = None


class Method(nn.Module):
    """Base class of a distillation method.

    Subclasses set the class attributes and implement ``forward``. A method is an ``nn.Module`` so that methods
    with trainable parts (USKD's weak head) are trained, checkpointed and wrapped by DDP with the student.

    Class attributes (an instance may refine them from its hyper-parameters, as USKD does; the classmethods
    ``teacher_source_for`` and ``student_output_for`` answer for given hyper-parameters before any model exists):
        name: registry name (``method.name`` in configs).
        needs_teacher: the trainer must supply a trained teacher's ``teacher_logits``.
        teacher_source: where ``teacher_logits`` come from: ``None`` (the method takes none), ``"checkpoint"`` (a
            trained teacher, ``model.teacher`` + ``model.teacher_checkpoint``) or ``"ema"`` (an exponential moving
            average of the student's own weights, kept by the trainer). Defaults to ``"checkpoint"`` for a class
            with ``needs_teacher``.
        student_output: extra student output the method needs: ``None``, ``"feature"``, ``"feature_map"`` or
            ``"dense_logits"`` (see ``StudentOutput`` and ``unikd.methods.forward_student``).
    """

    name: ClassVar[str]
    needs_teacher: ClassVar[bool] = False
    teacher_source: ClassVar[Literal["checkpoint", "ema"] | None] = None
    student_output: ClassVar[Literal["feature", "feature_map", "dense_logits"] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "teacher_source" not in vars(cls):  # derived from needs_teacher unless the class names it
            inherited = None if cls.teacher_source == "checkpoint" else cls.teacher_source
            cls.teacher_source = "checkpoint" if cls.needs_teacher else inherited

    @classmethod
    def teacher_source_for(cls, params: dict[str, Any]) -> Literal["checkpoint", "ema"] | None:
        """Where ``teacher_logits`` come from for the hyper-parameters ``params``; the class's by default."""
        return cls.teacher_source

    @classmethod
    def student_output_for(cls, params: dict[str, Any]) -> Literal["feature", "feature_map", "dense_logits"] | None:
        """The student output the method needs with the hyper-parameters ``params``; the class's by default."""
        return cls.student_output

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
