"""The detection engine: ``train_detector(cfg)`` trains one detector; ``evaluate_detection_checkpoint`` scores one.

    cfg = load_detection_config("configs/detection/mosaics_nkd.yaml")
    result = train_detector(cfg)              # or: unikd detect train CONFIG [key=value ...] [--resume]

The classification engine's conventions (``unikd.train``), for torchvision detectors: the run directory holds
``config.yaml``, ``metrics.jsonl``, ``tb/``, ``last.pt``, ``best.pt`` (best ``bbox_AP``) and ``final.json``;
checkpoints are written atomically and hold the student detector with its optimizer, schedule, scaler, random
state and position, so ``--resume`` continues where a run stopped (mid-epoch included), and the first Ctrl-C or
SIGTERM stops after the current step with a resumable ``last.pt``. The loop reads top to bottom: set-up (data,
student, teacher, optimizer, schedule, resume, DDP) -> steps -> at each evaluation point (every ``train.eval_every``
``schedule.unit``\\ s, and at the end): COCO evaluation, then ``last.pt`` and, when it is the best, ``best.pt``;
``last.pt`` also at the end of every epoch.

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

import json
import math
import os
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

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

# The classification engine's loop helpers (private there; see the report on making them public).
from unikd.train import (
    AMP_DTYPES,
    _determinism,
    _EpochSampler,
    _graceful_stop,
    _raise_for_signal,
    _seed_everything,
    _StopRequest,
    _worker_kwargs,
    optimizer_step,
)

__all__ = ["evaluate_detection_checkpoint", "train_detector"]

MONITOR = "bbox_AP"


def train_detector(cfg: DetectionConfig, *, resume: bool = False) -> dict:
    """Train ``cfg``'s student detector with ``cfg``'s method; see the module docstring for the files written.

    Returns ``{"best_bbox_AP", "best_step", "last", "history"}`` (``last``: the metrics of the last evaluation;
    ``history``: one dict per evaluation). Raises ``UnikdError`` for bad input, a run directory/resume mismatch or a
    non-finite loss.
    """
    dist_info, device, owns_process_group = init_distributed(cfg.train.device)
    try:
        with _determinism(cfg.train.deterministic), _graceful_stop() as stop:
            return _train(cfg, resume, dist_info, device, stop)
    finally:
        if owns_process_group:
            dist.destroy_process_group()


def _train(cfg: DetectionConfig, resume: bool, dist_info: DistInfo, device: torch.device, stop: _StopRequest) -> dict:
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
        save_detection_config(cfg, output_dir / "config.yaml")

    # ---- data ----------------------------------------------------------------------------------------------------
    masks = cfg.model.student.arch == "mask_rcnn"
    with warnings.catch_warnings():
        if not dist_info.is_main:  # the dropped-box counts once, not once per rank
            warnings.simplefilter("ignore")
        data = build_detection_data(cfg.data, masks=masks)
    train_loader, train_sampler = _train_loader(cfg, data, dist_info, device)
    val_loader = _val_loader(cfg, data, dist_info, device)
    steps_per_epoch = min(len(train_loader), cfg.train.max_steps_per_epoch or len(train_loader))
    if steps_per_epoch == 0:
        raise UnikdError(
            f"train.batch_size: {cfg.train.batch_size} is larger than the training set ({len(data.train)} images with "
            "boxes); lower it"
        )
    unit_steps = steps_per_epoch if cfg.schedule.unit == "epoch" else 1  # steps per schedule unit
    total_steps = cfg.schedule.length * unit_steps
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    eval_period = cfg.train.eval_every * unit_steps
    per_rank_batch = cfg.train.batch_size // world

    # ---- student, teacher ----------------------------------------------------------------------------------------
    _seed_everything(cfg.train.seed)  # the student's initialisation depends on the seed only: paired runs
    student = detector_from_config(cfg.model.student, data.num_classes, cfg.data)
    trainable = TrainableDetector(student, cfg.method.name, **cfg.method.params).to(device)
    teacher = None
    if trainable.needs_teacher:
        teacher = load_teacher_detector(cfg.model.teacher, data.categories, cfg.data).to(device)

    # ---- optimizer, schedule, AMP --------------------------------------------------------------------------------
    optimizer = build_optimizer(trainable, cfg.optim)
    scheduler = build_scheduler(
        optimizer, _step_schedule(cfg, unit_steps), cfg.optim.lr, cfg.schedule.length, unit_steps
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
    trainable_params = [p for p in trainable.parameters() if p.requires_grad]

    # ---- resume --------------------------------------------------------------------------------------------------
    step = 0
    run_metrics = {"history": [], "best_bbox_AP": None, "best_step": None, "train_time_s": 0.0}
    checkpoint = None
    model_name = f"{cfg.model.student.arch}/{cfg.model.student.backbone}"
    if resume:
        checkpoint = load_checkpoint(last_path)
        if checkpoint.get("task") != "detection" or checkpoint["model_name"] != model_name:
            raise UnikdError(
                f"--resume: {last_path} holds a {checkpoint.get('task', 'classification')} run of "
                f"{checkpoint['model_name']}, but the config asks for a {model_name}; resume with the run's own "
                f"config ({output_dir / 'config.yaml'})"
            )
        if checkpoint["num_classes"] != data.num_classes or checkpoint["steps_per_epoch"] != steps_per_epoch:
            raise UnikdError(
                f"--resume: {last_path} was trained with {checkpoint['num_classes']} categories and "
                f"{checkpoint['steps_per_epoch']} steps per epoch, this config gives {data.num_classes} and "
                f"{steps_per_epoch}; resume with the run's own config ({output_dir / 'config.yaml'}) and world size"
            )
        student.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        step, run_metrics = checkpoint["step"], checkpoint["metrics"]

    # ---- distributed wrapping ------------------------------------------------------------------------------------
    model: nn.Module = trainable
    if dist_info.is_distributed:
        model = DistributedDataParallel(trainable, device_ids=[device.index] if device.type == "cuda" else None)

    def make_checkpoint() -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "task": "detection",
            "model_name": model_name,
            "num_classes": data.num_classes,
            "categories": data.categories,
            "model": student.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": step // steps_per_epoch,
            "step": step,
            "steps_per_epoch": steps_per_epoch,
            "rng": capture_rng_state(),
            "config": detection_config_to_dict(cfg),
            "metrics": run_metrics,
        }

    def evaluate_and_checkpoint(epoch: int) -> None:
        """Evaluation point: COCO metrics, then last.pt and (when it is the best so far) best.pt, in this order."""
        metrics = evaluate_detector(
            student,
            val_loader,
            data.val_ground_truth,
            data.label_to_category,
            device,
            image_ids=data.val_image_ids,
            iou_types=("bbox", "segm") if masks else ("bbox",),
            amp_dtype=amp_dtype,
        )
        record = {"split": "val", "step": step, "epoch": epoch, **metrics}
        record.update(train_time_s=run_metrics["train_time_s"], peak_mem_mb=peak_memory_mb(device))
        metrics_writer.write(record)
        run_metrics["history"].append({k: v for k, v in record.items() if k != "split"})
        is_best = run_metrics["best_bbox_AP"] is None or metrics[MONITOR] > run_metrics["best_bbox_AP"]
        if is_best:
            run_metrics["best_bbox_AP"], run_metrics["best_step"] = metrics[MONITOR], step
        if dist_info.is_main:
            state = make_checkpoint()
            save_checkpoint(state, last_path)
            if is_best:
                save_checkpoint(state, best_path)

    # Training randomness (flips, RoI sampling) starts from the seed after everything is built, the same across
    # methods; each rank its own stream. A resume restores it instead.
    _seed_everything(cfg.train.seed + dist_info.rank)
    if checkpoint is not None:
        restore_rng_state(checkpoint["rng"])

    # ---- the loop ------------------------------------------------------------------------------------------------
    metrics_writer = MetricsWriter(output_dir, enabled=dist_info.is_main, tensorboard=cfg.train.tensorboard)
    with metrics_writer:
        for epoch in range(step // steps_per_epoch, num_epochs):
            batches_done = step - epoch * steps_per_epoch  # > 0 only when resuming mid-epoch
            epoch_steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
            train_sampler.set_epoch(epoch)
            train_sampler.start = batches_done * per_rank_batch
            model.train()
            bar = progress_bar(epoch_steps, batches_done, f"epoch {epoch}", cfg.train.progress and dist_info.is_main)
            window: dict[str, torch.Tensor] = {}
            window_steps, window_start = 0, time.perf_counter()
            batches = iter(train_loader)
            for batch_index in range(batches_done, epoch_steps):
                step_start = time.perf_counter()
                images, targets = next(batches)
                images = [image.to(device, non_blocking=True) for image in images]
                targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    terms = model(images, targets, teacher)
                loss = sum(terms.values())

                # One check per step, agreed by all ranks, before the backward pass (as in unikd.train).
                stop_requested = stop.signum is not None
                if cfg.train.nan_check or dist_info.is_distributed:
                    flags = torch.stack([~torch.isfinite(loss.detach()), torch.tensor(stop_requested, device=device)])
                    flags = flags.float()
                    flags = all_reduce(flags, op="max").tolist() if dist_info.is_distributed else flags.tolist()
                    if cfg.train.nan_check and flags[0]:
                        raise UnikdError(_non_finite_message(terms, step + 1, epoch, last_path))
                    stop_requested = bool(flags[1])

                lr = optimizer.param_groups[0]["lr"]
                optimizer_step(loss, optimizer, scaler, trainable_params, cfg.optim.clip_grad_norm)
                scheduler.step()
                step += 1
                bar.update(1)
                run_metrics["train_time_s"] += time.perf_counter() - step_start

                for name, value in terms.items():
                    window[name] = window.get(name, 0.0) + value.detach().float()
                window_steps += 1
                if step % cfg.train.log_every == 0 or batch_index == epoch_steps - 1:
                    names = [*window, "loss"]
                    sums = torch.stack([*window.values(), sum(window.values())])
                    means = (all_reduce(sums) / (world * window_steps)).tolist()
                    images_per_s = window_steps * cfg.train.batch_size / (time.perf_counter() - window_start)
                    record = {"split": "train", "step": step, "epoch": epoch, "lr": lr, **dict(zip(names, means))}
                    record["images_per_s"] = images_per_s
                    metrics_writer.write(record)
                    bar.set_postfix({**dict(zip(names, means)), "lr": lr, "img/s": images_per_s}, refresh=False)
                    window, window_steps, window_start = {}, 0, time.perf_counter()

                if stop_requested:
                    if dist_info.is_main:
                        save_checkpoint(make_checkpoint(), last_path)
                    bar.close()
                    _raise_for_signal(stop.signum, last_path, dist_info.is_main)
                if step % eval_period == 0 or step == total_steps:
                    bar.clear()
                    evaluate_and_checkpoint(epoch)
                    model.train()
            bar.close()
            if step % eval_period and dist_info.is_main:  # end of an epoch between evaluation points
                save_checkpoint(make_checkpoint(), last_path)

    # ---- done ----------------------------------------------------------------------------------------------------
    history = run_metrics["history"]
    result = {
        "best_bbox_AP": run_metrics["best_bbox_AP"],
        "best_step": run_metrics["best_step"],
        "last": history[-1] if history else None,
        "train_time_s": run_metrics["train_time_s"],
        "history": history,
    }
    if dist_info.is_main:
        (output_dir / "final.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def evaluate_detection_checkpoint(path: str | os.PathLike, overrides: list[str] = ()) -> dict[str, float]:
    """Rebuild the student detector saved in the checkpoint ``path`` and return its COCO metrics on the validation set.

    ``overrides`` apply to the checkpoint's config (e.g. ``data.root=DIR``, ``train.device=cpu``).
    """
    checkpoint = load_checkpoint(path)
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
    student.load_state_dict(checkpoint["model"])
    return evaluate_detector(
        student.to(device),
        _val_loader(cfg, data, DistInfo(), device),
        data.val_ground_truth,
        data.label_to_category,
        device,
        image_ids=data.val_image_ids,
        iou_types=("bbox", "segm") if masks else ("bbox",),
        amp_dtype=AMP_DTYPES[cfg.train.amp],
    )


# ---- helpers -----------------------------------------------------------------------------------------------------


def _non_finite_message(terms: dict[str, torch.Tensor], step: int, epoch: int, last_path: Path) -> str:
    bad = [f"{name}={value.item()}" for name, value in terms.items() if not math.isfinite(value.item())]
    culprit = ", ".join(bad) if bad else "on another process"
    last = f"last good checkpoint: {last_path}" if last_path.is_file() else "no checkpoint was written yet"
    return (
        f"non-finite loss at step {step} (epoch {epoch}): {culprit}; {last}. Lower optim.lr, lengthen "
        "schedule.warmup_iters, set optim.clip_grad_norm, or use train.amp=bf16 instead of fp16"
    )


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
) -> tuple[DataLoader, _EpochSampler]:
    sampler = _EpochSampler(
        data.train,
        num_replicas=dist_info.world_size,
        rank=dist_info.rank,
        shuffle=True,
        seed=cfg.train.seed,
        drop_last=True,
    )
    generator = torch.Generator().manual_seed(cfg.train.seed * 1000 + dist_info.rank)  # data workers' flips
    loader = DataLoader(
        data.train,
        batch_size=cfg.train.batch_size // dist_info.world_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate_detection,
        generator=generator,
        **_worker_kwargs(cfg, device),
    )
    return loader, sampler


def _val_loader(cfg: DetectionConfig, data: DetectionData, dist_info: DistInfo, device: torch.device) -> DataLoader:
    dataset = data.val
    if dist_info.is_distributed:  # every image exactly once over all ranks
        dataset = Subset(dataset, range(dist_info.rank, len(dataset), dist_info.world_size))
    batch_size = max(1, cfg.train.eval_batch_size // dist_info.world_size)
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collate_detection, **_worker_kwargs(cfg, device))
