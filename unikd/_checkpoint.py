"""Training checkpoints: atomic files, safe loading, the finiteness check, and the generator states of exact resume.

A checkpoint is a plain dict written with ``torch.save`` and read without unpickling code (``weights_only``), so it
holds only tensors and Python primitives::

    {"format": "unikd-checkpoint", "version": 2, "run_id": str (one per run, kept across resumes),
     "model_name": str, "num_classes": int, "in_chans": int,
     "model": student state_dict, "method": method state_dict (USKD's weak head), "optimizer", "scheduler", "scaler",
     "epoch": epoch in progress (0-based; == epochs done when saved at an epoch end),
     "step": optimizer steps done, "mid_epoch": bool (saved by an interrupt, not at an epoch end),
     "rng": capture_rng_state(), "config": plain dict, "metrics": {"history", "best_top1", "best_epoch", ...},
     "data": {"train_images": int, "val_images": int},
     "ema": the EMA copy of the student's state_dict, only when the method's soft targets come from it}

Version 1 files (no run_id, in_chans, mid_epoch, data) still load for eval, export and as teachers, not for resume.
The data order needs no generator state: each epoch's order is a function of (seed, epoch) (``DistributedSampler``)
and the position inside the epoch is ``step - epoch * steps_per_epoch``.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import nn

from unikd._errors import UnikdError
from unikd._serialization import safe_torch_load
from unikd.models import ModelError, load_exactly

CHECKPOINT_FORMAT = "unikd-checkpoint"
CHECKPOINT_VERSION = 2
READABLE_VERSIONS = (1, 2)
TEMP_SUFFIX = ".tmp"  # atomic_write's temp files: f".{name}.<random>{TEMP_SUFFIX}" beside the target
# What a checkpoint needs to rebuild its student (eval, export, soft labels), and in addition to resume training.
MODEL_ENTRIES = ("model_name", "num_classes", "model", "config")
RESUME_ENTRIES = (
    *MODEL_ENTRIES,
    *("run_id", "in_chans", "method", "optimizer", "scheduler", "scaler", "epoch", "step", "mid_epoch", "rng"),
    *("metrics", "data"),
)
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_ONE_MIB = 2**20


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, fsync it, then rename it onto ``path``.

    A crash or error at any point leaves the previous file at ``path`` untouched; after an error the temp file is
    removed (after a kill -9 it stays, named ``.<name>.*.tmp``, for ``remove_temp_files``). A full disk or a
    permission problem is a ``UnikdError`` that says so.
    """
    path = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as error:
        raise _write_error(path, error) from None
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0o600; a run's files are ordinary files
        os.replace(tmp_name, path)
    except BaseException as error:
        disk_full = _is_disk_full(error, path.parent)  # before unlinking: the temp file holds the last free bytes
        Path(tmp_name).unlink(missing_ok=True)
        if disk_full:
            raise UnikdError(
                f"disk full: could not write {path} ({_free_mib(path.parent)} MiB free); the previous {path.name} "
                "is intact. Free some space, or continue in another output_dir"
            ) from None
        if isinstance(error, OSError):
            raise _write_error(path, error) from None
        raise
    _fsync_directory(path.parent)


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` with ``torch.save`` through ``atomic_write`` (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda file: torch.save(state, file))


def load_checkpoint(path: str | os.PathLike, required: Iterable[str] = MODEL_ENTRIES) -> dict:
    """Load a unikd training checkpoint on the CPU without running code from it; a ``UnikdError`` when the file is
    not one, or lacks an entry of ``required`` (``MODEL_ENTRIES`` to rebuild the student, ``RESUME_ENTRIES``)."""
    path = Path(path)
    if not path.is_file():
        raise UnikdError(f"checkpoint not found: {path}")
    state = safe_torch_load(path)  # the one safe reader: nothing in the file is run; one-line errors
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UnikdError(f"{path} is not a unikd training checkpoint (no format={CHECKPOINT_FORMAT!r} entry)")
    version = state.get("version")
    if version not in READABLE_VERSIONS:
        raise UnikdError(f"{path}: checkpoint version {version!r} is not supported (expected 1 or 2)")
    missing = [key for key in required if key not in state]
    if missing and version == 1 and "run_id" in missing:
        raise UnikdError(
            f"{path} was written by an older unikd (checkpoint version 1), whose runs --resume cannot continue; "
            "start a new run (eval and export still read the file)"
        )
    if missing:
        raise UnikdError(
            f"{path}: the unikd checkpoint lacks {', '.join(missing)} (cut short or edited?); use a checkpoint "
            "written by unikd train"
        )
    _check_entry_types(state, path)
    return state


def load_student_weights(model: nn.Module, checkpoint: dict, source: str | os.PathLike) -> None:
    """Load ``checkpoint["model"]`` into ``model`` exactly (``unikd.models.load_exactly``); a one-line ``UnikdError``
    listing every missing, unexpected and mis-shaped entry when the weights do not fit."""
    described = f"{source} (weights for model_name {checkpoint['model_name']} with {checkpoint['num_classes']} classes)"
    try:
        load_exactly(model, checkpoint["model"], described)
    except ModelError as error:
        raise UnikdError(f"{error}; the file was edited or mixes two models") from None


def non_finite_entries(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """The names of the floating-point tensors that hold a NaN or an infinity.

    One ``isfinite(...).all()`` per tensor and a single device-to-host transfer for all of them, so it is cheap
    enough to run before every checkpoint.
    """
    named = [(name, tensor) for name, tensor in named_tensors if tensor.is_floating_point()]
    if not named:
        return []
    device = named[0][1].device
    finite = torch.stack([torch.isfinite(tensor).all().to(device) for _, tensor in named]).tolist()
    return [name for (name, _), ok in zip(named, finite) if not ok]


def non_finite_state(modules: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer | None = None) -> list[str]:
    """``non_finite_entries`` over the parameters and buffers of ``modules`` (``{"student": ..., ...}``; names come
    out as ``student.bn1.running_var``) and the state of ``optimizer`` (``optimizer.<parameter>.momentum_buffer``)."""
    named: list[tuple[str, torch.Tensor]] = []
    parameter_names = {}
    for prefix, module in modules.items():
        named += [(f"{prefix}.{name}", tensor) for name, tensor in module.state_dict(keep_vars=True).items()]
        parameter_names |= {id(p): f"{prefix}.{name}" for name, p in module.named_parameters()}
    if optimizer is not None:
        for parameter, slots in optimizer.state.items():
            owner = parameter_names.get(id(parameter), "parameter")
            named += [(f"optimizer.{owner}.{slot}", value) for slot, value in slots.items() if torch.is_tensor(value)]
    return non_finite_entries((name, tensor.detach()) for name, tensor in named)


def capture_rng_state() -> dict:
    """The states of Python's, NumPy's, torch's CPU and (when present) CUDA generators, as weights_only-safe types."""
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": bit_generator,
            "keys": keys.tolist(),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached_gaussian": cached_gaussian,
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict) -> None:
    """Inverse of ``capture_rng_state``. CUDA states are restored only when the device count matches."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["bit_generator"],
            np.array(numpy_state["keys"], dtype=np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- helpers -----------------------------------------------------------------------------------------------------


def _check_entry_types(state: dict, path: Path) -> None:
    expected = {"model_name": str, "num_classes": int, "model": dict, "config": dict, "in_chans": int, "step": int}
    wrong = [key for key, kind in expected.items() if key in state and not isinstance(state[key], kind)]
    model = state.get("model")
    if isinstance(model, dict) and not all(torch.is_tensor(value) for value in model.values()):
        wrong.append("model")
    if wrong:
        raise UnikdError(f"{path}: the unikd checkpoint has malformed entries: {', '.join(sorted(set(wrong)))}")


def _is_disk_full(error: BaseException, folder: Path) -> bool:
    if getattr(error, "errno", None) in _DISK_FULL_ERRNOS:
        return True
    # torch.save reports a failed write as a RuntimeError without the errno: look at the disk itself.
    return isinstance(error, RuntimeError) and _free_mib(folder) < 1


def _free_mib(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free // _ONE_MIB
    except OSError:
        return 0


def _write_error(path: Path, error: OSError) -> UnikdError:
    if error.errno in _DISK_FULL_ERRNOS:
        return UnikdError(f"disk full: could not write {path}; free some space, or use another output_dir")
    return UnikdError(f"cannot write {path}: {error.strerror or error}; check the folder's permissions or free space")


def _fsync_directory(folder: Path) -> None:
    """Make the rename itself durable (a power cut right after ``os.replace`` keeps the new file)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
