"""Yang et al. 2023 (ICCV), USKD: universal self-knowledge distillation with customized soft labels.

The student teaches itself: its target soft label comes from its own target probability (Eq. 6) and its
non-target soft labels from a Zipf distribution ranked by a weak head on an intermediate feature (Eq. 8-11); the
total is ``CE + alpha * L_target + beta * L_non + mu * L_weak`` (Eq. 13). The method owns that weak head,
``nn.Linear(feature_dim, num_classes)``, so it is trained and checkpointed with the student (``ckpt["method"]``).

Defaults are the paper's ImageNet setting (alpha=1, beta=0.1, mu=0.005); the released CIFAR-100 configs use
alpha=0.1, beta=0.1, mu=0.1. The ablation variants (``rank``: Table 9; ``target_soft_label``: Tables 8, 12, 15;
``target_loss``: Table 15; ``alpha`` or ``beta`` zero: Table 6) are options of ``unikd.losses.uskd_loss``, which
documents each equation.

What the trainer must provide depends on the options, and the instance says so:
- ``student_output``: ``"feature"`` (the pooled feature (N, D)), ``"feature_map"`` (the unpooled feature as
  locations x channels (N, L, D), for ``weak_norm="layernorm"``), or ``None`` when no weak head is needed (beta = 0
  or ``rank="final"``, and mu = 0): then the method has no weak head at all.
- ``teacher_source``: ``None`` (no ``teacher_logits``), ``"checkpoint"`` (``target_soft_label="teacher"``: a trained
  teacher's logits, so ``needs_teacher`` is True), or ``"ema"`` (``target_soft_label="ema"``: the logits of an EMA copy
  of the student's weights, e.g. timm's ``ModelEmaV3``, passed as ``teacher_logits``; no per-sample storage).
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
from torch import nn

from unikd._errors import ConfigError
from unikd.losses import uskd_loss
from unikd.methods._ce_plus_term import CEPlusTerm
from unikd.methods.base import StudentOutput

# Where teacher_logits come from, by target_soft_label (the others take none).
TEACHER_SOURCES = {"teacher": "checkpoint", "ema": "ema"}
WEAK_NORMS = ("none", "layernorm")


class USKD(CEPlusTerm):
    """``CE + alpha * L_target + beta * L_non-target + mu * L_weak`` (Eq. 13); the weak head is ``weak_head``."""

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
        rank: Literal["paper", "released", "weak", "final", "sum"] = "paper",
        target_soft_label: Literal[
            "squared", "unsquared", "softmax", "sqrt", "max", "mean", "teacher", "ema"
        ] = "squared",
        target_loss: Literal["t1", "t2", "t1+t2"] = "t1",
        batch_mean_group: int = 0,
        weak_norm: Literal["none", "layernorm"] = "none",
    ) -> None:
        """
        Args:
            alpha, beta, mu: weights of L_target, L_non and L_weak (>= 0; 0 skips that part's work).
            rank: how the non-target classes are ranked. "paper" is Eq. 10 (probabilities). "released" is the
                authors' code today, whose student term uses log-probabilities; their first release (March 2023,
                yzd-v/cls_KD commit 87a7197) ranked with probabilities like Eq. 10, and the log-probability rank came
                with a later refactor (commit 1c2c0ff). "weak", "final", "sum" are Table 9's other rows.
            target_soft_label: the soft target value (Table 12 "squared"/"unsquared", Table 8 "softmax", "sqrt",
                "max", "mean", "teacher", Table 15's S2 "ema").
            target_loss: the target part, "t1" -P log S (default), "t2" -(1 - P) log(1 - S), or both (Table 15).
            batch_mean_group: rows per batch statistic of the soft target value (0: the whole per-process batch);
                e.g. 16 to reproduce 8 GPUs x 16 images on one device with batch 128.
            weak_norm: "layernorm" puts a LayerNorm over the channels of each location of the feature map before
                pooling and the weak head (trained with it), as mmpretrain's Swin applies its per-stage ``norm2`` to
                the stage-3 output the released weak head reads; it needs ``student_output="feature_map"``.
        """
        # The registry checks every choice and range up front (create_method); the loss checks its own options again
        # at each call. The weak head's norm never reaches the loss, so a method built directly checks it here.
        if weak_norm not in WEAK_NORMS:
            raise ConfigError(f"method.weak_norm: {weak_norm!r} is not one of {', '.join(WEAK_NORMS)}")
        params = {"mu": mu, "beta": beta, "rank": rank, "weak_norm": weak_norm}
        student_output = self.student_output_for(params)
        if student_output is not None and feature_dim is None:
            raise ValueError(
                "method 'uskd' needs feature_dim (the width of the student feature its weak head reads); "
                "get it with unikd.models.feature_dim(model, layer)"
            )
        super().__init__(num_classes, feature_dim)
        self.alpha = alpha
        self.beta = beta
        self.mu = mu
        self.rank = rank
        self.target_soft_label = target_soft_label
        self.target_loss = target_loss
        self.batch_mean_group = batch_mean_group
        self.weak_norm = weak_norm
        self.teacher_source = self.teacher_source_for({"target_soft_label": target_soft_label})
        self.needs_teacher = self.teacher_source == "checkpoint"
        self.student_output = student_output
        if student_output is None:
            return
        if weak_norm == "layernorm":
            self.weak_head_norm = nn.LayerNorm(feature_dim)
        self.weak_head = nn.Linear(feature_dim, num_classes)

    @classmethod
    def teacher_source_for(cls, params: dict[str, Any]) -> Literal["checkpoint", "ema"] | None:
        """Where ``teacher_logits`` come from for these hyper-parameters; None: the method takes none."""
        return TEACHER_SOURCES.get(params.get("target_soft_label", "squared"))

    @classmethod
    def student_output_for(cls, params: dict[str, Any]) -> Literal["feature", "feature_map"] | None:
        """The student feature the weak head reads: none when nothing uses a weak head (beta = 0 or
        ``rank="final"``, and mu = 0), the unpooled map for ``weak_norm="layernorm"``, else the pooled feature."""
        defaults = {key: value.default for key, value in inspect.signature(cls.__init__).parameters.items()}
        mu, beta, rank, weak_norm = ({**defaults, **params}[key] for key in ("mu", "beta", "rank", "weak_norm"))
        if mu == 0 and (beta == 0 or rank == "final"):
            return None
        return "feature_map" if weak_norm == "layernorm" else "feature"

    def weak_logits(self, feature: torch.Tensor) -> torch.Tensor:
        """The weak head's logits (N, C) from the pooled feature (N, D), or with ``weak_norm="layernorm"`` from the
        feature map as locations x channels (N, L, D): each location normalised, then averaged, then the head."""
        if self.weak_norm == "layernorm":
            if feature.dim() != 3:
                raise ValueError(
                    "method 'uskd' with weak_norm='layernorm' normalises each location before pooling, so it needs "
                    f"the unpooled feature map (N, L, D) (student_output='feature_map'); got {tuple(feature.shape)}"
                )
            feature = self.weak_head_norm(feature).mean(dim=1)
        return self.weak_head(feature)

    def term(self, student: StudentOutput, target: torch.Tensor, teacher_logits: torch.Tensor | None) -> torch.Tensor:
        if self.teacher_source == "ema" and teacher_logits is None:
            raise ValueError(
                "method 'uskd' with target_soft_label='ema' needs teacher_logits from an EMA copy of the student "
                "(method.teacher_source == 'ema'): the trainer must keep that model and pass its logits"
            )
        weak_logits = self.weak_logits(student.feature) if self.student_output is not None else None
        return uskd_loss(
            student.logits,
            weak_logits,
            target,
            teacher_logits if self.teacher_source is not None else None,
            alpha=self.alpha,
            beta=self.beta,
            mu=self.mu,
            rank=self.rank,
            target_soft_label=self.target_soft_label,
            target_loss=self.target_loss,
            batch_mean_group=self.batch_mean_group,
        )
