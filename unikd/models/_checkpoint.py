"""Teachers in, students out: reading and writing plain state_dicts safely.

Reading never unpickles arbitrary objects (``torch.load(weights_only=True)``, or safetensors). Accepted layouts:
a unikd training checkpoint (``{"format": "unikd-checkpoint", "model": state_dict, ...}``), a plain state_dict
(timm / torchvision layout), a dict holding one under ``"state_dict"`` / ``"model"`` (common training scripts),
or ``.safetensors``. Prefixes left by DistributedDataParallel (``module.``) and ``torch.compile`` (``_orig_mod.``)
are stripped.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from unikd.models._factory import ModelError, create_model
from unikd.models._features import unwrap

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_MAX_LISTED = 10


def _strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    stripped = {}
    for key, value in state_dict.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        stripped[key] = value
    return stripped


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, metadata of a unikd checkpoint or {})."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return _strip_wrapper_prefixes(safetensors.torch.load_file(path, device="cpu")), {}
        except Exception as error:
            raise ModelError(f"cannot read {path} as safetensors: {type(error).__name__}: {error}") from error
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ModelError(
            f"cannot load {path} safely: it pickles Python objects other than tensors and plain containers "
            f"({str(error).splitlines()[0]}). Re-save only the weights, e.g. torch.save(model.state_dict(), path) "
            "or unikd.models.export_state_dict(model, 'weights.safetensors')"
        ) from error
    except Exception as error:
        raise ModelError(f"cannot read {path} as a torch checkpoint: {type(error).__name__}: {error}") from error
    metadata = {}
    if isinstance(obj, dict) and obj.get("format") == "unikd-checkpoint":
        metadata = {key: obj.get(key) for key in ("model_name", "num_classes", "epoch")}
        obj = obj["model"]
    elif isinstance(obj, dict) and not _is_state_dict(obj):
        obj = next((obj[key] for key in ("state_dict", "model") if _is_state_dict(obj.get(key))), obj)
    if not _is_state_dict(obj):
        raise ModelError(
            f"{path} holds no state_dict: expected a dict of tensors, a unikd checkpoint, or a dict with a "
            f"'state_dict' or 'model' entry; found {type(obj).__name__}"
            + (f" with keys {sorted(map(str, obj))[:_MAX_LISTED]}" if isinstance(obj, dict) else "")
        )
    return _strip_wrapper_prefixes(obj), metadata


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model weights stored at ``path`` (any accepted layout, see the module docstring), on the CPU."""
    return _read(path)[0]


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def _load_exactly(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with one error that lists every missing/unexpected key and shape mismatch."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state_dict and state_dict[key].shape != value.shape
    ]
    problems = [
        f"{label} ({len(keys)}): {_listing(keys)}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if keys
    ]
    if problems:
        raise ModelError(f"{source} does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)


def load_teacher(name: str, num_classes: int, checkpoint: str | os.PathLike, **kwargs) -> nn.Module:
    """``create_model(name, num_classes, **kwargs)`` with the weights at ``checkpoint``, frozen: eval mode and
    ``requires_grad=False`` for every parameter. The caller must not switch it back to train mode."""
    model = create_model(name, num_classes, **kwargs)
    state_dict, metadata = _read(checkpoint)
    source = f"checkpoint {checkpoint}"
    if metadata.get("model_name"):
        source += f" (saved from {metadata['model_name']} with {metadata['num_classes']} classes)"
    _load_exactly(model, state_dict, f"{source}, loaded into {name} with {num_classes} classes,")
    model.eval()
    model.requires_grad_(False)
    return model


def export_state_dict(model_or_state_dict: nn.Module | dict, out_path: str | os.PathLike) -> Path:
    """Write the weights as ``.safetensors`` or ``.pt``/``.pth`` (by suffix), atomically (temp file + rename).

    Accepts a model (DDP / compiled wrappers are unwrapped), a state_dict, or a unikd training checkpoint dict
    (its student ``"model"`` is written; the method's weak head is not part of it). The file loads with
    ``strict=True`` into the same ``create_model`` name, and for timm/tv names into ``timm.create_model`` /
    torchvision's constructor.
    """
    out_path = Path(out_path)
    if out_path.suffix not in (".safetensors", ".pt", ".pth"):
        raise ModelError(f"export path {out_path} must end in .safetensors, .pt or .pth")
    if isinstance(model_or_state_dict, nn.Module):
        state_dict = unwrap(model_or_state_dict).state_dict()
    elif model_or_state_dict.get("format") == "unikd-checkpoint":
        state_dict = model_or_state_dict["model"]
    else:
        state_dict = model_or_state_dict
    not_tensors = [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ModelError(
            f"cannot export a dict with non-tensor values ({_listing(not_tensors)}); pass a model, its state_dict "
            "or a unikd training checkpoint"
        )
    # Own, contiguous CPU copies: safetensors refuses tensors that share memory.
    tensors = {
        key: value.detach().cpu().contiguous().clone() for key, value in _strip_wrapper_prefixes(state_dict).items()
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if out_path.suffix == ".safetensors":
            safetensors.torch.save_file(tensors, tmp_name)
        else:
            torch.save(tensors, tmp_name)
        os.replace(tmp_name, out_path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return out_path
