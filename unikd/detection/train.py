"""The detection engine: ``train_detector(cfg)`` trains one detector; ``evaluate_detection_checkpoint`` scores one.

    cfg = load_detection_config("configs/detection/mosaics_student.yaml")
    result = train_detector(cfg)              # or: unikd detect train CONFIG [key=value ...] [--resume]

The classification engine's conventions for torchvision detectors, on the same helpers (``unikd._engine``: run
directory, seeding, graceful stop, loaders, per-step checks, resume checks; ``unikd._rundir``: the files). The run
directory is locked for the run and holds ``config.yaml``, ``metrics.jsonl``, ``tb/``, ``last.pt``, ``best.pt``
(best ``bbox_AP``) and ``final.json``. Checkpoints are written atomically, ``best.pt`` before ``last.pt``, after a
check that every parameter, buffer and optimizer slot is finite; they hold the student detector with its
optimizer, schedule, scaler, random state and position, so ``--resume`` continues where a run stopped (mid-epoch
included; the checkpoint set is repaired if a kill fell between the two writes, and the config must be the run's
own but for the keys of ``SAFE_TO_CHANGE_ON_RESUME``). The first Ctrl-C or SIGTERM stops after the current step
with a resumable ``last.pt``.

The loop reads in phases: set-up (run directory, data, student, teacher, optimizer, schedule, resume, DDP) -> one
epoch of steps -> at each evaluation point (every ``train.eval_every`` ``schedule.unit``\\ s, and at the end): COCO
evaluation, then the checkpoints; ``last.pt`` also at the end of every epoch -> ``final.json``.

Schedule: SGD, linear warm-up over ``schedule.warmup_iters`` iterations from ``lr * warmup_ratio``, then the lr is
multiplied by ``gamma`` at each milestone; length and milestones in epochs (MMDetection 1x = 12 epochs, drops at 8
and 11; 2x = 24, 16 and 22) or iterations (``schedule.unit=iter``). ``train.batch_size`` is the global batch (the
paper: 8 GPUs x 2 images = 16 at lr 0.02); under torchrun each rank takes ``batch_size / world_size`` images per
step, the student (with its distillation term) is wrapped in DDP, the frozen teacher is not, and evaluation is
gathered on rank 0 (``unikd.detection.evaluate``). Train records in ``metrics.jsonl`` hold every loss term
(torchvision's four or five, and ``loss_<method>``) separately, the lr and images per second; validation records the
COCO metrics of ``unikd.detection.evaluate``.
"""

from __future__ import annotations

import math
import os
import sys
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from unikd._checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    MODEL_ENTRIES,
    capture_rng_state,
    load_checkpoint,
    load_student_weights,
    non_finite_state,
    restore_rng_state,
)
from unikd._distributed import DistInfo, init_distributed, resolve_device
from unikd._engine import (
    AMP_DTYPES,
    EpochSampler,
    StopRequest,
    check_resume_config,
    check_run_settings,
    check_step,
    determinism,
    evaluation_loader,
    graceful_stop,
    log_train_window,
    non_finite_loss_message,
    non_finite_state_message,
    optimizer_step,
    raise_for_signal,
    resume_checkpoint,
    run_directory,
    seed_everything,
    stop_data_workers,
    training_loader,
    wrap_ddp,
)
from unikd._errors import UnikdError
from unikd._logging import MetricsWriter, peak_memory_mb, progress_bar
from unikd._optim import build_optimizer, build_scheduler
from unikd._rundir import FINAL, LAST, METRICS, trim_metrics, write_checkpoints, write_json
from unikd.config import ScheduleConfig
from unikd.detection.config import (
    DetectionConfig,
    detection_config_from_dict,
    detection_config_to_dict,
    save_detection_config,
)
from unikd.detection.data import DetectionData, build_detection_data, collate_detection
from unikd.detection.distill import TrainableDetector
from unikd.detection.evaluate import evaluate_detector
from unikd.detection.models import detector_from_config, load_teacher_detector

__all__ = ["RESUME_ENTRIES", "SAFE_TO_CHANGE_ON_RESUME", "evaluate_detection_checkpoint", "train_detector"]

MONITOR = "bbox_AP"
RESUME_ENTRIES = (
    *MODEL_ENTRIES,
    *("task", "categories", "run_id", "optimizer", "scheduler", "scaler", "epoch", "step", "steps_per_epoch"),
    *("rng", "metrics"),
)
# What a non-finite loss or model state advises: the classification engine's advice and the warm-up.
_LOSS_ADVICE = (
    "Lower optim.lr, lengthen schedule.warmup_iters, set optim.clip_grad_norm, or use train.amp=bf16 instead of fp16"
)
_STATE_ADVICE = "Lower optim.lr, lengthen schedule.warmup_iters or set optim.clip_grad_norm"
# Keys that may differ between a run and its --resume: where data and outputs live, how fast data loads, how long
# to train, and what is logged and when. Any other difference is refused.
SAFE_TO_CHANGE_ON_RESUME = (
    "output_dir",
    "data.root",
    "data.num_workers",
    "data.pin_memory",
    "schedule.length",
    "train.device",
    "train.eval_every",
    "train.eval_batch_size",
    "train.log_every",
    "train.progress",
    "train.tensorboard",
)


@dataclass
class _Run:
    """Everything one detection run holds, built by ``_set_up``; ``step`` and ``metrics`` advance as it trains."""

    cfg: DetectionConfig
    dist: DistInfo
    device: torch.device
    output_dir: Path
    data: DetectionData
    train_loader: DataLoader
    train_sampler: EpochSampler
    val_loader: DataLoader
    steps_per_epoch: int
    total_steps: int
    eval_period: int  # steps between evaluation points
    student: nn.Module
    teacher: nn.Module | None
    model: nn.Module  # what a step calls: the TrainableDetector, wrapped in DDP under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    trainable_params: list[nn.Parameter]
    run_id: str
    step: int
    metrics: dict  # history, best_bbox_AP, best_step, train_time_s
    writer: MetricsWriter | None = None

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return AMP_DTYPES[self.cfg.train.amp]

    @property
    def masks(self) -> bool:
        return self.cfg.model.student.arch == "mask_rcnn"

    @property
    def model_name(self) -> str:
        return f"{self.cfg.model.student.arch}/{self.cfg.model.student.backbone}"


def train_detector(cfg: DetectionConfig, *, resume: bool = False) -> dict:
    """Train ``cfg``'s student detector with ``cfg``'s method; see the module docstring for the files written.

    Returns ``{"best_bbox_AP", "best_step", "last", "train_time_s", "history", "run_id"}`` (``last``: the metrics
    of the last evaluation; ``history``: one dict per evaluation). Raises ``UnikdError`` for bad input, a run
    directory/resume mismatch, or a non-finite loss or model state.
    """
    dist_info, device, owns_process_group = init_distributed(cfg.train.device)
    try:
        with (
            determinism(cfg.train.deterministic),
            graceful_stop() as stop,
            run_directory(cfg.output_dir, resume, dist_info, device) as output_dir,
        ):
            run = _set_up(cfg, resume, output_dir, dist_info, device)
            epochs = range(run.step // run.steps_per_epoch, math.ceil(run.total_steps / run.steps_per_epoch))
            try:
                with run.writer:
                    for epoch in epochs:
                        _train_epoch(run, epoch, stop)
                return _finish(run)
            finally:
                stop_data_workers(run.train_loader, run.val_loader)  # workers ignore SIGTERM: never leave them
    finally:
        if owns_process_group:
            dist.destroy_process_group()


# ---- phase 1: set-up ---------------------------------------------------------------------------------------------


def _set_up(cfg: DetectionConfig, resume: bool, output_dir: Path, dist_info: DistInfo, device: torch.device) -> _Run:
    check_run_settings(cfg.train, device, dist_info.world_size)
    checkpoint = _resume_checkpoint(cfg, output_dir, dist_info, device) if resume else None
    if dist_info.is_main:
        save_detection_config(cfg, output_dir / "config.yaml")

    # Data. The dropped-box counts are shown once, not once per rank.
    with warnings.catch_warnings():
        if not dist_info.is_main:
            warnings.simplefilter("ignore")
        data = build_detection_data(cfg.data, masks=cfg.model.student.arch == "mask_rcnn")
    train_loader, train_sampler = _train_loader(cfg, data, dist_info, device)
    steps_per_epoch = min(len(train_loader), cfg.train.max_steps_per_epoch or len(train_loader))
    if steps_per_epoch == 0:
        raise UnikdError(
            f"train.batch_size: {cfg.train.batch_size} is larger than the training set ({len(data.train)} images with "
            "boxes); lower it"
        )
    unit_steps = steps_per_epoch if cfg.schedule.unit == "epoch" else 1  # steps per schedule unit

    # Student, teacher. The student's initialisation depends on the seed only: paired runs across methods.
    seed_everything(cfg.train.seed)
    student = detector_from_config(cfg.model.student, data.num_classes, cfg.data)
    trainable = TrainableDetector(student, cfg.method.name, **cfg.method.params).to(device)
    teacher = None
    if trainable.needs_teacher:
        teacher = load_teacher_detector(cfg.model.teacher, data.categories, cfg.data).to(device)

    optimizer = build_optimizer(trainable, cfg.optim)
    schedule = _step_schedule(cfg, unit_steps)
    scheduler = build_scheduler(optimizer, schedule, cfg.optim.lr, cfg.schedule.length, unit_steps)
    model: nn.Module = trainable
    if dist_info.is_distributed:
        model = wrap_ddp(trainable, device)
    run = _Run(
        cfg=cfg,
        dist=dist_info,
        device=device,
        output_dir=output_dir,
        data=data,
        train_loader=train_loader,
        train_sampler=train_sampler,
        val_loader=_val_loader(cfg, data, dist_info, device),
        steps_per_epoch=steps_per_epoch,
        total_steps=cfg.schedule.length * unit_steps,
        eval_period=cfg.train.eval_every * unit_steps,
        student=student,
        teacher=teacher,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16"),
        trainable_params=[p for p in trainable.parameters() if p.requires_grad],
        run_id=uuid.uuid4().hex,
        step=0,
        metrics={"history": [], "best_bbox_AP": None, "best_step": None, "train_time_s": 0.0},
    )
    if checkpoint is not None:
        _restore(run, checkpoint)
    if dist_info.is_main and checkpoint is not None:
        trim_metrics(output_dir / METRICS, run.step, sys.maxsize)  # evaluations are re-logged by step only
    # Training randomness (flips, RoI sampling) starts from the seed after everything is built, the same across
    # methods; each rank its own stream. A resume restores it instead.
    seed_everything(cfg.train.seed + dist_info.rank)
    if checkpoint is not None:
        restore_rng_state(checkpoint["rng"])
    run.writer = MetricsWriter(  # purge_step: TensorBoard hides what an interrupted run logged after its checkpoint
        output_dir, enabled=dist_info.is_main, tensorboard=cfg.train.tensorboard, purge_step=run.step + 1
    )
    return run


def _resume_checkpoint(cfg: DetectionConfig, output_dir: Path, dist_info: DistInfo, device: torch.device) -> dict:
    """``last.pt`` after rank 0 repaired the checkpoint set; raises when the config differs but in safe keys."""
    checkpoint = resume_checkpoint(output_dir, dist_info, device, load=_load_resume_checkpoint, unit="step")
    check_resume_config(
        checkpoint["config"],
        cfg,
        from_dict=detection_config_from_dict,
        safe=SAFE_TO_CHANGE_ON_RESUME,
        output_dir=output_dir,
    )
    return checkpoint


def _load_resume_checkpoint(path: Path) -> dict:
    checkpoint = load_checkpoint(path, RESUME_ENTRIES)
    if checkpoint.get("task") != "detection":
        raise UnikdError(f"--resume: {path} is a classification checkpoint; resume it with 'unikd train --resume'")
    return checkpoint


def _restore(run: _Run, checkpoint: dict) -> None:
    if checkpoint["model_name"] != run.model_name or checkpoint["categories"] != run.data.categories:
        raise UnikdError(
            f"--resume: {run.output_dir / LAST} holds a {checkpoint['model_name']} for {checkpoint['num_classes']} "
            f"categories, but the data and config give a {run.model_name} for {run.data.num_classes}; resume with the "
            f"run's own config and data"
        )
    if checkpoint["steps_per_epoch"] != run.steps_per_epoch:
        raise UnikdError(
            f"--resume: {run.output_dir / LAST} was trained with {checkpoint['steps_per_epoch']} steps per epoch, "
            f"this run gives {run.steps_per_epoch} (another world size, batch size or training set?); resume with "
            "the run's own setting"
        )
    if run.total_steps < checkpoint["step"]:
        raise UnikdError(
            f"schedule.length: {run.cfg.schedule.length} {run.cfg.schedule.unit}s is fewer than the "
            f"{checkpoint['step']} steps the run in {run.output_dir} has trained; pass a larger schedule.length"
        )
    load_student_weights(run.student, checkpoint, run.output_dir / LAST)
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    run.scaler.load_state_dict(checkpoint["scaler"])
    run.run_id, run.step, run.metrics = checkpoint["run_id"], checkpoint["step"], checkpoint["metrics"]


# ---- phase 2: one epoch of steps ---------------------------------------------------------------------------------


def _train_epoch(run: _Run, epoch: int, stop: StopRequest) -> None:
    cfg = run.cfg
    batches_done = run.step - epoch * run.steps_per_epoch  # > 0 only when resuming mid-epoch
    epoch_steps = min(run.steps_per_epoch, run.total_steps - epoch * run.steps_per_epoch)
    run.train_sampler.set_epoch(epoch)
    run.train_sampler.start = batches_done * (cfg.train.batch_size // run.dist.world_size)
    run.model.train()
    bar = progress_bar(epoch_steps, batches_done, f"epoch {epoch}", cfg.train.progress and run.dist.is_main)
    window: dict[str, torch.Tensor] = {}
    window_steps, window_start = 0, time.perf_counter()
    batches = iter(run.train_loader)
    for batch_index in range(batches_done, epoch_steps):
        step_start = time.perf_counter()
        terms, lr, stop_requested = _train_step(run, next(batches), epoch, stop)
        run.metrics["train_time_s"] += time.perf_counter() - step_start
        bar.update(1)
        for name, value in terms.items():
            window[name] = window.get(name, 0.0) + value.detach().float()
        window_steps += 1
        if run.step % cfg.train.log_every == 0 or batch_index == epoch_steps - 1:
            log_train_window(
                run.writer, bar, window, steps=window_steps, seconds=time.perf_counter() - window_start,
                step=run.step, epoch=epoch, lr=lr, batch_size=cfg.train.batch_size, world_size=run.dist.world_size,
            )  # fmt: skip
            window, window_steps, window_start = {}, 0, time.perf_counter()
        if stop_requested:
            if run.dist.is_main:
                _save(run, epoch, is_best=False)
            bar.close()
            raise_for_signal(stop.signum, run.output_dir / LAST, run.dist.is_main)
        if run.step % run.eval_period == 0 or run.step == run.total_steps:
            bar.clear()
            _evaluate_and_checkpoint(run, epoch)
            run.model.train()
    bar.close()
    if run.step % run.eval_period and run.step < run.total_steps and run.dist.is_main:
        _save(run, epoch + 1, is_best=False)  # the end of an epoch between evaluation points


def _train_step(run: _Run, batch, epoch: int, stop: StopRequest) -> tuple[dict[str, torch.Tensor], float, bool]:
    """One optimizer step; returns the loss terms, the lr it used and whether any rank asked to stop."""
    device = run.device
    images = [image.to(device, non_blocking=True) for image in batch[0]]
    targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in batch[1]]
    with torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
        terms = run.model(images, targets, run.teacher)
    loss = sum(terms.values())
    non_finite, stop_requested = check_step(
        loss, stop, nan_check=run.cfg.train.nan_check, dist_info=run.dist, device=device
    )
    if non_finite:
        raise UnikdError(non_finite_loss_message(terms, run.step + 1, epoch, run.output_dir / LAST, _LOSS_ADVICE))
    lr = run.optimizer.param_groups[0]["lr"]  # the rate this step uses (logged)
    optimizer_step(loss, run.optimizer, run.scaler, run.trainable_params, run.cfg.optim.clip_grad_norm)
    run.scheduler.step()
    run.step += 1
    return terms, lr, stop_requested


# ---- phase 3: evaluation points and checkpoints ------------------------------------------------------------------


def _evaluate_and_checkpoint(run: _Run, epoch: int) -> None:
    """COCO metrics, then best.pt (when it is the best so far) and last.pt, in ``write_checkpoints``' order."""
    metrics = evaluate_detector(
        run.student,
        run.val_loader,
        run.data.val_ground_truth,
        run.data.label_to_category,
        run.device,
        image_ids=run.data.val_image_ids,
        iou_types=("bbox", "segm") if run.masks else ("bbox",),
        amp_dtype=run.amp_dtype,
    )
    record = {"split": "val", "step": run.step, "epoch": epoch, **metrics}
    record.update(train_time_s=run.metrics["train_time_s"], peak_mem_mb=peak_memory_mb(run.device))
    run.writer.write(record)
    run.metrics["history"].append({key: value for key, value in record.items() if key != "split"})
    is_best = run.metrics["best_bbox_AP"] is None or metrics[MONITOR] > run.metrics["best_bbox_AP"]
    if is_best:
        run.metrics["best_bbox_AP"], run.metrics["best_step"] = metrics[MONITOR], run.step
    if run.dist.is_main:
        _save(run, epoch + (run.step % run.steps_per_epoch == 0), is_best=is_best)


def _save(run: _Run, epoch: int, *, is_best: bool) -> None:
    """Write the checkpoint set after checking that the model state is finite (rank 0; ``epoch``: in progress)."""
    bad = non_finite_state({"student": run.student}, run.optimizer)
    if bad:
        raise UnikdError(non_finite_state_message(bad, f"at step {run.step}", run.output_dir / LAST, _STATE_ADVICE))
    write_checkpoints(run.output_dir, _checkpoint(run, epoch), is_best=is_best)


def _checkpoint(run: _Run, epoch: int) -> dict:
    """The checkpoint dict (unikd._checkpoint's format, ``task: detection``) of the run as it stands."""
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "task": "detection",
        "run_id": run.run_id,
        "model_name": run.model_name,
        "num_classes": run.data.num_classes,
        "categories": run.data.categories,
        "model": run.student.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "epoch": epoch,
        "step": run.step,
        "steps_per_epoch": run.steps_per_epoch,
        "rng": capture_rng_state(),
        "config": detection_config_to_dict(run.cfg),
        "metrics": run.metrics,
    }


# ---- phase 4: done -----------------------------------------------------------------------------------------------


def _finish(run: _Run) -> dict:
    history = run.metrics["history"]
    result = {
        "best_bbox_AP": run.metrics["best_bbox_AP"],
        "best_step": run.metrics["best_step"],
        "last": history[-1] if history else None,
        "train_time_s": run.metrics["train_time_s"],
        "history": history,
        "run_id": run.run_id,
    }
    if run.dist.is_main:
        write_json(run.output_dir / FINAL, result)
    return result


def evaluate_detection_checkpoint(path: str | os.PathLike, overrides: list[str] = ()) -> dict[str, float]:
    """Rebuild the student detector saved in the checkpoint ``path`` and return its COCO metrics on the validation set.

    ``overrides`` apply to the checkpoint's config (e.g. ``data.root=DIR``, ``train.device=cpu``).
    """
    checkpoint = load_checkpoint(path, (*MODEL_ENTRIES, "categories"))
    if checkpoint.get("task") != "detection":
        raise UnikdError(f"{path} is a classification checkpoint; evaluate it with 'unikd eval'")
    cfg = detection_config_from_dict(checkpoint["config"], overrides, check_files=False)
    device = resolve_device(cfg.train.device)
    masks = cfg.model.student.arch == "mask_rcnn"
    data = build_detection_data(cfg.data, masks=masks, train=False)
    if data.categories != checkpoint["categories"]:
        raise UnikdError(
            f"{path}: the detector was trained on {checkpoint['num_classes']} categories that differ from those of "
            f"{cfg.data.val_annotations} ({data.num_classes}); pass the validation set of its dataset (data.root=...)"
        )
    student = detector_from_config(cfg.model.student, data.num_classes, cfg.data, load_backbone=False)
    load_student_weights(student, checkpoint, path)
    loader = _val_loader(cfg, data, DistInfo(), device)
    try:
        return evaluate_detector(
            student.to(device),
            loader,
            data.val_ground_truth,
            data.label_to_category,
            device,
            image_ids=data.val_image_ids,
            iou_types=("bbox", "segm") if masks else ("bbox",),
            amp_dtype=AMP_DTYPES[cfg.train.amp],
        )
    finally:
        stop_data_workers(loader)


# ---- helpers -----------------------------------------------------------------------------------------------------


def _step_schedule(cfg: DetectionConfig, unit_steps: int) -> ScheduleConfig:
    """The classification engine's multistep schedule with milestones in ``schedule.unit``\\ s of ``unit_steps``."""
    schedule = cfg.schedule
    return ScheduleConfig(
        name="multistep",
        warmup_epochs=schedule.warmup_iters / unit_steps,
        warmup_lr_ratio=schedule.warmup_ratio,
        milestones=list(schedule.milestones),
        gamma=schedule.gamma,
    )


def _train_loader(
    cfg: DetectionConfig, data: DetectionData, dist_info: DistInfo, device: torch.device
) -> tuple[DataLoader, EpochSampler]:
    return training_loader(
        data.train, cfg.data, cfg.train.batch_size, seed=cfg.train.seed,
        generator_seed=cfg.train.seed * 1000 + dist_info.rank,  # data workers' flips
        collate_fn=collate_detection, dist_info=dist_info, device=device,
    )  # fmt: skip


def _val_loader(cfg: DetectionConfig, data: DetectionData, dist_info: DistInfo, device: torch.device) -> DataLoader:
    return evaluation_loader(
        data.val, cfg.data, cfg.train.eval_batch_size, dist_info=dist_info, device=device, collate_fn=collate_detection
    )
