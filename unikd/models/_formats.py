"""Which layout a weights file is in, and its state_dict in a given model's own key names.

A weights file has three independent properties, each detected and reported (``WeightsReport``):

- **serialisation**: torch zip, torch legacy (torch < 1.6), or safetensors (``unikd._serialization``);
- **container**: where the state_dict sits: a plain state_dict, a unikd training checkpoint (``"model"``), CRD's
  teacher files ``{"epoch", "model", "accuracy", "optimizer"}``, mdistiller's ``student_best`` (``{"model"}``) and
  ``best``/``latest`` (``{"epoch", "model", "optimizer", "best_acc"}``), mmengine's ``{"meta", "state_dict",
  "message_hub", ...}``, or any dict with a ``"state_dict"`` / ``"model"`` entry. Prefixes left by
  DistributedDataParallel (``module.``) and ``torch.compile`` (``_orig_mod.``) are stripped, and a whole-distiller
  state_dict (``student.`` / ``teacher.`` halves: mdistiller's ``module.student.``, cls_KD's ``student.``) gives
  the half the caller's role asks for;
- **layout** (``LAYOUTS``): the key names. ``native`` is the model's own names (unikd checkpoints and exports, timm
  and torchvision state_dicts); ``mdistiller`` is CRD's / mdistiller's names for the ``cifar/`` zoo
  (``unikd.models._mdistiller``); ``mmpretrain`` is mmpretrain / mmcls 1.x's ``backbone.`` / ``neck.`` / ``head.``
  names (``unikd.models._mmpretrain``). With ``layout="auto"`` each applicable layout is tried and the one whose
  keys fit the model exactly wins; a file that fits none gets one error naming the layouts tried and, for the
  closest, the first missing and unexpected keys.

Config keys ``model.teacher_format`` / ``model.student_format`` take the values of ``FORMATS``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from unikd._serialization import InertGlobal, WeightsFile
from unikd.models._errors import ModelError
from unikd.models._mdistiller import from_mdistiller, has_mdistiller_layout, key_map
from unikd.models._mmpretrain import from_mmpretrain, is_mmpretrain_state_dict, strip_distiller

LAYOUTS = ("native", "mdistiller", "mmpretrain")
FORMATS = ("auto", *LAYOUTS)
ROLES = ("teacher", "student")

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_DISTILLER_HALVES = ("student.", "teacher.")
_UNIKD_CHECKPOINT = "unikd-checkpoint"
_MAX_LISTED = 10
_FIRST_KEYS = 3


@dataclass
class WeightsReport:
    """What was found in a weights file and how it was read."""

    path: str
    serialization: str  # "torch zip", "torch legacy" or "safetensors"
    container: str  # e.g. "CRD teacher file, epoch 240, accuracy 75.61"
    layout: str = "?"  # one of LAYOUTS
    half: str | None = None  # the key prefix taken from a whole-distiller checkpoint, e.g. "module.teacher."
    ignored: list[str] = field(default_factory=list)  # keys not used: the other half, a distiller's own modules
    metadata: dict[str, Any] = field(default_factory=dict)  # model_name, num_classes, in_chans, epoch as recorded
    reinitialized: list[str] = field(default_factory=list)  # model keys kept at their fresh initialisation
    method_state: dict | None = None  # a unikd training checkpoint's method state (USKD's weak head)

    def describe(self) -> str:
        """One line, e.g. '<path>: torch legacy file; CRD teacher file, epoch 240, ...; mdistiller layout'."""
        parts = [f"{self.serialization} file", self.container, f"{self.layout} layout"]
        if self.half:
            parts.append(f"the {self.half.rstrip('.').rsplit('.', 1)[-1]} half ({self.half}* keys)")
        if self.ignored:
            parts.append(f"{len(self.ignored)} other keys ignored")
        if self.reinitialized:
            parts.append(f"re-initialised (class count differs): {', '.join(self.reinitialized)}")
        return f"{self.path}: " + "; ".join(parts)


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(value, torch.Tensor) for value in obj.values())


def _number(value: object) -> str:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _describe_container(content: dict, key: str) -> str:
    keys = set(content)
    if {"epoch", "accuracy"} <= keys and key == "model":
        return f"CRD teacher file, epoch {_number(content['epoch'])}, accuracy {_number(content['accuracy'])}"
    if keys == {"model"}:
        return "mdistiller student checkpoint"
    if "best_acc" in keys and key == "model":
        return f"mdistiller checkpoint, epoch {_number(content.get('epoch', '?'))}"
    if "meta" in keys and key == "state_dict":
        return "mmengine checkpoint"
    return f"'{key}' entry of a dict"


def _whole_model_error(path: str, obj: InertGlobal) -> ModelError:
    return ModelError(
        f"{path} pickles a whole {obj.qualified_name} object, not a state_dict, and unikd never builds pickled "
        "objects; in the project that wrote it, save model.state_dict() instead"
    )


def find_state_dict(weights: WeightsFile, path: str) -> tuple[dict[str, torch.Tensor], WeightsReport]:
    """The state_dict stored in ``weights`` (read from ``path``), with a report of the container."""
    content = weights.content
    report = WeightsReport(str(path), weights.serialization, "plain state_dict")
    if weights.serialization == "safetensors":
        report.metadata = _parse_metadata(weights.metadata)
        if weights.metadata.get("format") == "unikd":
            report.container = f"unikd export of {report.metadata.get('model_name', '?')}"
        return content, report
    if _is_state_dict(content):
        return content, report
    if (
        isinstance(content, dict)
        and content.get("format") == _UNIKD_CHECKPOINT
        and _is_state_dict(content.get("model"))
    ):
        report.container = f"unikd training checkpoint, epoch {content.get('epoch', '?')}"
        report.metadata = {
            key: content[key] for key in ("model_name", "num_classes", "in_chans", "epoch") if key in content
        }
        report.method_state = content.get("method") or None
        return content["model"], report
    if isinstance(content, dict):
        for key in ("state_dict", "model"):
            if _is_state_dict(content.get(key)):
                report.container = _describe_container(content, key)
                return content[key], report
            if isinstance(content.get(key), InertGlobal):
                raise _whole_model_error(path, content[key])
    if isinstance(content, InertGlobal):
        raise _whole_model_error(path, content)
    found = type(content).__name__
    if isinstance(content, dict):
        found += f" with keys {sorted(map(str, content))[:_MAX_LISTED]}"
    raise ModelError(
        f"{path} holds no state_dict: expected a dict of tensors, a unikd checkpoint, or a dict with a "
        f"'state_dict' or 'model' entry; found {found}"
    )


def _parse_metadata(metadata: dict[str, str]) -> dict[str, Any]:
    """unikd's safetensors metadata (strings) as Python values."""
    parsed: dict[str, Any] = {}
    for key, value in metadata.items():
        parsed[key] = int(value) if key in ("num_classes", "in_chans") and value.isdigit() else value
    return parsed


def strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``module.`` (DistributedDataParallel / DataParallel) and ``_orig_mod.`` (torch.compile) prefixes."""
    stripped = {}
    for key, value in state_dict.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        stripped[key] = value
    return stripped


def _take_half(
    raw: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor], role: str, report: WeightsReport
) -> dict[str, torch.Tensor]:
    """From a whole-distiller state_dict (``student.`` / ``teacher.`` halves), the ``role`` half without its prefix
    (``_mmpretrain.strip_distiller``, which also refuses a self-KD run's untrained teacher); else ``state_dict``.
    A distiller's own modules (mdistiller's FitNet regressor, cls_KD's ``distill_losses.``) are ignored."""
    if not any(key.startswith(_DISTILLER_HALVES) for key in state_dict):
        return state_dict
    halves = {key: value for key, value in state_dict.items() if key.startswith(_DISTILLER_HALVES)}
    try:
        half = strip_distiller(halves, role)
    except ModelError as error:
        raise ModelError(f"{report.path} ({report.container}): {error}") from error
    prefix = f"{role}."
    raw_key, key = next((raw_key, key) for raw_key, key in zip(raw, state_dict) if key.startswith(prefix))
    report.half = raw_key[: len(raw_key) - len(key) + len(prefix)]  # with the wrapper prefix: "module.teacher."
    report.ignored = [key for key in state_dict if not key.startswith(prefix)]
    return half


class _NotApplicable(Exception):
    """A layout that cannot describe this model or file; the message says why (shown when nothing fits)."""


def _convert(layout: str, state_dict: dict[str, torch.Tensor], model_name: str, auto: bool) -> dict:
    namespace, _, arch = model_name.partition("/")
    if layout == "native":
        return state_dict
    if layout == "mdistiller":
        if namespace != "cifar" or not has_mdistiller_layout(arch):
            raise _NotApplicable(f"{model_name} has no mdistiller counterpart")
        theirs_only = set(key_map(arch).values()) - set(key_map(arch))
        if auto and theirs_only.isdisjoint(state_dict):
            raise _NotApplicable("no mdistiller key names")
        return from_mdistiller(state_dict, arch)
    if auto and not is_mmpretrain_state_dict(state_dict):
        raise _NotApplicable("no backbone./head. keys")
    return from_mmpretrain(state_dict, model_name)


@dataclass
class _Fit:
    layout: str
    state_dict: dict[str, torch.Tensor] | None = None
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    reason: str = ""  # why the layout does not apply

    @property
    def exact(self) -> bool:
        return self.state_dict is not None and not self.missing and not self.unexpected

    def summary(self) -> str:
        if self.state_dict is None:
            return f"{self.layout} (not applicable: {self.reason})"
        return f"{self.layout} ({len(self.missing)} missing, {len(self.unexpected)} unexpected)"


def _first(keys: list[str]) -> str:
    shown = ", ".join(keys[:_FIRST_KEYS])
    return shown + (", ..." if len(keys) > _FIRST_KEYS else "")


def to_model_keys(
    weights: WeightsFile,
    path: str | os.PathLike,
    model: nn.Module,
    model_name: str,
    *,
    layout: str = "auto",
    role: str = "teacher",
) -> tuple[dict[str, torch.Tensor], WeightsReport]:
    """The state_dict in ``weights`` renamed to ``model``'s keys (shapes are the caller's to check), and the report.

    ``model_name`` is the canonical factory name of ``model`` (``cifar/resnet8x4``); ``role`` picks the half of a
    whole-distiller checkpoint. Raises ``ModelError`` when no layout's keys fit ``model``.
    """
    if layout not in FORMATS:
        raise ModelError(f"unknown weights format {layout!r}; choose one of {', '.join(FORMATS)}")
    if role not in ROLES:
        raise ModelError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    raw, report = find_state_dict(weights, str(path))
    state_dict = _take_half(raw, strip_wrapper_prefixes(raw), role, report)
    expected = model.state_dict()
    fits = []
    for candidate in LAYOUTS if layout == "auto" else (layout,):
        try:
            converted = _convert(candidate, state_dict, model_name, auto=layout == "auto")
        except _NotApplicable as reason:
            fits.append(_Fit(candidate, reason=str(reason)))
            continue
        except ModelError as error:  # the layout is recognised but maps to another architecture
            raise ModelError(f"{report.path} ({report.container}; {candidate} layout): {error}") from error
        fit = _Fit(
            candidate,
            converted,
            missing=[key for key in expected if key not in converted],
            unexpected=[key for key in converted if key not in expected],
        )
        if fit.exact:
            report.layout = candidate
            return converted, report
        fits.append(fit)
    tried = [fit for fit in fits if fit.state_dict is not None]
    message = f"{report.path} ({report.serialization} file; {report.container}) fits no weights layout of {model_name}"
    message += f"; tried {', '.join(fit.summary() for fit in fits)}"
    if tried:
        closest = min(tried, key=lambda fit: len(fit.missing) + len(fit.unexpected))
        missing = closest.missing
        if closest.layout == "mdistiller":  # name what is missing as the file would name it
            missing = [key_map(model_name.partition("/")[2]).get(key, key) for key in missing]
        details = [
            f"{label} ({len(keys)}): {_first(keys)}"
            for label, keys in (("missing keys", missing), ("unexpected keys", closest.unexpected))
            if keys
        ]
        message += f". Closest, {closest.layout}: {'; '.join(details)}"
    hint = f" (recorded: {report.metadata['model_name']})" if report.metadata.get("model_name") else ""
    raise ModelError(
        message + f". Check that the file holds a {model_name}{hint}, or name its format (one of {', '.join(LAYOUTS)})"
    )


def classifier_keys(model: nn.Module) -> set[str]:
    """State_dict keys of the final classifier: timm's / the CIFAR zoo's ``get_classifier()``, else the last
    ``nn.Linear`` (torchvision's ``fc``, ``classifier.1``, ``heads.head``, ...)."""
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(classifier, nn.Module):
        linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
        classifier = linears[-1] if linears else None
    for name, module in model.named_modules():
        if module is classifier:
            return {f"{name}.{key}" for key in module.state_dict()}
    return set()


def listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")
