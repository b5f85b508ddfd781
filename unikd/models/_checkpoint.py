"""Weights in and out: teachers, students initialised from a file, any weights for evaluation, and export.

Every file is read by ``unikd._serialization`` (nothing pickled is ever run; zip, legacy and safetensors files) and
put into the model's own key names by ``unikd.models._formats`` (unikd, timm, torchvision, CRD / mdistiller and
mmpretrain / cls_KD layouts, detected or named by ``layout``). Each loader says what it found in a
``WeightsReport`` (``report.describe()`` is one line).

    teacher = load_teacher("cifar/resnet32x4", 100, "cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth")
    model, report = load_model_weights("mdistiller/ResNet50", 100, "student_best")          # evaluation
    report = init_student_from_file(student, "cifar/resnet8x4", "pretrained.pth")           # fine-tuning
    load_exactly(module, state_dict, "backbone.pt")   # already in the module's key names: every entry must fit
    export_state_dict(model, "model.safetensors", metadata={"model_name": "cifar/resnet8x4", "num_classes": 100})
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from unikd._serialization import WeightsFile, read_weights_file
from unikd.models._errors import ModelError
from unikd.models._factory import create_model, implied_kwargs, resolve_model_name
from unikd.models._features import unwrap
from unikd.models._formats import (
    WeightsReport,
    classifier_keys,
    find_state_dict,
    listing,
    strip_wrapper_prefixes,
    to_model_keys,
)
from unikd.models._mmpretrain import MMPRETRAIN_MODELS

_EXPORT_METADATA = ("model_name", "num_classes", "in_chans")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights stored at ``path`` as they are named there (any container and serialisation; wrapper prefixes
    stripped; no layout conversion), on the CPU."""
    return strip_wrapper_prefixes(find_state_dict(read_weights_file(path), str(path))[0])


def load_exactly(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """``module.load_state_dict(state_dict, strict=True)``, or one ``ModelError`` that starts with ``source`` (what
    the weights are and where they come from) and lists every missing, unexpected and mis-shaped entry."""
    expected = module.state_dict()
    problems = {
        "missing entries": [key for key in expected if key not in state_dict],
        "unexpected entries": [key for key in state_dict if key not in expected],
        "shape mismatches": [
            f"{key}: file {tuple(state_dict[key].shape)} vs model {tuple(value.shape)}"
            for key, value in expected.items()
            if key in state_dict and state_dict[key].shape != value.shape
        ],
    }
    found = [f"{label} ({len(keys)}): {listing(keys)}" for label, keys in problems.items() if keys]
    if found:
        raise ModelError(f"{source} does not fit the model: {'; '.join(found)}")
    module.load_state_dict(state_dict, strict=True)


def _shape_problems(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    return [
        key for key, value in model.state_dict().items() if key in state_dict and state_dict[key].shape != value.shape
    ]


def _load(
    model: nn.Module,
    model_name: str,
    num_classes: int,
    weights: WeightsFile,
    path: str | os.PathLike,
    *,
    layout: str,
    role: str,
    new_classifier_ok: bool,
) -> WeightsReport:
    """Put ``weights`` (read from ``path``) into ``model`` (built as ``model_name`` with ``num_classes`` classes);
    the report says how."""
    state_dict, report = _fit(
        model, model_name, num_classes, weights, path, layout=layout, role=role, new_classifier_ok=new_classifier_ok
    )
    model.load_state_dict(state_dict, strict=not report.reinitialized)
    return report


def _fit(
    model: nn.Module,
    model_name: str,
    num_classes: int,
    weights: WeightsFile,
    path: str | os.PathLike,
    *,
    layout: str,
    role: str,
    new_classifier_ok: bool,
) -> tuple[dict[str, torch.Tensor], WeightsReport]:
    """``weights`` in ``model``'s key names, shapes checked (a meta-device model will do), and the report."""
    state_dict, report = to_model_keys(weights, path, model, model_name, layout=layout, role=role)
    mismatched = _shape_problems(model, state_dict)
    classifier = classifier_keys(model)
    if mismatched and new_classifier_ok and set(mismatched) <= classifier:
        report.reinitialized = sorted(classifier)  # the whole classifier keeps its fresh init, not half of it
        state_dict = {key: value for key, value in state_dict.items() if key not in classifier}
    elif mismatched:
        expected = model.state_dict()
        shapes = [
            f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
            for key in mismatched
        ]
        source = f"{report.path} ({report.container}; {report.layout} layout"
        if report.metadata.get("model_name"):
            source += f"; saved from {report.metadata['model_name']} with {report.metadata.get('num_classes')} classes"
        fix = (
            "; the classifier differs: use weights trained on a dataset with that many classes"
            if (set(mismatched) <= classifier)
            else ""
        )
        raise ModelError(
            f"{source}), loaded into {model_name} with {num_classes} classes, does not fit the model: "
            f"shape mismatches ({len(shapes)}): {listing(shapes)}{fix}"
        )
    return state_dict, report


def _recorded_in_chans(weights: WeightsFile, path: str | os.PathLike) -> int | None:
    """The input channels a unikd checkpoint or export records, if any (read before the model is built)."""
    _, report = find_state_dict(weights, str(path))
    in_chans = report.metadata.get("in_chans")
    return in_chans if isinstance(in_chans, int) else None


def load_model_weights(
    name: str,
    num_classes: int,
    path: str | os.PathLike,
    *,
    layout: str = "auto",
    role: str = "student",
    **kwargs,
) -> tuple[nn.Module, WeightsReport]:
    """``create_model(name, num_classes, **kwargs)`` with the weights at ``path``, in eval mode, and the report.

    For ``unikd eval --model NAME WEIGHTS``: any readable file, the layout detected (``layout="auto"``) or named
    (one of ``unikd.models.FORMATS``); ``role`` picks the half of a whole-distiller checkpoint. ``in_chans`` comes
    from the file's unikd metadata when not given. The classifier must fit ``num_classes``.
    """
    state_dict, report, build = read_model_weights(name, num_classes, path, layout=layout, role=role, **kwargs)
    return build(state_dict), report


def read_model_weights(
    name: str,
    num_classes: int,
    path: str | os.PathLike,
    *,
    layout: str = "auto",
    role: str = "student",
    **kwargs,
) -> tuple[dict[str, torch.Tensor], WeightsReport, Callable[[dict[str, torch.Tensor]], nn.Module]]:
    """What ``load_model_weights`` reads, without building the model: the weights at ``path`` in the model's key
    names (checked against the model built on the meta device: no memory, no initialisation), the report, and
    ``build(state_dict)``, which creates the model on the CPU with them, in eval mode.

    The teacher cache fingerprints a teacher from this state_dict, so that a run whose logits are all cached never
    builds it.
    """
    canonical = resolve_model_name(name)
    kwargs = {**implied_kwargs(name), **kwargs}
    weights = read_weights_file(path)
    if "in_chans" not in kwargs and (in_chans := _recorded_in_chans(weights, path)) is not None:
        kwargs["in_chans"] = in_chans
    with torch.device("meta"):
        shapes_only = create_model(canonical, num_classes, **kwargs)
    state_dict, report = _fit(
        shapes_only, canonical, num_classes, weights, path, layout=layout, role=role, new_classifier_ok=False
    )
    if report.layout == "mmpretrain":
        _check_mmpretrain_kwargs(report, canonical, kwargs)

    def build(weights_in_model_keys: dict[str, torch.Tensor]) -> nn.Module:
        model = create_model(canonical, num_classes, **kwargs)
        model.load_state_dict(weights_in_model_keys, strict=True)
        return model.eval()

    return state_dict, report, build


def _check_mmpretrain_kwargs(report: WeightsReport, canonical: str, kwargs: dict) -> None:
    """Refuse a model that the weights fit but that computes something else (cls_KD's MobileNetV1 uses ReLU where
    timm's default is ReLU6): the keywords ``_mmpretrain`` maps that backbone with must have been used."""
    required = {target: target_kwargs for target, target_kwargs in MMPRETRAIN_MODELS.values()}.get(canonical, {})
    wrong = {key: value for key, value in required.items() if kwargs.get(key) != value}
    if wrong:
        settings = ", ".join(f"{key}={value!r}" for key, value in wrong.items())
        alias = next(alias for alias, (target, _) in MMPRETRAIN_MODELS.items() if target == canonical)
        raise ModelError(
            f"{report.path} ({report.container}; mmpretrain layout) computes what {canonical} computes only with "
            f"{settings}; pass {settings} or use the name mmpretrain/{alias}"
        )


def load_teacher(
    name: str, num_classes: int, checkpoint: str | os.PathLike, *, layout: str = "auto", **kwargs
) -> nn.Module:
    """``load_model_weights(..., role="teacher")``, frozen: eval mode and ``requires_grad=False`` for every
    parameter. The caller must not switch it back to train mode. (For the report, call ``load_model_weights``.)"""
    model, _ = load_model_weights(name, num_classes, checkpoint, layout=layout, role="teacher", **kwargs)
    return model.requires_grad_(False)


def init_student_from_file(
    model: nn.Module,
    name: str,
    path: str | os.PathLike,
    *,
    layout: str = "auto",
    role: str = "student",
    model_kwargs: dict | None = None,
) -> WeightsReport:
    """Load the weights at ``path`` into ``model`` (built by ``create_model(name, num_classes, **model_kwargs)``) to
    fine-tune.

    When only the classifier's shape differs (another class count), the classifier keeps its fresh initialisation
    and ``report.reinitialized`` lists its keys: a weak head trained for the old classes (``report.method_state``
    of a unikd checkpoint) must then be re-initialised too. Any other difference raises ``ModelError``. Given
    ``model_kwargs``, an mmpretrain file is also refused for a model built without the keywords its mapping needs
    (cls_KD's MobileNetV1 with timm's default ReLU6), as ``load_model_weights`` refuses it.
    """
    model = unwrap(model)
    weight = next((key for key in sorted(classifier_keys(model)) if key.endswith("weight")), None)
    num_classes = model.state_dict()[weight].shape[0] if weight else "?"
    weights = read_weights_file(path)
    canonical = resolve_model_name(name)
    report = _load(model, canonical, num_classes, weights, path, layout=layout, role=role, new_classifier_ok=True)
    if model_kwargs is not None and report.layout == "mmpretrain":
        _check_mmpretrain_kwargs(report, canonical, {**implied_kwargs(name), **model_kwargs})
    return report


def _first_conv_in_chans(state_dict: dict[str, torch.Tensor]) -> int | None:
    """Input channels of the first 4-D weight (the stem conv / patch embedding of every model we build)."""
    return next((int(value.shape[1]) for value in state_dict.values() if value.dim() == 4), None)


def export_state_dict(
    model_or_state_dict: nn.Module | dict, out_path: str | os.PathLike, *, metadata: dict | None = None
) -> Path:
    """Write the weights as ``.safetensors`` or ``.pt``/``.pth`` (by suffix), atomically (temp file + rename), with
    ordinary permissions (0o644 less the umask).

    Accepts a model (DDP / compiled wrappers are unwrapped), a state_dict, or a unikd training checkpoint dict
    (its student ``"model"`` is written; the method's weak head is not part of it). ``.safetensors`` files record
    ``model_name``, ``num_classes`` and ``in_chans`` in their metadata (given in ``metadata``, else taken from the
    training checkpoint; ``in_chans`` else from the first conv), which ``load_teacher`` / ``load_model_weights``
    read. The file loads with ``strict=True`` into the same ``create_model`` name, and for timm/tv names into
    ``timm.create_model`` / torchvision's constructor.
    """
    out_path = Path(out_path)
    if out_path.suffix not in (".safetensors", ".pt", ".pth"):
        raise ModelError(f"export path {out_path} must end in .safetensors, .pt or .pth")
    recorded: dict = {}
    if isinstance(model_or_state_dict, nn.Module):
        state_dict = unwrap(model_or_state_dict).state_dict()
    elif model_or_state_dict.get("format") == "unikd-checkpoint":
        state_dict = model_or_state_dict["model"]
        recorded = {key: model_or_state_dict[key] for key in _EXPORT_METADATA if key in model_or_state_dict}
    else:
        state_dict = model_or_state_dict
    not_tensors = [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ModelError(
            f"cannot export a dict with non-tensor values ({listing(not_tensors)}); pass a model, its state_dict "
            "or a unikd training checkpoint"
        )
    unknown = sorted(set(metadata or {}) - set(_EXPORT_METADATA))
    if unknown:
        raise ModelError(f"export metadata: unknown keys {unknown}; use {', '.join(_EXPORT_METADATA)}")
    recorded.update(metadata or {})
    if "in_chans" not in recorded and (in_chans := _first_conv_in_chans(state_dict)) is not None:
        recorded["in_chans"] = in_chans
    # Own, contiguous CPU copies: safetensors refuses tensors that share memory.
    tensors = {
        key: value.detach().cpu().contiguous().clone() for key, value in strip_wrapper_prefixes(state_dict).items()
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": "unikd", **{key: str(value) for key, value in recorded.items()}}
    fd, tmp_name = _create_temp_file(out_path)
    try:
        with os.fdopen(fd, "wb") as f:
            if out_path.suffix == ".safetensors":
                f.write(safetensors.torch.save(tensors, metadata=header))
            else:
                torch.save(tensors, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, out_path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return out_path


def _create_temp_file(out_path: Path) -> tuple[int, str]:
    """(descriptor, name) of a new file beside ``out_path``, created with mode 0o644 less the umask as any new file
    is (``tempfile.mkstemp`` would make it 0o600, readable by its owner only)."""
    while True:
        name = os.path.join(out_path.parent, f".{out_path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), name
        except FileExistsError:
            continue
