"""Training checkpoints: atomic save, safe load, and the random-number-generator states that make resume exact.

A checkpoint is a plain dict (format below) written with ``torch.save`` and read with ``weights_only=True``, so it
holds only tensors and Python primitives::

    {"format": "unikd-checkpoint", "version": 1, "model_name": str, "num_classes": int,
     "model": student state_dict, "method": method state_dict (USKD's weak head), "optimizer", "scheduler", "scaler",
     "epoch": epoch in progress (0-based; == epochs done when saved at an epoch boundary),
     "step": optimizer steps done, "rng": capture_rng_state(), "config": plain dict, "metrics": {...}}

The data order needs no generator state: each epoch's order is a function of (seed, epoch) (``DistributedSampler``)
and the position inside the epoch is ``step - epoch * steps_per_epoch``.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from unikd._errors import UnikdError

CHECKPOINT_FORMAT = "unikd-checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically: a temp file in the same directory, fsync, then ``os.replace``.

    A crash or error while writing leaves any previous file at ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0o600; a checkpoint is an ordinary file
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a unikd training checkpoint (on CPU, ``weights_only=True``); a clear ``UnikdError`` if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UnikdError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UnikdError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UnikdError(f"{path} is not a unikd training checkpoint (no format={CHECKPOINT_FORMAT!r} entry)")
    if state.get("version") != CHECKPOINT_VERSION:
        raise UnikdError(f"{path}: checkpoint version {state.get('version')} is not supported (expected 1)")
    return state


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
