"""Distillation methods: a registry of ``Method`` classes, one file each.

method = create_method("uskd", num_classes=100, feature_dim=feature_dim(model))
out = forward_student(model, images, method.student_output)
terms = method(out, target, teacher_logits=None, progress=epoch + step / steps_per_epoch)

A method's hyper-parameters are the keyword-only arguments of its ``__init__``. They are checked before any work
(``check_hyperparameters``, called by the config and by ``create_method``): a ``typing.Literal[...]`` annotation
lists the valid choices, ``HYPERPARAMETER_BOUNDS`` the valid range of a numeric one by name (a name it does not list
must be finite), so a new method gets both checks without code of its own.
"""

from __future__ import annotations

import difflib
import inspect
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
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
    "HYPERPARAMETER_BOUNDS",
    "KD",
    "METHODS",
    "NKD",
    "USKD",
    "WSLD",
    "Baseline",
    "Bounds",
    "LabelSmoothing",
    "Method",
    "StudentOutput",
    "TfKD",
    "ZipfLS",
    "check_hyperparameters",
    "create_method",
    "forward_student",
    "hyperparameter_types",
    "method_defaults",
]


@dataclass(frozen=True)
class Bounds:
    """An interval of valid values: ``low``/``high`` (None: unbounded), each end included unless ``*_open``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = self.low is None or value > self.low or (value == self.low and not self.low_open)
        below = self.high is None or value < self.high or (value == self.high and not self.high_open)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


_POSITIVE, _NON_NEGATIVE = Bounds(0, low_open=True), Bounds(0)
# Valid values of numeric hyper-parameters by name, for every method ("<method>.<name>" for one method only, which
# wins over the plain name). A numeric hyper-parameter not listed here must be finite.
HYPERPARAMETER_BOUNDS: dict[str, Bounds] = {
    "temperature": _POSITIVE,  # divides the logits
    "smoothing": Bounds(0, 1, high_open=True),  # the label-smoothing epsilon; 1 would leave no target
    "correct_prob": Bounds(0, 1, low_open=True),  # Tf-KD's probability of the correct class
    "power": _NON_NEGATIVE,  # Zipf exponent: 1 / rank^power
    "warmup": _NON_NEGATIVE,  # epochs
    "gamma": _NON_NEGATIVE,  # loss weights, all of them
    "alpha": _NON_NEGATIVE,
    "beta": _NON_NEGATIVE,
    "mu": _NON_NEGATIVE,
    "ce_weight": _NON_NEGATIVE,
    "kd_weight": _NON_NEGATIVE,
    "loss_lambda": _NON_NEGATIVE,
    "multiplier": _NON_NEGATIVE,
    "batch_mean_group": _NON_NEGATIVE,  # images per batch-mean group; 0 = the whole batch
    "tfkd.alpha": Bounds(0, 1),  # Tf-KD weighs CE by 1 - alpha
}


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


def hyperparameter_types(name: str) -> dict[str, Any]:
    """The resolved annotations of method ``name``'s hyper-parameters (``float``, ``Literal["paper", "released"]``,
    ...); a hyper-parameter without an annotation has its default's type, or none when the default is ``None``."""
    cls = _method_class(name)
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that does not resolve: fall back to the defaults' types
        hints = {}
    return {
        key: hints.get(key, type(default))
        for key, default in method_defaults(name).items()
        if key in hints or default is not None
    }


def check_hyperparameters(name: str, params: Mapping[str, Any]) -> None:
    """Raise ``ConfigError`` (``method.<key>: ...``) for a value that is not one of its ``Literal`` choices, not
    finite, or outside its ``HYPERPARAMETER_BOUNDS``."""
    hints = hyperparameter_types(name)
    for key, value in params.items():
        hint = hints.get(key)
        if typing.get_origin(hint) is typing.Literal and value not in typing.get_args(hint):
            choices = sorted(map(str, typing.get_args(hint)))
            message = f"method.{key}: {value!r} is not one of {', '.join(choices)}"
            raise ConfigError(message + _did_you_mean(str(value), choices))
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if not math.isfinite(value):
            raise ConfigError(f"method.{key}: must be a finite number, got {value!r}")
        bounds = HYPERPARAMETER_BOUNDS.get(f"{name}.{key}", HYPERPARAMETER_BOUNDS.get(key))
        if bounds is not None and value not in bounds:
            raise ConfigError(f"method.{key}: must be {bounds} for method '{name}', got {value!r}")


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
    check_hyperparameters(name, {**defaults, **hparams})
    return cls(num_classes, feature_dim, **hparams)


def forward_student(
    model: nn.Module, images: torch.Tensor, student_output: str | None, layer: str | int = "mid"
) -> StudentOutput:
    """Run the student once and return what the method asked for (``Method.student_output``).

    ``None``: plain ``model(images)``. ``"feature"``: logits (N, C) and the pooled feature (N, D) at ``layer`` (see
    ``unikd.models.forward_with_feature``). ``"feature_map"``: logits and the same feature unpooled, locations x
    channels (N, L, D) (``forward_with_feature(..., pool=False)``; for USKD's per-location weak-head LayerNorm).
    ``"dense_logits"``: logits (N, C) and the classifier applied at each location of the last feature map (N, L, C).
    """
    if student_output is None:
        return StudentOutput(logits=model(images))
    if student_output in ("feature", "feature_map"):
        logits, feature = forward_with_feature(model, images, layer=layer, pool=student_output == "feature")
        return StudentOutput(logits=logits, feature=feature)
    if student_output == "dense_logits":
        logits, dense_logits = forward_with_dense_logits(model, images)
        return StudentOutput(logits=logits, dense_logits=dense_logits)
    raise ValueError(f"student_output must be None, 'feature', 'feature_map' or 'dense_logits', got {student_output!r}")
