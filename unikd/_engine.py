"""The loop helpers both training engines run on: ``unikd.train`` (classification) and ``unikd.detection.train``.

    with determinism(cfg.train.deterministic), graceful_stop() as stop, run_directory(out, resume, info, device):
        check_run_settings(cfg.train, device, info.world_size)
        checkpoint = resume_checkpoint(out, info, device) if resume else None   # repaired set, on every rank
        seed_everything(cfg.train.seed)
        loader, sampler = training_loader(dataset, cfg.data, cfg.train.batch_size, ...)   # order = f(seed, epoch)
        ...
        non_finite, stop_requested = check_step(loss, stop, ...)   # one agreement per step, before backward
        optimizer_step(loss, optimizer, scaler, parameters)
        if stop_requested: save last.pt, then raise_for_signal(stop.signum, last_path, is_main)

Each helper is the one implementation of its concern: seeding and deterministic kernels, the run directory (rank 0
creates, locks and checks it; every rank learns the outcome), the first SIGINT/SIGTERM turned into a stop after the
current step, data loaders whose order is a function of (seed, epoch) and whose workers leave signals to the main
process, the per-step agreement of all ranks on a non-finite loss and a stop request, the train record of a log
window, the optimizer step, and the checks of a resume (checkpoint set repaired, config the run's own but for the
keys that may change). The engines keep what differs: their models, data, evaluation and checkpoint contents.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import random
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from unikd._checkpoint import RESUME_ENTRIES, load_checkpoint
from unikd._distributed import DistInfo, all_reduce
from unikd._errors import UnikdError
from unikd._logging import MetricsWriter, console
from unikd._rundir import (
    BEST,
    CONFIG,
    LAST,
    check_writable,
    lock_run_directory,
    prepare_output_dir,
    reconcile_checkpoints,
    remove_temp_files,
)
from unikd.config import config_changes, config_to_dict

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
T = TypeVar("T")

__all__ = [
    "AMP_DTYPES",
    "EpochSampler",
    "StopRequest",
    "check_resume_config",
    "check_run_settings",
    "check_step",
    "determinism",
    "evaluation_loader",
    "graceful_stop",
    "log_train_window",
    "non_finite_loss_message",
    "non_finite_state_message",
    "on_main_rank",
    "optimizer_step",
    "raise_for_signal",
    "raise_on_any_rank",
    "resume_checkpoint",
    "run_directory",
    "seed_everything",
    "stop_data_workers",
    "training_loader",
    "worker_kwargs",
    "wrap_ddp",
]


# ---- set-up ------------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def determinism(deterministic: bool) -> Iterator[None]:
    """Deterministic kernels (warn-only where torch has none) while training; global flags restored afterwards."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for reproducible matmuls
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = deterministic, not deterministic
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


def check_run_settings(train_cfg: Any, device: torch.device, world_size: int) -> None:
    """Refuse what cannot run here: fp16 without CUDA, a ``train.batch_size`` that does not split over the ranks."""
    if train_cfg.amp == "fp16" and device.type != "cuda":
        raise UnikdError("train.amp: 'fp16' needs CUDA (its GradScaler); on CPU use train.amp=bf16 or none")
    if train_cfg.batch_size % world_size:
        raise UnikdError(
            f"train.batch_size: {train_cfg.batch_size} does not split over {world_size} processes; use a multiple "
            f"of {world_size}"
        )


def wrap_ddp(module: nn.Module, device: torch.device) -> DistributedDataParallel:
    """``module`` in ``DistributedDataParallel`` on ``device`` (its CUDA index, or none on the CPU)."""
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


# ---- ranks -------------------------------------------------------------------------------------------------------


def on_main_rank(check: Callable[[], T], dist_info: DistInfo, device: torch.device) -> T | None:
    """Run ``check`` on rank 0 only (the rank that owns the files) and return its result; when it raises a
    ``UnikdError``, every rank raises one, instead of the others waiting forever. A collective: every rank calls it."""
    result, error = None, None
    if dist_info.is_main:
        try:
            result = check()
        except UnikdError as caught:
            error = caught
    raise_on_any_rank(error, dist_info, device)
    return result


def raise_on_any_rank(error: UnikdError | None, dist_info: DistInfo, device: torch.device) -> None:
    """Raise ``error`` here, and a short error on every other rank, when any rank has one (a collective: all call)."""
    if dist_info.is_distributed:
        failed = all_reduce(torch.tensor(float(error is not None), device=device), op="max").item()
        if failed and error is None:
            raise UnikdError("another process of this job failed while setting up; see rank 0's message")
    if error is not None:
        raise error


# ---- the run directory and resume ---------------------------------------------------------------------------------


@contextlib.contextmanager
def run_directory(
    output_dir: str | os.PathLike, resume: bool, dist_info: DistInfo, device: torch.device
) -> Iterator[Path]:
    """Rank 0 creates, locks and checks ``output_dir`` for the whole run; every rank learns whether that worked.

    A new run refuses a folder that holds a checkpoint, ``resume`` one that holds none.
    """
    with contextlib.ExitStack() as stack:

        def claim() -> None:
            path = prepare_output_dir(output_dir)
            stack.enter_context(lock_run_directory(path))
            remove_temp_files(path)
            _check_run_kind(path, resume)
            check_writable(path)

        on_main_rank(claim, dist_info, device)
        yield Path(output_dir)


def _check_run_kind(output_dir: Path, resume: bool) -> None:
    found = [output_dir / name for name in (LAST, BEST) if (output_dir / name).is_file()]
    if resume and not found:
        raise UnikdError(
            f"--resume: no checkpoint {output_dir / LAST} to resume from; run without --resume to start a new run there"
        )
    if not resume and found:
        raise UnikdError(
            f"output_dir {output_dir} already holds a run ({found[0]}); pass --resume to continue it, "
            "or choose another output_dir"
        )


def resume_checkpoint(
    output_dir: Path,
    dist_info: DistInfo,
    device: torch.device,
    *,
    load: Callable[[Path], dict] = lambda path: load_checkpoint(path, RESUME_ENTRIES),
    unit: str = "epoch",
) -> dict:
    """``last.pt``, after rank 0 repaired the checkpoint set (``unikd._rundir.reconcile_checkpoints``, evaluation
    points counted in ``unit``) and printed each repair; ``load`` reads (and may refuse) a checkpoint file."""
    repaired = on_main_rank(lambda: reconcile_checkpoints(output_dir, load, unit=unit), dist_info, device)
    checkpoint, notes = repaired or (load(output_dir / LAST), [])  # the other ranks read it after rank 0's repair
    for note in notes:
        console(f"unikd: resume: {note}")
    return checkpoint


def check_resume_config(
    stored: dict, cfg: Any, *, from_dict: Callable[..., Any], safe: Iterable[str], output_dir: Path
) -> dict[str, tuple[Any, Any]]:
    """The config keys a resume changes (``{key: (old, new)}``), all of them in ``safe``.

    ``stored`` is the checkpoint's config (plain dict), read back with ``from_dict`` (its schema's, files unchecked);
    a change to any key not in ``safe`` raises a ``UnikdError`` that lists every such key.
    """
    safe = tuple(safe)
    with warnings.catch_warnings():  # the stored config's own warnings were shown when it was first loaded
        warnings.simplefilter("ignore")
        resolved = config_to_dict(from_dict(stored, check_files=False))
    changes = config_changes(resolved, config_to_dict(cfg))
    refused = {key: change for key, change in changes.items() if key not in safe}
    if refused:
        listing = "; ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in refused.items())
        raise UnikdError(
            f"--resume: the config differs from the one {output_dir / LAST} was trained with: {listing}. Only "
            f"{', '.join(safe)} may change on resume; resume with the run's config ({output_dir / CONFIG}), or start "
            "a new run in another output_dir"
        )
    return changes


# ---- data --------------------------------------------------------------------------------------------------------


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` (order = f(seed, epoch), this rank's share) that can start ``start`` indices in.

    Setting ``start`` replays a resumed epoch's order without loading, or drawing random numbers for, the batches
    already trained on. With one process it is an ordinary seeded shuffle.
    """

    start: int = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return super().__len__() - self.start


def training_loader(
    dataset: Dataset,
    data_cfg: Any,
    batch_size: int,
    *,
    seed: int,
    generator_seed: int,
    collate_fn: Callable | None,
    dist_info: DistInfo,
    device: torch.device,
) -> tuple[DataLoader, EpochSampler]:
    """The training loader of ``dataset``: this rank's ``batch_size / world_size`` images a step, full batches only,
    in an order that is a function of (``seed``, epoch); ``generator_seed`` seeds the data workers (their
    augmentation randomness) and should differ per rank."""
    sampler = EpochSampler(
        dataset, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=True, seed=seed, drop_last=True
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size // dist_info.world_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(generator_seed),
        **worker_kwargs(data_cfg, device),
    )
    return loader, sampler


def evaluation_loader(
    dataset: Dataset,
    data_cfg: Any,
    batch_size: int,
    *,
    dist_info: DistInfo,
    device: torch.device,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """Every image of ``dataset`` exactly once over all ranks (``DistributedSampler`` would pad with repeats), in
    order, ``batch_size / world_size`` a batch."""
    if dist_info.is_distributed:
        dataset = Subset(dataset, range(dist_info.rank, len(dataset), dist_info.world_size))
    # Its own generator: iterating a loader draws a seed, which must not come from (and shift) the training stream.
    generator = torch.Generator().manual_seed(0)
    return DataLoader(
        dataset,
        batch_size=max(1, batch_size // dist_info.world_size),
        shuffle=False,
        collate_fn=collate_fn,
        generator=generator,
        **worker_kwargs(data_cfg, device),
    )


def worker_kwargs(data_cfg: Any, device: torch.device) -> dict:
    """``DataLoader`` arguments for ``data.num_workers`` and ``data.pin_memory``: persistent workers that ignore
    SIGINT/SIGTERM (the main process stops at a step boundary, then closes them)."""
    workers = data_cfg.num_workers
    return {
        "num_workers": workers,
        "pin_memory": data_cfg.pin_memory and device.type == "cuda",
        "persistent_workers": workers > 0,
        "worker_init_fn": _ignore_stop_signals if workers > 0 else None,
    }


def stop_data_workers(*loaders: DataLoader) -> None:
    """Shut down the loaders' persistent workers now. They ignore SIGTERM (see ``worker_kwargs``), so if an error
    left them running, multiprocessing's exit handler, which stops daemon processes with SIGTERM, would wait for them
    forever."""
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        loader._iterator = None


def _ignore_stop_signals(worker_id: int) -> None:
    """Data workers leave Ctrl-C/SIGTERM to the main process, which stops at a step boundary and then closes them.

    (torch already seeds each worker's random, numpy and torch generators from the loader's generator.)
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ---- stopping ----------------------------------------------------------------------------------------------------


class StopRequest:
    """Set by the first SIGINT/SIGTERM; the loop reads it between steps, so a checkpoint never holds half a step."""

    signum: int | None = None


@contextlib.contextmanager
def graceful_stop() -> Iterator[StopRequest]:
    """While the block runs, the first SIGINT/SIGTERM sets the yielded ``StopRequest``; a second Ctrl-C raises
    ``KeyboardInterrupt`` at once. Outside the main thread (no signal handlers there) the request is never set."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread only
        yield request
        return

    def handler(signum, frame):
        if request.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        request.signum = signum

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for signum, previous_handler in previous.items():
            signal.signal(signum, previous_handler)


def raise_for_signal(signum: int, last_path: Path, is_main: bool) -> None:
    """After the stop's checkpoint ``last_path`` was saved: ``SystemExit(143)`` for SIGTERM, else
    ``KeyboardInterrupt`` (the CLI exits 130); rank 0 says where to continue from."""
    if is_main:
        print(f"unikd: {signal.Signals(signum).name}: saved {last_path}; continue with --resume", file=sys.stderr)
    if signum == signal.SIGTERM:
        raise SystemExit(128 + signal.SIGTERM)
    raise KeyboardInterrupt(f"interrupted: saved {last_path}; continue with --resume")


# ---- one step ----------------------------------------------------------------------------------------------------


def check_step(
    loss: torch.Tensor, stop: StopRequest, *, nan_check: bool, dist_info: DistInfo, device: torch.device
) -> tuple[bool, bool]:
    """(whether the loss is not finite, whether to stop after this step), agreed by all ranks: one check per step,
    before the backward pass, so that every rank stops at the same step (and none waits in a collective)."""
    stop_requested = stop.signum is not None
    if not (nan_check or dist_info.is_distributed):
        return False, stop_requested
    flags = torch.stack([~torch.isfinite(loss.detach()), torch.tensor(stop_requested, device=device)])
    non_finite, stop_requested = all_reduce(flags.float(), op="max").tolist()
    return nan_check and bool(non_finite), bool(stop_requested)


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    parameters: list[torch.nn.Parameter],
    clip_grad_norm: float | None = None,
) -> None:
    """Backward, optional gradient-norm clipping (on unscaled gradients), optimizer step, scaler update."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad_norm is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()


def log_train_window(
    writer: MetricsWriter,
    bar,
    window: dict[str, torch.Tensor],
    *,
    steps: int,
    seconds: float,
    step: int,
    epoch: int,
    lr: float,
    batch_size: int,
    world_size: int,
) -> None:
    """One train record (each loss term and their sum averaged over the window's ``steps`` and over the ranks, the
    lr, images per second) in ``writer``, and the same numbers on the progress bar."""
    names = [*window, "loss"]
    means = (all_reduce(torch.stack([*window.values(), sum(window.values())])) / (world_size * steps)).tolist()
    means = dict(zip(names, means))
    images_per_s = steps * batch_size / seconds
    writer.write({"split": "train", "step": step, "epoch": epoch, "lr": lr, **means, "images_per_s": images_per_s})
    bar.set_postfix({**means, "lr": lr, "img/s": images_per_s}, refresh=False)


# ---- messages ----------------------------------------------------------------------------------------------------


def non_finite_loss_message(terms: dict[str, torch.Tensor], step: int, epoch: int, last_path: Path, advice: str) -> str:
    """The error for a non-finite loss at ``step``: the terms that are not finite, the last good checkpoint, and
    ``advice``."""
    bad = [f"{name}={value.item()}" for name, value in terms.items() if not math.isfinite(value.item())]
    culprit = ", ".join(bad) if bad else "on another process"
    return f"non-finite loss at step {step} (epoch {epoch}): {culprit}; {_last_good(last_path)}. {advice}"


def non_finite_state_message(bad: list[str], where: str, last_path: Path, advice: str) -> str:
    """The error of a model state with a NaN or an infinity (``bad``: the entries, empty when another rank found
    them) found ``where`` (e.g. ``at step 20``): nothing was saved."""
    names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "") if bad else "on another rank"
    return f"non-finite model state {where}: {names}; not saved, {_last_good(last_path)}. {advice}"


def _last_good(last_path: Path) -> str:
    return f"last good checkpoint: {last_path}" if last_path.is_file() else "no checkpoint was written yet"
