"""Distillation methods: a registry of ``Method`` classes, one file each.

method = create_method("uskd", num_classes=100, feature_dim=feature_dim(model))
out = forward_student(model, images, method.student_output)
terms = method(out, target, teacher_logits=None, progress=epoch + step / steps_per_epoch)
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

import torch
from torch import nn

from unikd._errors import ConfigError
from unikd.methods.base import Method, StudentOutput
from unikd.methods.baseline import Baseline
from unikd.methods.dkd import DKD
from unikd.methods.kd import KD
from unikd.methods.ls import LabelSmoothing
from unikd.methods.nkd import NKD
from unikd.methods.tfkd import TfKD
from unikd.methods.uskd import USKD
from unikd.methods.wsld import WSLD
from unikd.methods.zipf_ls import ZipfLS
from unikd.models import forward_with_dense_logits, forward_with_feature

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (Baseline, LabelSmoothing, TfKD, ZipfLS, USKD, KD, DKD, NKD, WSLD)
}

__all__ = [
    "DKD",
    "KD",
    "METHODS",
    "NKD",
    "USKD",
    "WSLD",
    "Baseline",
    "LabelSmoothing",
    "Method",
    "StudentOutput",
    "TfKD",
    "ZipfLS",
    "create_method",
    "forward_student",
    "method_defaults",
]


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _method_class(name: str) -> type[Method]:
    if name not in METHODS:
        valid = sorted(METHODS)
        raise ConfigError(f"method.name: {name!r} is not one of {', '.join(valid)}{_did_you_mean(name, valid)}")
    return METHODS[name]


def method_defaults(name: str) -> dict[str, Any]:
    """The hyper-parameters of method ``name`` and their defaults (its ``__init__`` keyword-only arguments)."""
    parameters = inspect.signature(_method_class(name).__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


def create_method(name: str, num_classes: int, feature_dim: int | None = None, **hparams: Any) -> Method:
    """Build method ``name`` for a ``num_classes`` problem.

    Args:
        name: a key of ``METHODS``.
        num_classes: C, the width of the student logits.
        feature_dim: D, the width of the student feature (USKD's weak head reads it; see
            ``unikd.models.feature_dim``).
        **hparams: hyper-parameters overriding ``method_defaults(name)``.
    """
    cls = _method_class(name)
    defaults = method_defaults(name)
    for key in hparams:
        if key not in defaults:
            valid = sorted(defaults)
            raise ConfigError(
                f"method.{key}: unknown hyper-parameter of method '{name}'{_did_you_mean(key, valid)}; "
                f"valid: {', '.join(valid) or '(none)'}"
            )
    return cls(num_classes, feature_dim, **hparams)


def forward_student(
    model: nn.Module, images: torch.Tensor, student_output: str | None, layer: str | int = "mid"
) -> StudentOutput:
    """Run the student once and return what the method asked for (``Method.student_output``).

    ``None``: plain ``model(images)``. ``"feature"``: logits (N, C) and the pooled feature (N, D) at ``layer`` (see
    ``unikd.models.forward_with_feature``).
    ``"dense_logits"``: logits (N, C) and the classifier applied at each location of the last feature map (N, L, C).
    """
    if student_output is None:
        return StudentOutput(logits=model(images))
    if student_output == "feature":
        logits, feature = forward_with_feature(model, images, layer=layer)
        return StudentOutput(logits=logits, feature=feature)
    if student_output == "dense_logits":
        logits, dense_logits = forward_with_dense_logits(model, images)
        return StudentOutput(logits=logits, dense_logits=dense_logits)
    raise ValueError(f"student_output must be None, 'feature' or 'dense_logits', got {student_output!r}")
