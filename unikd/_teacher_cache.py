"""The exact teacher-logit cache: a frozen teacher's logits for the deterministic augmentations of unikd._sampling,
stored once and read back by every run, sweep and seed that would compute them again.

    teacher_fp = teacher_fingerprint("cifar/resnet20", {}, teacher.state_dict(), device="cpu", amp="none", ...)
    data_fp = data_fingerprint(dataset="fashion_mnist", root=root, num_samples=len(train), transform=train_tf, ...)
    cache = TeacherCache(DIR, teacher=teacher_fp, data=data_fp, seed=0, num_classes=10, num_samples=len(train))
    cache.status(sampler.epoch_keys(epoch))     # CacheStatus(cached, total, reason): complete -> no teacher needed
    teacher_logits = cache.get(keys)            # (N, C) float32, or None (a miss: compute, then cache.put)
    cache.put(keys, teacher_logits)

What a logit is keyed by. An entry (a folder of ``DIR``) belongs to one teacher fingerprint (the weights' bytes,
model name and kwargs, and how the forward runs: device, AMP, memory format, per-process batch size, whose kernels
change the last bits), one data-pipeline fingerprint (dataset, root, subset, transform and its parameters, image
size, sampling scheme, library versions, MixUp/CutMix) and one storage dtype. Inside it, logits are stored per
(seed, epoch, row): the row is the sample index, or, where batch-level MixUp/CutMix mixes images (the data
fingerprint says ``keyed_by=batch``), ``batch * batch_size + slot`` (then the global batch size and the number of
processes are part of the data fingerprint, since each rank mixes its own share). A fingerprint mismatch is never
a stale read: it is a miss, and ``status`` / ``mismatch`` say which fields differ from the closest entry.

Exactness. float32 (the default) stores the teacher's float32 logits bit for bit, so training with a warm cache is
bit-identical to training with the live teacher. float16 halves the space (CIFAR-100: 10 MB instead of 20 MB an
epoch) and rounds each logit to the nearest half: a relative error of at most 2**-11 (about 4.9e-4; an absolute
0.005 at a logit of 10); runs are then no longer bit-identical to a live teacher. ``verify`` re-checks cached rows
against the live teacher (rounded to the storage dtype) and raises on any difference.

File format (version 1), under ``DIR``::

    <teacher digest 16>-<data digest 16>-<dtype>/
        meta.json                       both fingerprints' fields, dtype, classes (written once, atomically)
        seed-<seed>/epoch-<epoch>/
            <host>-<pid>-<random>.rec   one append-only file per writing process

A ``.rec`` file is a sequence of records, each one ``put`` (one batch or one rank's share)::

    header  40 bytes, little-endian: magic b"UKC1", dtype code (u8, 0 float32, 1 float16), 3 pad bytes,
            rows (u32), classes (u32), epoch (i64), CRC-32 of the row block (u32), CRC-32 of the logit block
            (u32), CRC-32 of the 32 bytes before it (u32), 4 pad bytes
    rows    rows x int64                the rows' keys (sample indices, or batch * batch_size + slot)
    logits  rows x classes x dtype      row-major

Why this survives kills and concurrent runs: every file has exactly one writer (its name is unique to the process),
so no two processes ever append to the same file and no lock is needed, on local disks or NFS alike. A record is
written by one ``write`` call; readers accept a record only when its header CRC matches, the file holds all of it,
and (when it is read) the CRC of its rows and logits matches. A writer killed mid-record leaves a short tail that
no reader accepts (a later run writes a file of its own); a failed write (disk full) is truncated away. Readers
scan the files incrementally, so logits another run appends meanwhile are found on the next miss. Two runs that
compute the same rows at once both store them (identical values; the first one found is read); nothing valid is
lost. ``meta.json`` is written to a temporary name and renamed into place.

Space: ``record_bytes`` / ``epoch_bytes`` give the size (CIFAR-100, batch 128: 390 records of 128 x 100 float32 =
20.4 MB an epoch); ``check_space`` refuses to start a run whose missing logits the disk cannot hold.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import re
import shutil
import socket
import struct
import types
import uuid
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unikd._errors import UnikdError
from unikd._sampling import BATCH, EPOCH, INDEX, SCHEME, SLOT

__all__ = [
    "DTYPES",
    "CacheStatus",
    "Fingerprint",
    "TeacherCache",
    "data_fingerprint",
    "epoch_bytes",
    "read_teacher_scores",
    "record_bytes",
    "root_identity",
    "teacher_fingerprint",
    "weights_digest",
    "write_teacher_scores",
]

FORMAT = "unikd-teacher-cache"
VERSION = 1
DTYPES = {"float32": (0, np.dtype("<f4")), "float16": (1, np.dtype("<f2"))}
_MAGIC = b"UKC1"
_HEADER = struct.Struct("<4sB3xIIqII")  # magic, dtype code, rows, classes, epoch, rows CRC, logits CRC
_HEADER_CRC = struct.Struct("<I4x")  # CRC of the above; the padding keeps the int64 rows 8-byte aligned
HEADER_BYTES = _HEADER.size + _HEADER_CRC.size  # 40
_FLOAT16_MAX = 65504.0
_EPOCH_INDICES_KEPT = 2  # the epoch being trained and the one before (verify, a resumed epoch)


# ---- fingerprints ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fingerprint:
    """What cached logits depend on: named fields (strings), hashed together into ``digest``."""

    kind: str  # "teacher" or "data"
    fields: Mapping[str, str]

    @property
    def digest(self) -> str:
        canonical = json.dumps({"kind": self.kind, "fields": dict(self.fields)}, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def differences(self, cached: Mapping[str, str]) -> list[str]:
        """``"<kind>.<field> (here ..., cached ...)"`` for every field that differs from ``cached``'s."""
        names = sorted(set(self.fields) | set(cached))
        return [
            f"{self.kind}.{name} ({_show_difference(self.fields.get(name), cached.get(name))})"
            for name in names
            if self.fields.get(name) != cached.get(name)
        ]


def weights_digest(state_dict: Mapping[str, Any]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``state_dict``'s tensors, in name order.

    About 0.1 s for ResNet-34's 87 MB on one CPU core (``hashlib.sha256`` runs at ~1 GB/s with SHA extensions).
    The same weights give the same digest whichever file layout they were read from.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        value = state_dict[name]
        digest.update(name.encode() + b"\0")
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}\0".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
        else:  # a module's extra state
            digest.update(repr(value).encode() + b"\0")
    return "sha256:" + digest.hexdigest()


def teacher_fingerprint(
    model: str, model_kwargs: Mapping[str, Any], state_dict: Mapping[str, Any], **compute: Any
) -> Fingerprint:
    """The teacher's identity: model name, kwargs, ``weights_digest(state_dict)``, and ``compute`` fields saying how
    its forward runs (``device``, ``amp``, ``memory_format``, ``batch_size`` per process, ...): other kernels give
    other last bits, so a logit cached under one setting is not reused under another.
    """
    fields = {
        "model": model,
        "kwargs": json.dumps(dict(model_kwargs), sort_keys=True, default=str),
        "weights": weights_digest(state_dict),
        "torch": torch.__version__,
    }
    fields.update({name: str(value) for name, value in compute.items()})
    return Fingerprint("teacher", fields)


def data_fingerprint(
    *,
    dataset: str,
    root: str | Path | None,
    num_samples: int,
    transform: Any,
    img_size: int,
    subset: Sequence[int] | None = None,
    mix: str | None = None,
    batch_size: int | None = None,
    world_size: int | None = None,
    **extra: Any,
) -> Fingerprint:
    """The training images' identity: ``dataset`` name, ``root_identity(root)``, ``num_samples``, the ``subset``
    indices (None: the whole set), the transform's repr and a digest of all its parameters, ``img_size``, the
    sampling scheme, the versions of the libraries that draw augmentations, and ``mix`` (e.g. ``"mixup=0.8
    cutmix=1.0"``; None: off). With ``mix`` the cache is keyed by (batch, slot) and ``batch_size`` (global) and
    ``world_size`` become part of it. ``extra`` fields are added as strings. The seed is not part of it: it is a
    level of the cache's key.
    """
    keyed_by = "sample" if mix is None else "batch"
    if keyed_by == "batch" and (batch_size is None or world_size is None):
        raise ValueError("data_fingerprint: mix needs batch_size and world_size (each rank mixes its own share)")
    fields = {
        "dataset": dataset,
        "root": root_identity(root),
        "num_samples": str(num_samples),
        "subset": "all" if subset is None else f"{len(subset)}:" + _array_digest(np.asarray(subset, dtype="<i8")),
        "transform": _normalised_repr(transform),
        "transform_params": "sha256:" + hashlib.sha256(json.dumps(_describe(transform)).encode()).hexdigest(),
        "img_size": str(img_size),
        "sampling": SCHEME,
        "libraries": _library_versions(),  # another torchvision or timm may draw other crops from the same seed
        "keyed_by": keyed_by,
        "mix": "none" if mix is None else mix,
    }
    if keyed_by == "batch":
        fields.update(batch_size=str(batch_size), world_size=str(world_size))
    fields.update({name: str(value) for name, value in extra.items()})
    return Fingerprint("data", fields)


def root_identity(root: str | Path | None, max_entries: int = 4096) -> str:
    """The resolved path of ``root`` and a digest of (name, size, mtime) of the entries one and two levels below
    it (at most ``max_entries``): replaced files or class folders change it, listing an ImageFolder's 1.28M images
    is avoided."""
    if root is None:
        return "none"
    path = Path(root).expanduser().resolve()
    entries = []
    with contextlib.suppress(OSError):
        for first in sorted(os.scandir(path), key=lambda entry: entry.name):
            entries.append(_stat_line(first, first.name))
            if first.is_dir():
                for second in sorted(os.scandir(first.path), key=lambda entry: entry.name):
                    entries.append(_stat_line(second, f"{first.name}/{second.name}"))
                    if len(entries) >= max_entries:
                        break
            if len(entries) >= max_entries:
                break
    return f"{path} sha256:" + hashlib.sha256("\n".join(entries).encode()).hexdigest()[:32]


def _library_versions() -> str:
    versions = []
    for name in ("torch", "torchvision", "timm", "pillow", "numpy"):
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} none")
    return ", ".join(versions)


def _stat_line(entry: os.DirEntry, name: str) -> str:
    stat = entry.stat()
    return f"{name}\0{stat.st_size if entry.is_file() else 'dir'}\0{stat.st_mtime_ns}"


def _array_digest(array: np.ndarray) -> str:
    return "sha256:" + hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _normalised_repr(value: Any) -> str:
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))  # object addresses differ from run to run


# nn.Module bookkeeping that says nothing about what a transform computes
_MODULE_INTERNALS = {
    "_backward_hooks", "_backward_pre_hooks", "_forward_hooks", "_forward_hooks_always_called",
    "_forward_hooks_with_kwargs", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_is_full_backward_hook",
    "_load_state_dict_post_hooks", "_load_state_dict_pre_hooks", "_non_persistent_buffers_set", "_state_dict_hooks",
    "_state_dict_pre_hooks",
}  # fmt: skip


def _describe(value: Any, depth: int = 0, seen: frozenset = frozenset()) -> Any:
    """A JSON-able description of everything in a transform that can change its output: types, attributes (also
    private ones, which the repr leaves out: e.g. ``ToDtype``'s dtype), tensors by digest, functions by code."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        array = value.detach().cpu() if isinstance(value, torch.Tensor) else value
        shape, dtype = tuple(array.shape), str(array.dtype)
        if isinstance(array, torch.Tensor):
            array = array.contiguous().reshape(-1).view(torch.uint8).numpy()
        return ["array", dtype, shape, _array_digest(array)]
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, (types.BuiltinFunctionType, torch.dtype, torch.device)) or depth > 12 or id(value) in seen:
        return _normalised_repr(value)
    seen = seen | {id(value)}
    if isinstance(value, types.MethodType):
        return ["method", _describe(value.__func__, depth + 1, seen), _describe(value.__self__, depth + 1, seen)]
    if isinstance(value, types.FunctionType):  # its code, constants, defaults and closure (lambdas differ there)
        code = value.__code__
        body = hashlib.sha256(code.co_code + _normalised_repr(code.co_consts).encode()).hexdigest()[:16]
        cells = [_describe(_cell_contents(cell), depth + 1, seen) for cell in value.__closure__ or ()]
        defaults = _describe(value.__defaults__, depth + 1, seen)
        return ["function", f"{value.__module__}.{value.__qualname__}", body, defaults, cells]
    if isinstance(value, functools.partial):
        return ["partial", *(_describe(part, depth + 1, seen) for part in (value.func, value.args, value.keywords))]
    if isinstance(value, (list, tuple)):
        return [type(value).__name__, [_describe(item, depth + 1, seen) for item in value]]
    if isinstance(value, (set, frozenset)):
        return ["set", sorted(json.dumps(_describe(item, depth + 1, seen)) for item in value)]
    if isinstance(value, Mapping):
        items = [[_describe(key, depth + 1, seen), _describe(item, depth + 1, seen)] for key, item in value.items()]
        return ["dict", sorted(items, key=json.dumps)]
    attributes = getattr(value, "__dict__", None)
    if attributes is None:
        return _normalised_repr(value)
    described = {
        name: _describe(item, depth + 1, seen) for name, item in attributes.items() if name not in _MODULE_INTERNALS
    }
    return [f"{type(value).__module__}.{type(value).__qualname__}", described]


def _cell_contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _show_difference(here: str | None, cached: str | None, context: int = 40) -> str:
    """``here X, cached Y``, long strings cut to the neighbourhood of their first difference."""
    if here is None or cached is None or (len(here) <= 2 * context and len(cached) <= 2 * context):
        return f"here {here!r}, cached {cached!r}"
    start = next((i for i, (a, b) in enumerate(zip(here, cached)) if a != b), min(len(here), len(cached)))
    begin = max(0, start - context // 2)

    def cut(text: str) -> str:
        return ("..." if begin else "") + repr(text[begin : begin + context])[1:-1] + "..."

    return f"here '{cut(here)}', cached '{cut(cached)}'"


# ---- sizes -------------------------------------------------------------------------------------------------------


def record_bytes(rows: int, num_classes: int, dtype: str = "float32") -> int:
    """Bytes of one record of ``rows`` logits rows."""
    return HEADER_BYTES + rows * (8 + num_classes * DTYPES[dtype][1].itemsize)


def epoch_bytes(rows: int, rows_per_record: int, num_classes: int, dtype: str = "float32") -> int:
    """Bytes of an epoch of ``rows`` logits rows written ``rows_per_record`` at a time (the per-process batch)."""
    full, rest = divmod(rows, rows_per_record)
    return full * record_bytes(rows_per_record, num_classes, dtype) + (
        record_bytes(rest, num_classes, dtype) if rest else 0
    )


# ---- what else a run needs of the teacher -------------------------------------------------------------------------


def read_teacher_scores(root: str | Path, teacher: Fingerprint, data: Fingerprint) -> dict | None:
    """The validation scores of ``teacher`` on the validation images ``data`` stored by ``write_teacher_scores``
    (e.g. ``{"top1": 93.1}``), or None: with them and a complete cache a run needs no teacher at all."""
    path = _scores_path(root, teacher, data)
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("teacher") != teacher.digest or stored.get("data") != data.digest:
        return None
    scores = stored.get("scores")
    return scores if isinstance(scores, dict) else None


def write_teacher_scores(
    root: str | Path, teacher: Fingerprint, data: Fingerprint, scores: Mapping[str, float]
) -> None:
    """Store ``scores`` under ``root/teacher-scores/`` (atomically: a temporary file renamed into place)."""
    path = _scores_path(root, teacher, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"teacher": teacher.digest, "data": data.digest, "data_fields": dict(data.fields), "scores": dict(scores)}
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    temporary.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(temporary, path)


def _scores_path(root: str | Path, teacher: Fingerprint, data: Fingerprint) -> Path:
    return Path(root).expanduser() / "teacher-scores" / f"{teacher.digest[:16]}-{data.digest[:16]}.json"


def _size(count: int) -> str:
    """Bytes in words: ``"4891.9 MB"``, or ``"464 bytes"`` under 0.1 MB."""
    return f"{count / 1e6:.1f} MB" if count >= 100_000 else f"{count} bytes"


# ---- the cache ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheStatus:
    """How many of the asked-for teacher logits are cached, and when not all are, why."""

    cached: int
    total: int
    reason: str | None = None

    @property
    def complete(self) -> bool:
        return self.cached == self.total


class TeacherCache:
    """The cached logits of one (teacher, data pipeline, dtype) entry under ``root``, for one ``seed``.

    ``num_samples`` is the training set's size (its indices are the rows; with ``keyed_by=batch`` the rows are
    ``batch * batch_size + slot`` for ``num_samples // batch_size`` batches). Keys are ``(N, 4)`` int64 rows
    ``(epoch, batch, slot, index)`` as unikd._sampling yields them; one call takes keys of a single epoch.
    Opening creates nothing; the first ``put`` creates the entry. Not thread-safe; one object per process.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        teacher: Fingerprint,
        data: Fingerprint,
        seed: int,
        num_classes: int,
        num_samples: int,
        dtype: str = "float32",
    ) -> None:
        if dtype not in DTYPES:
            raise UnikdError(f"teacher cache dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
        self.root, self.teacher, self.data = Path(root).expanduser(), teacher, data
        self.seed, self.num_classes, self.dtype = seed, num_classes, dtype
        self.dtype_code, self.np_dtype = DTYPES[dtype]
        self.keyed_by = data.fields.get("keyed_by", "sample")
        self.batch_size = int(data.fields["batch_size"]) if self.keyed_by == "batch" else None
        self.rows_per_epoch = (
            num_samples if self.batch_size is None else num_samples // self.batch_size * self.batch_size
        )
        self.entry_dir = self.root / f"{teacher.digest[:16]}-{data.digest[:16]}-{dtype}"
        self._seed_dir = self.entry_dir / f"seed-{seed}"
        self._indices: dict[int, _EpochIndex] = {}
        self._writer: _Writer | None = None
        self._mismatch: str | None = None
        self._mismatch_known = False

    # -- queries ---------------------------------------------------------------------------------------------------

    @property
    def mismatch(self) -> str | None:
        """Why this entry does not exist while others do (the closest entry's differing fields); None otherwise."""
        if not self._mismatch_known:
            self._mismatch, self._mismatch_known = self._find_mismatch(), True
        return self._mismatch

    def status(self, keys: torch.Tensor) -> CacheStatus:
        """How many of ``keys``' rows (one epoch's, e.g. ``EpochBatchSampler.epoch_keys(epoch)``) are cached.

        Reads only record headers and row blocks, never logits: the trainer learns up front, without the teacher,
        whether an epoch (or the run) is complete.
        """
        epoch, rows = self._rows(keys)
        index = self._index(epoch)
        index.scan()
        cached = int((index.record[rows] >= 0).sum())
        if cached == len(rows):
            return CacheStatus(cached, len(rows))
        if not cached and self.mismatch is not None:
            return CacheStatus(cached, len(rows), self.mismatch)
        reason = f"{len(rows) - cached} of {len(rows)} teacher logits of seed {self.seed}, epoch {epoch} are not cached"
        if index.damaged:
            reason += f" ({index.damaged} damaged records ignored)"
        elif not cached and not self._seed_dir.is_dir():
            seeds = [path.name.removeprefix("seed-") for path in _subdirs(self.entry_dir)]
            reason += f" (cached seeds: {', '.join(seeds)})" if seeds else ""
        return CacheStatus(cached, len(rows), reason)

    def get(self, keys: torch.Tensor) -> torch.Tensor | None:
        """The (N, num_classes) float32 logits of ``keys``' rows, or None when any of them is not cached (or its
        record fails its checksum: that record is then dropped from the index, so the rows count as missing)."""
        epoch, rows = self._rows(keys)
        index = self._index(epoch)
        records = index.record[rows]
        if (records < 0).any():
            index.scan()
            records = index.record[rows]
            if (records < 0).any():
                return None
        logits = np.empty((len(rows), self.num_classes), dtype=self.np_dtype)
        for record in np.unique(records):
            block = index.read_logits(int(record))
            if block is None:
                return None
            chosen = records == record
            logits[chosen] = block[index.row[rows[chosen]]]
        return torch.from_numpy(logits).float()

    def verify(self, keys: torch.Tensor, live_logits: torch.Tensor) -> int:
        """Compare the cached rows of ``keys`` with ``live_logits`` (N, C) from the live teacher, rounded to the
        storage dtype; return how many rows were compared (0 when they are not cached). Raises ``UnikdError``
        naming the first differing key and the largest difference."""
        cached = self.get(keys)
        if cached is None:
            return 0
        live = live_logits.detach().float().cpu()
        if self.dtype == "float16":
            live = live.half().float()
        same = (cached == live) | (cached.isnan() & live.isnan())
        if bool(same.all()):
            return len(cached)
        bad_rows = (~same).any(dim=1).nonzero().flatten()
        first = keys[int(bad_rows[0])].tolist()
        largest = float((cached - live).abs().nan_to_num(nan=math.inf).max())
        raise UnikdError(
            f"teacher cache {self.entry_dir}: the cached logits of seed {self.seed}, epoch {first[EPOCH]}, "
            f"{self._describe_key(first)} differ from the live teacher's by up to {largest:.3g} ({len(bad_rows)} of "
            f"{len(cached)} rows differ); the cache is stale (a change the fingerprints do not see) or the teacher "
            f"is not deterministic here: delete {self.entry_dir}, or set train.teacher_cache=null"
        )

    def stored_bytes(self, epochs: Iterable[int] | None = None) -> int:
        """Bytes of this seed's record files (of ``epochs``, default all; every writer's): with ``epoch_bytes`` a
        cheap estimate of what a run still has to write, without scanning the records (two runs that wrote the same
        rows count twice)."""
        folders = [f"epoch-{epoch:05d}" for epoch in epochs] if epochs is not None else ["epoch-*"]
        return sum(path.stat().st_size for folder in folders for path in self._seed_dir.glob(f"{folder}/*.rec"))

    def check_space(self, epochs: int, rows_per_epoch: int, *, rows_per_record: int, stored: int = 0) -> int:
        """Raise ``UnikdError`` when the disk under ``root`` cannot hold ``epochs`` epochs of ``rows_per_epoch``
        logits rows written ``rows_per_record`` at a time (the per-process batch), less ``stored`` bytes already
        there (e.g. ``stored_bytes(range(start_epoch, epochs))``); return the bytes still needed."""
        per_epoch = epoch_bytes(rows_per_epoch, rows_per_record, self.num_classes, self.dtype)
        needed = max(0, epochs * per_epoch - stored)
        existing = next(parent for parent in [self.root, *self.root.parents] if parent.exists())
        free = shutil.disk_usage(existing).free
        if needed > free:
            smaller = "set train.teacher_cache_dtype=float16 (half the size), " if self.dtype == "float32" else ""
            raise UnikdError(
                f"teacher cache {self.root}: this run needs {_size(needed)} more for {epochs} epoch"
                f"{'s' * (epochs != 1)} of teacher logits ({_size(per_epoch)} an epoch: {rows_per_epoch} x "
                f"{self.num_classes} {self.dtype}) but its disk has {_size(free)} free; free space, {smaller}point "
                "train.teacher_cache at a bigger disk, or set train.teacher_cache=null"
            )
        return needed

    # -- writing ---------------------------------------------------------------------------------------------------

    def put(self, keys: torch.Tensor, logits: torch.Tensor) -> None:
        """Append ``logits`` (N, num_classes), the teacher's outputs for ``keys``' rows, as one record."""
        epoch, rows = self._rows(keys)
        if tuple(logits.shape) != (len(rows), self.num_classes):
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} for {len(rows)} keys and {self.num_classes} classes"
            )
        values = logits.detach().float().cpu().numpy()
        if self.dtype == "float16" and np.abs(values[np.isfinite(values)]).max(initial=0.0) > _FLOAT16_MAX:
            raise UnikdError(
                f"teacher cache {self.root}: teacher logits beyond {_FLOAT16_MAX:.0f} do not fit float16; set "
                "train.teacher_cache_dtype=float32"
            )
        rows_block = rows.astype("<i8").tobytes()
        logits_block = np.ascontiguousarray(values.astype(self.np_dtype)).tobytes()
        head = _HEADER.pack(
            _MAGIC,
            self.dtype_code,
            len(rows),
            self.num_classes,
            epoch,
            zlib.crc32(rows_block),
            zlib.crc32(logits_block),
        )
        record = head + _HEADER_CRC.pack(zlib.crc32(head)) + rows_block + logits_block
        if self._writer is None or self._writer.epoch != epoch:
            self._close_writer()
            self._ensure_entry()
            self._writer = _Writer(self._seed_dir / f"epoch-{epoch:05d}", epoch)
        self._writer.append(record, self.root)

    def close(self) -> None:
        """Flush the record file being written to disk and close every file."""
        self._close_writer()
        for index in self._indices.values():
            index.close()
        self._indices.clear()

    def __enter__(self) -> TeacherCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------------------------

    def _rows(self, keys: torch.Tensor) -> tuple[int, np.ndarray]:
        keys = torch.as_tensor(keys, dtype=torch.int64).cpu()
        if keys.ndim != 2 or keys.shape[1] != 4 or not len(keys):
            raise ValueError(
                f"keys must be a non-empty (N, 4) tensor of (epoch, batch, slot, index), got {tuple(keys.shape)}"
            )
        epoch = int(keys[0, EPOCH])
        if bool((keys[:, EPOCH] != epoch).any()):
            raise ValueError("keys of one call must all belong to one epoch")
        if self.batch_size is None:
            rows = keys[:, INDEX].numpy()
        else:
            rows = (keys[:, BATCH] * self.batch_size + keys[:, SLOT]).numpy()
        if rows.min() < 0 or rows.max() >= self.rows_per_epoch:
            raise ValueError(f"keys address rows outside [0, {self.rows_per_epoch}) (another dataset or batch size?)")
        return epoch, rows

    def _index(self, epoch: int) -> _EpochIndex:
        index = self._indices.pop(epoch, None)
        if index is None:
            folder = self._seed_dir / f"epoch-{epoch:05d}"
            index = _EpochIndex(folder, self.rows_per_epoch, self.num_classes, self.dtype_code, self.np_dtype)
            while len(self._indices) >= _EPOCH_INDICES_KEPT:
                self._indices.pop(next(iter(self._indices))).close()
        self._indices[epoch] = index  # most recently used last
        return index

    def _meta(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "dtype": self.dtype,
            "num_classes": self.num_classes,
            "teacher": {"digest": self.teacher.digest, "fields": dict(self.teacher.fields)},
            "data": {"digest": self.data.digest, "fields": dict(self.data.fields)},
        }

    def _ensure_entry(self) -> None:
        meta_path = self.entry_dir / "meta.json"
        if meta_path.is_file():
            stored = _read_meta(meta_path)
            if (
                stored is None
                or stored["teacher"]["digest"] != self.teacher.digest
                or stored["data"]["digest"] != (self.data.digest)
            ):
                raise UnikdError(f"teacher cache {meta_path}: unreadable or written for other fingerprints; delete it")
            return
        self.entry_dir.mkdir(parents=True, exist_ok=True)
        temporary = meta_path.with_name(f".meta.{uuid.uuid4().hex}.tmp")
        temporary.write_text(json.dumps(self._meta(), indent=1, sort_keys=True) + "\n")
        os.replace(temporary, meta_path)  # concurrent writers write the same content; either rename wins
        self._mismatch, self._mismatch_known = None, True

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _find_mismatch(self) -> str | None:
        if (self.entry_dir / "meta.json").is_file():
            return None
        entries = [(path, meta) for path in _subdirs(self.root) if (meta := _read_meta(path / "meta.json"))]
        if not entries:
            return None
        for path, meta in entries:
            if meta["teacher"]["digest"] == self.teacher.digest and meta["data"]["digest"] == self.data.digest:
                return (
                    f"teacher cache {self.root}: the logits of this teacher and data pipeline are cached as "
                    f"{meta['dtype']} ({path.name}), this run stores {self.dtype}"
                )

        def differences(meta: dict) -> list[str]:
            return self.teacher.differences(meta["teacher"]["fields"]) + self.data.differences(meta["data"]["fields"])

        path, meta = min(entries, key=lambda entry: (len(differences(entry[1])), entry[0].name))
        return (
            f"teacher cache {self.root}: no logits for this teacher and data pipeline; the closest entry "
            f"({path.name}) differs in {'; '.join(differences(meta))}"
        )

    def _describe_key(self, key: list[int]) -> str:
        if self.batch_size is None:
            return f"sample {key[INDEX]}"
        return f"batch {key[BATCH]} slot {key[SLOT]} (sample {key[INDEX]})"


def _subdirs(path: Path) -> list[Path]:
    try:
        return sorted(entry for entry in path.iterdir() if entry.is_dir())
    except OSError:
        return []


def _read_meta(path: Path) -> dict | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT and meta.get("version") == VERSION else None


class _Writer:
    """This process's append-only record file of one epoch (created on first use, never shared)."""

    def __init__(self, folder: Path, epoch: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.epoch = epoch
        self.path = folder / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.rec"
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        self.size = 0

    def append(self, record: bytes, root: Path) -> None:
        view = memoryview(record)
        try:
            while view:  # one write() in practice; the loop covers a short write
                view = view[os.write(self.fd, view) :]
        except OSError as error:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)  # leave no partial record behind
            raise UnikdError(
                f"teacher cache {root}: writing {self.path} failed ({error.strerror}); free space or turn the cache off"
            ) from None
        self.size += len(record)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.fsync(self.fd)
        os.close(self.fd)


@dataclass
class _RecordFile:
    fd: int
    offset: int = 0  # records before it are indexed
    dead: bool = False  # a bad header: nothing after it can be trusted


class _EpochIndex:
    """Where each row of one (seed, epoch) is stored: ``record[row]`` (-1: not cached) and ``row[row]``, over every
    writer's file in the epoch's folder, scanned incrementally."""

    def __init__(self, folder: Path, rows: int, num_classes: int, dtype_code: int, np_dtype: np.dtype) -> None:
        self.folder, self.num_classes, self.dtype_code, self.np_dtype = folder, num_classes, dtype_code, np_dtype
        self.record = np.full(rows, -1, dtype=np.int64)
        self.row = np.zeros(rows, dtype=np.int64)
        self.records: list[tuple[_RecordFile, int, int, int]] = []  # (file, logits offset, rows, logits CRC)
        self.files: dict[str, _RecordFile] = {}
        self.damaged = 0  # records whose checksums failed (not a torn tail, which is never complete)

    def scan(self) -> None:
        try:
            names = sorted(name for name in os.listdir(self.folder) if name.endswith(".rec"))
        except FileNotFoundError:
            return
        for name in names:
            record_file = self.files.get(name)
            if record_file is None:
                try:
                    record_file = self.files[name] = _RecordFile(os.open(self.folder / name, os.O_RDONLY))
                except FileNotFoundError:  # deleted meanwhile
                    continue
            if not record_file.dead:
                self._scan_file(record_file)

    def _scan_file(self, record_file: _RecordFile) -> None:
        size = os.fstat(record_file.fd).st_size
        while record_file.offset + HEADER_BYTES <= size:
            start = record_file.offset
            header = os.pread(record_file.fd, HEADER_BYTES, start)
            head, (header_crc,) = header[: _HEADER.size], _HEADER_CRC.unpack(header[_HEADER.size :])
            magic, dtype_code, rows, classes, _, rows_crc, logits_crc = _HEADER.unpack(head)
            if magic != _MAGIC or zlib.crc32(head) != header_crc:
                record_file.dead = True  # a damaged or foreign header: its length cannot be trusted
                self.damaged += 1
                return
            logits_size = rows * classes * self.np_dtype.itemsize
            end = start + HEADER_BYTES + 8 * rows + logits_size
            if end > size:
                return  # still being written, or torn by a kill: not accepted (yet)
            record_file.offset = end
            rows_block = os.pread(record_file.fd, 8 * rows, start + HEADER_BYTES)
            if zlib.crc32(rows_block) != rows_crc or dtype_code != self.dtype_code or classes != self.num_classes:
                self.damaged += 1
                continue
            keys = np.frombuffer(rows_block, dtype="<i8")
            if keys.min(initial=0) < 0 or keys.max(initial=0) >= len(self.record):
                continue
            number = len(self.records)
            self.records.append((record_file, start + HEADER_BYTES + 8 * rows, rows, logits_crc))
            new = self.record[keys] < 0  # the first record found for a row is the one read
            self.record[keys[new]], self.row[keys[new]] = number, np.flatnonzero(new)

    def read_logits(self, number: int) -> np.ndarray | None:
        record_file, offset, rows, crc = self.records[number]
        block = os.pread(record_file.fd, rows * self.num_classes * self.np_dtype.itemsize, offset)
        if zlib.crc32(block) != crc:
            self.record[self.record == number] = -1  # damaged: its rows are missing until a run stores them again
            self.damaged += 1
            return None
        return np.frombuffer(block, dtype=self.np_dtype).reshape(rows, self.num_classes)

    def close(self) -> None:
        for record_file in self.files.values():
            with contextlib.suppress(OSError):
                os.close(record_file.fd)
        self.files.clear()
