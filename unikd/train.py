"""The training engine: ``train(cfg)`` runs one experiment; ``evaluate_checkpoint(path)`` scores a saved student.

``train`` reads top to bottom: run directory → data → student, method, teacher → optimizer and schedule → resume →
the loop (steps, evaluation, checkpoints) → ``final.json``. It writes into ``cfg.output_dir``::

    config.yaml     the resolved config
    metrics.jsonl   one line per logged train step and per evaluation (see unikd._logging)
    tb/             TensorBoard events (train.tensorboard)
    last.pt         checkpoint at the end of every epoch, and on interrupt (format: unikd._checkpoint)
    best.pt         checkpoint of the epoch with the best validation top-1
    final.json      the dict ``train`` returns, once the run completes

Determinism: the same ``train.seed`` gives the same student initialisation and the same data order whatever the
method (the student is built right after seeding, before the method; each epoch's order is a function of
(seed, epoch)), which pairs runs across methods. ``train.deterministic`` also asks torch for deterministic kernels.

Interrupts: the first SIGINT (Ctrl-C) or SIGTERM asks the loop to stop after the current training step (one that
arrives during evaluation takes effect at the next step; all ranks agree on the step); it saves a resumable
``last.pt`` (mid-epoch position included) and raises ``KeyboardInterrupt`` for SIGINT (the CLI exits 130) or
``SystemExit(143)`` for SIGTERM. A second Ctrl-C aborts at once. Data workers ignore both signals.

Resume: ``--resume`` (``train(cfg, resume=True)``) continues from ``last.pt``. On CPU with ``data.num_workers=0``
the resumed run is bit-identical to an uninterrupted one; with data workers the data order is identical but the
workers' augmentation randomness is re-seeded.

Distributed: under torchrun each rank takes ``train.batch_size / world_size`` images per step; the student and the
method are wrapped in DDP (the frozen teacher is not); metrics are all-reduced and only rank 0 writes files. Plain
BatchNorm keeps per-rank batch statistics (and USKD's target term a per-rank batch mean, as in its released
multi-GPU code), so N ranks match one process only for BatchNorm-free models and per-sample losses.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from unikd._checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from unikd._distributed import DistInfo, all_reduce, init_distributed, resolve_device
from unikd._errors import UnikdError
from unikd._logging import MetricsWriter, peak_memory_mb, progress_bar
from unikd._optim import build_optimizer, build_scheduler
from unikd.config import Config, check_teacher_num_classes, config_from_dict, config_to_dict, save_config
from unikd.data import build_datasets, build_mix_collate
from unikd.methods import METHODS, Method, create_method, forward_student
from unikd.models import create_model, feature_dim, load_teacher

__all__ = ["TrainableModules", "evaluate", "evaluate_checkpoint", "optimizer_step", "train"]

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainableModules(nn.Module):
    """The student and the method (USKD's weak head) as one module: what the optimizer, DDP and compile see.

    ``forward`` returns the method's named loss terms. The teacher is not part of it: frozen and never wrapped.
    """

    def __init__(self, student: nn.Module, method: Method, feature_layer: str | int = "mid") -> None:
        super().__init__()
        self.student = student
        self.method = method
        self.feature_layer = feature_layer

    def forward(
        self, images: torch.Tensor, target: torch.Tensor, teacher_logits: torch.Tensor | None, progress: float
    ) -> dict[str, torch.Tensor]:
        student_out = forward_student(self.student, images, self.method.student_output, layer=self.feature_layer)
        return self.method(student_out, target, teacher_logits=teacher_logits, progress=progress)


def train(cfg: Config, *, resume: bool = False) -> dict:
    """Train ``cfg``'s student with ``cfg``'s method; see the module docstring for what is written where.

    Returns ``{"best_top1", "best_epoch", "last_top1", "last_top5", "history"}`` (accuracies in percent; history:
    one dict per evaluation). Raises ``UnikdError`` for a run directory/resume mismatch or a non-finite loss.
    """
    dist_info, device, owns_process_group = init_distributed(cfg.train.device)
    try:
        with _determinism(cfg.train.deterministic), _graceful_stop() as stop:
            return _train(cfg, resume, dist_info, device, stop)
    finally:
        if owns_process_group:
            dist.destroy_process_group()


def _train(cfg: Config, resume: bool, dist_info: DistInfo, device: torch.device, stop: _StopRequest) -> dict:
    # ---- run directory -------------------------------------------------------------------------------------------
    output_dir = Path(cfg.output_dir)
    last_path, best_path = output_dir / "last.pt", output_dir / "best.pt"
    if resume and not last_path.is_file():
        raise UnikdError(
            f"--resume: no checkpoint {last_path} to resume from; run without --resume to start a new run there"
        )
    if not resume and last_path.is_file():
        raise UnikdError(
            f"output_dir {output_dir} already holds a run ({last_path}); pass --resume to continue it, "
            "or choose another output_dir"
        )
    amp_dtype = AMP_DTYPES[cfg.train.amp]
    if cfg.train.amp == "fp16" and device.type != "cuda":
        raise UnikdError("train.amp: 'fp16' needs CUDA (its GradScaler); on CPU use train.amp=bf16 or none")
    world = dist_info.world_size
    if cfg.train.batch_size % world:
        raise UnikdError(
            f"train.batch_size: {cfg.train.batch_size} does not split over {world} processes; use a multiple of {world}"
        )
    if dist_info.is_main:
        save_config(cfg, output_dir / "config.yaml")

    # ---- data ----------------------------------------------------------------------------------------------------
    _seed_everything(cfg.train.seed)
    bundle = build_datasets(cfg.data)
    num_classes = bundle.num_classes
    check_teacher_num_classes(cfg.model, num_classes)
    train_loader, train_sampler = _train_loader(cfg, bundle.train, num_classes, dist_info, device)
    val_loader = _eval_loader(cfg, bundle.val, dist_info, device)
    steps_per_epoch = min(len(train_loader), cfg.train.max_steps_per_epoch or len(train_loader))
    if steps_per_epoch == 0:
        raise UnikdError(
            f"train.batch_size: {cfg.train.batch_size} is larger than the training set ({len(bundle.train)} images); "
            "lower it"
        )
    per_rank_batch = cfg.train.batch_size // world

    # ---- student, method, teacher --------------------------------------------------------------------------------
    # Seed again right before the student so its initialisation depends on the seed only (not on the data
    # pipeline, not on the method built after it): paired runs across methods start from the same weights.
    _seed_everything(cfg.train.seed)
    student = create_model(cfg.model.student, num_classes, in_chans=bundle.in_chans, **cfg.model.student_kwargs)
    method_cls = METHODS.get(cfg.method.name)
    student_feature_dim = None
    if method_cls is not None and method_cls.student_output == "feature":
        student_feature_dim = feature_dim(student, cfg.model.feature_layer)
    method = create_method(cfg.method.name, num_classes, feature_dim=student_feature_dim, **cfg.method.params)
    teacher = None
    if method.needs_teacher:
        teacher_kwargs = {"in_chans": bundle.in_chans, **cfg.model.teacher_kwargs}
        teacher = load_teacher(cfg.model.teacher, num_classes, cfg.model.teacher_checkpoint, **teacher_kwargs)
        teacher = teacher.to(device).eval().requires_grad_(False)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    trainable = TrainableModules(student, method, cfg.model.feature_layer).to(device, memory_format=memory_format)
    if teacher is not None:
        teacher = teacher.to(memory_format=memory_format)

    # ---- optimizer, schedule, AMP ----------------------------------------------------------------------------------
    optimizer = build_optimizer(trainable, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.optim.lr, cfg.train.epochs, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
    trainable_params = [p for p in trainable.parameters() if p.requires_grad]

    # ---- resume --------------------------------------------------------------------------------------------------
    start_epoch, step = 0, 0
    run_metrics = {"history": [], "best_top1": None, "best_epoch": None, "epoch_train_time_s": 0.0}
    checkpoint = None
    if resume:
        checkpoint = load_checkpoint(last_path)
        if checkpoint["model_name"] != cfg.model.student or checkpoint["num_classes"] != num_classes:
            raise UnikdError(
                f"--resume: {last_path} holds a {checkpoint['model_name']} with {checkpoint['num_classes']} classes, "
                f"but the config asks for a {cfg.model.student} with {num_classes}; resume with the run's own config "
                f"({output_dir / 'config.yaml'})"
            )
        student.load_state_dict(checkpoint["model"])
        method.load_state_dict(checkpoint["method"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        start_epoch, step, run_metrics = checkpoint["epoch"], checkpoint["step"], checkpoint["metrics"]
        if not 0 <= step - start_epoch * steps_per_epoch <= steps_per_epoch:
            raise UnikdError(
                f"--resume: {last_path} stopped at step {step} of epoch {start_epoch}, which does not fit "
                f"{steps_per_epoch} steps per epoch; resume with the run's own config ({output_dir / 'config.yaml'})"
            )

    # ---- distributed wrapping, compile ---------------------------------------------------------------------------
    model = trainable
    if dist_info.is_distributed:
        model = DistributedDataParallel(trainable, device_ids=[device.index] if device.type == "cuda" else None)
    eval_model = student
    if cfg.train.compile:
        model, eval_model = torch.compile(model), torch.compile(student)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    def make_checkpoint(epoch: int) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "model_name": cfg.model.student,
            "num_classes": num_classes,
            "model": student.state_dict(),
            "method": method.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "step": step,
            "rng": capture_rng_state(),
            "config": config_to_dict(cfg),
            "metrics": run_metrics,
        }

    # Training randomness (dropout, augmentations drawn in this process) starts from the seed after everything is
    # built, so it too is the same across methods; each rank gets its own stream. A resume restores it instead.
    _seed_everything(cfg.train.seed + dist_info.rank)
    if checkpoint is not None:
        restore_rng_state(checkpoint["rng"])

    # ---- the loop ------------------------------------------------------------------------------------------------
    metrics_writer = MetricsWriter(output_dir, enabled=dist_info.is_main, tensorboard=cfg.train.tensorboard)
    with metrics_writer:
        for epoch in range(start_epoch, cfg.train.epochs):
            batches_done = step - epoch * steps_per_epoch  # > 0 only when resuming mid-epoch
            train_sampler.set_epoch(epoch)
            train_sampler.start = batches_done * per_rank_batch
            epoch_train_time = run_metrics["epoch_train_time_s"] if batches_done else 0.0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            model.train()
            bar = progress_bar(
                steps_per_epoch, batches_done, f"epoch {epoch}", cfg.train.progress and dist_info.is_main
            )
            window_terms: dict[str, torch.Tensor] = {}
            window_steps, window_start = 0, time.perf_counter()
            epoch_start = time.perf_counter()
            batches = iter(train_loader)
            for batch_index in range(batches_done, steps_per_epoch):
                images, target = next(batches)
                images = images.to(device, non_blocking=True, memory_format=memory_format)
                target = target.to(device, non_blocking=True)
                with autocast():
                    teacher_logits = None
                    if teacher is not None:
                        with torch.no_grad():
                            teacher_logits = teacher(images).float()
                    terms = model(images, target, teacher_logits, epoch + batch_index / steps_per_epoch)
                loss = sum(terms.values())

                # One check per step, agreed by all ranks, before the backward pass: a non-finite loss stops the run
                # (the last checkpoint stays as it was), a stop request stops it after this step.
                stop_requested = stop.signum is not None
                if cfg.train.nan_check or dist_info.is_distributed:
                    flags = torch.stack([~torch.isfinite(loss.detach()), torch.tensor(stop_requested, device=device)])
                    flags = flags.float()
                    flags = all_reduce(flags, op="max").tolist() if dist_info.is_distributed else flags.tolist()
                    if cfg.train.nan_check and flags[0]:
                        raise UnikdError(_non_finite_message(terms, step + 1, epoch, last_path))
                    stop_requested = bool(flags[1])

                lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (logged below)
                optimizer_step(loss, optimizer, scaler, trainable_params, cfg.optim.clip_grad_norm)
                scheduler.step()
                step += 1
                bar.update(1)

                for name, value in terms.items():
                    window_terms[name] = window_terms.get(name, 0.0) + value.detach().float()
                window_steps += 1
                if step % cfg.train.log_every == 0 or batch_index == steps_per_epoch - 1:
                    names = [*window_terms, "loss"]
                    sums = torch.stack([*window_terms.values(), sum(window_terms.values())])
                    means = (all_reduce(sums) / (world * window_steps)).tolist()
                    images_per_s = window_steps * cfg.train.batch_size / (time.perf_counter() - window_start)
                    record = {"split": "train", "step": step, "epoch": epoch, "lr": lr}
                    record.update(zip(names, means))
                    record["images_per_s"] = images_per_s
                    metrics_writer.write(record)
                    bar.set_postfix({**dict(zip(names, means)), "lr": lr, "img/s": images_per_s}, refresh=False)
                    window_terms, window_steps, window_start = {}, 0, time.perf_counter()

                if stop_requested:
                    run_metrics["epoch_train_time_s"] = epoch_train_time + time.perf_counter() - epoch_start
                    if dist_info.is_main:
                        save_checkpoint(make_checkpoint(epoch), last_path)
                    bar.close()
                    _raise_for_signal(stop.signum, last_path, dist_info.is_main)
            bar.close()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            epoch_train_time += time.perf_counter() - epoch_start
            run_metrics["epoch_train_time_s"] = 0.0

            # ---- evaluation and checkpoints ------------------------------------------------------------------------
            is_best = False
            if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
                val = evaluate(eval_model, val_loader, device, amp_dtype=amp_dtype, memory_format=memory_format)
                record = {
                    "split": "val",
                    "step": step,
                    "epoch": epoch,
                    "top1": val["top1"],
                    "top5": val["top5"],
                    "val_loss": val["loss"],
                    "epoch_time_s": epoch_train_time,
                    "peak_mem_mb": peak_memory_mb(device),
                }
                metrics_writer.write(record)
                run_metrics["history"].append({k: v for k, v in record.items() if k != "split"})
                is_best = run_metrics["best_top1"] is None or val["top1"] > run_metrics["best_top1"]
                if is_best:
                    run_metrics["best_top1"], run_metrics["best_epoch"] = val["top1"], epoch
            if dist_info.is_main:
                epoch_checkpoint = make_checkpoint(epoch + 1)
                save_checkpoint(epoch_checkpoint, last_path)
                if is_best:
                    save_checkpoint(epoch_checkpoint, best_path)

    # ---- done ----------------------------------------------------------------------------------------------------
    history = run_metrics["history"]
    result = {
        "best_top1": run_metrics["best_top1"],
        "best_epoch": run_metrics["best_epoch"],
        "last_top1": history[-1]["top1"] if history else None,
        "last_top5": history[-1]["top5"] if history else None,
        "history": history,
    }
    if dist_info.is_main:
        (output_dir / "final.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


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


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    *,
    amp_dtype: torch.dtype | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) and mean cross-entropy of ``model`` over ``loader``.

    Under DDP each rank scores its share of the data and the sums are all-reduced, so every rank returns the
    accuracy over the whole set. Targets are class indices (N,); logits are (N, C).
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, loss sum, images
    for images, target in loader:
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        target = target.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        logits = logits.float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == target[:, None]
        totals[0] += hits[:, 0].sum()
        totals[1] += hits.any(dim=1).sum()
        totals[2] += F.cross_entropy(logits, target, reduction="sum")
        totals[3] += len(target)
    all_reduce(totals)
    model.train(was_training)
    top1_hits, top5_hits, loss_sum, count = totals.tolist()
    count = max(count, 1.0)
    return {"top1": 100.0 * top1_hits / count, "top5": 100.0 * top5_hits / count, "loss": loss_sum / count}


def evaluate_checkpoint(path: str | os.PathLike, overrides: list[str] = ()) -> dict[str, float]:
    """Rebuild the student saved in the training checkpoint ``path`` and score it on its validation set.

    ``overrides`` are ``key=value`` config overrides applied to the checkpoint's config (e.g. ``data.root=...``,
    ``train.device=cpu``). Returns ``{"top1", "top5", "loss"}`` (percent, percent, mean cross-entropy).
    """
    checkpoint = load_checkpoint(path)
    cfg = config_from_dict(checkpoint["config"], overrides, check_files=False)
    device = resolve_device(cfg.train.device)
    bundle = build_datasets(cfg.data)
    if bundle.num_classes != checkpoint["num_classes"]:
        raise UnikdError(
            f"{path}: the checkpoint's student predicts {checkpoint['num_classes']} classes but data.name="
            f"{cfg.data.name} has {bundle.num_classes}; pass the dataset it was trained on"
        )
    student = create_model(
        checkpoint["model_name"], checkpoint["num_classes"], in_chans=bundle.in_chans, **cfg.model.student_kwargs
    )
    student.load_state_dict(checkpoint["model"])
    loader = _eval_loader(cfg, bundle.val, DistInfo(), device)
    return evaluate(student.to(device), loader, device, amp_dtype=AMP_DTYPES[cfg.train.amp])


# ---- helpers -----------------------------------------------------------------------------------------------------


class _EpochSampler(DistributedSampler):
    """``DistributedSampler`` (order = f(seed, epoch), this rank's share) that can start ``start`` indices in.

    Setting ``start`` replays a resumed epoch's order without loading, or drawing random numbers for, the batches
    already trained on. With one process it is an ordinary seeded shuffle.
    """

    start: int = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return super().__len__() - self.start


def _train_loader(
    cfg: Config, dataset, num_classes: int, dist_info: DistInfo, device: torch.device
) -> tuple[DataLoader, _EpochSampler]:
    sampler = _EpochSampler(
        dataset,
        num_replicas=dist_info.world_size,
        rank=dist_info.rank,
        shuffle=True,
        seed=cfg.train.seed,
        drop_last=True,
    )
    # The loader's generator only seeds data workers (their augmentation randomness): different per rank.
    generator = torch.Generator().manual_seed(
        int(np.random.SeedSequence([cfg.train.seed, dist_info.rank]).generate_state(1)[0])
    )
    loader = DataLoader(
        dataset,
        batch_size=cfg.train.batch_size // dist_info.world_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=build_mix_collate(cfg.data, num_classes),
        generator=generator,
        **_worker_kwargs(cfg, device),
    )
    return loader, sampler


def _eval_loader(cfg: Config, dataset, dist_info: DistInfo, device: torch.device) -> DataLoader:
    # Every image exactly once over all ranks (DistributedSampler would pad with repeats).
    if dist_info.is_distributed:
        dataset = Subset(dataset, range(dist_info.rank, len(dataset), dist_info.world_size))
    batch_size = max(1, cfg.train.eval_batch_size // dist_info.world_size)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, **_worker_kwargs(cfg, device))


def _worker_kwargs(cfg: Config, device: torch.device) -> dict:
    workers = cfg.data.num_workers
    return {
        "num_workers": workers,
        "pin_memory": cfg.data.pin_memory and device.type == "cuda",
        "persistent_workers": workers > 0,
        "worker_init_fn": _ignore_stop_signals if workers > 0 else None,
    }


def _ignore_stop_signals(worker_id: int) -> None:
    """Data workers leave Ctrl-C/SIGTERM to the main process, which stops at a step boundary and then closes them.

    (torch already seeds each worker's random, numpy and torch generators from the loader's generator.)
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # CPU and every CUDA device


@contextlib.contextmanager
def _determinism(deterministic: bool):
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


class _StopRequest:
    """Set by the first SIGINT/SIGTERM; the loop reads it between steps, so a checkpoint never holds half a step."""

    signum: int | None = None


@contextlib.contextmanager
def _graceful_stop():
    request = _StopRequest()
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


def _raise_for_signal(signum: int, last_path: Path, is_main: bool) -> None:
    if is_main:
        print(f"unikd: {signal.Signals(signum).name}: saved {last_path}; continue with --resume", file=sys.stderr)
    if signum == signal.SIGTERM:
        raise SystemExit(128 + signal.SIGTERM)
    raise KeyboardInterrupt(f"interrupted: saved {last_path}; continue with --resume")


def _non_finite_message(terms: dict[str, torch.Tensor], step: int, epoch: int, last_path: Path) -> str:
    bad = [f"{name}={value.item()}" for name, value in terms.items() if not math.isfinite(value.item())]
    culprit = ", ".join(bad) if bad else "on another process"
    last = f"last good checkpoint: {last_path}" if last_path.is_file() else "no checkpoint was written yet"
    return (
        f"non-finite loss at step {step} (epoch {epoch}): {culprit}; {last}. "
        "Lower optim.lr, set optim.clip_grad_norm, or use train.amp=bf16 instead of fp16"
    )
