"""The training engine: ``train(cfg)`` runs one experiment; ``evaluate_checkpoint(path)`` scores a saved student and
``evaluate_weights(name, path)`` any weights file.

``train`` reads as four phases: ``_set_up`` (run directory, resume checks, data, models, optimizer), then per epoch
``_train_epoch`` (each step one ``_train_step``) and ``_end_epoch`` (finiteness check, evaluation, checkpoints),
then ``_finish`` (``final.json``); the helpers it shares with the detection engine (run directory, seeding, the
graceful stop, loaders, the per-step checks, resume checks) are ``unikd._engine``'s. It prints a header and one line
per epoch, and writes into ``cfg.output_dir``::

    config.yaml     the resolved config (rewritten when a resume changes a key that may change)
    metrics.jsonl   one line per logged train step, per evaluation and per resume (see unikd._logging)
    tb/             TensorBoard events (train.tensorboard)
    last.pt         checkpoint at the end of every epoch, and on interrupt (format: unikd._checkpoint)
    best.pt         checkpoint of the epoch with the best validation top-1
    final.json      the dict ``train`` returns, once the run completes
    .lock           present while a run works there

Integrity (unikd._rundir): the run locks its directory, so a second run there fails at once; writability and free
space are checked before any work; every file is written atomically, best.pt before last.pt, so the set of files is
consistent (or repaired on ``--resume``) whenever the process dies; no checkpoint is written from a model whose
parameters, buffers or optimizer state hold a NaN or an infinity (the run stops, as for a non-finite loss).

Weights: the teacher (``model.teacher_checkpoint``) and the student's initialisation (``model.student_checkpoint``,
new runs only) are read by ``unikd.models`` in any layout it knows (detected, or ``model.*_format``); the header and
metrics.jsonl (``"split": "weights"``) say what was read. The teacher is frozen (no gradient, no optimizer, no DDP),
in eval mode or, with ``model.teacher_mode=train``, with its BatchNorm in train mode. A method whose
``teacher_source`` is ``"ema"`` gets its ``teacher_logits`` from timm's ``ModelEmaV3`` of the student instead (eval
mode, updated after every optimizer step on every rank, saved as ``ckpt["ema"]``).

Determinism: the same ``train.seed`` gives the same student initialisation and the same data order whatever the
method (the student is built right after seeding, before the method; each epoch's order is a function of
(seed, epoch)), which pairs runs across methods. The training images are augmented as a function of (seed, epoch,
sample index) and MixUp/CutMix drawn as one of (seed, epoch, batch index, rank) (unikd._sampling), so the batches do
not depend on the number of data workers, ranks or the resume point. ``train.deterministic`` also asks torch for
deterministic kernels.

Teacher cache (``train.teacher_cache``, unikd._teacher_cache): the checkpoint teacher's logits of each batch are
read from the cache, or computed and stored, so a warm float32 cache trains bit for bit what the live teacher
trains. The teacher is then only read and fingerprinted (``models.read_model_weights``) and built on the first
miss; its validation top-1 is cached too, so a run that is all cached never builds it. The header says what the
cache holds for the run (or why not: the fingerprint fields that differ) and its size per epoch; each epoch's line
and a ``"split": "teacher_cache"`` record give the batches read and computed; ``train.teacher_cache_verify`` batches
of each epoch are re-computed and must match. A run whose missing logits its disk cannot hold does not start.

Interrupts: the first SIGINT (Ctrl-C) or SIGTERM asks the loop to stop after the current training step (one that
arrives during evaluation takes effect at the next step; all ranks agree on the step); it saves a resumable
``last.pt`` (mid-epoch position included) and raises ``KeyboardInterrupt`` for SIGINT (the CLI exits 130) or
``SystemExit(143)`` for SIGTERM. A second Ctrl-C aborts at once. Data workers ignore both signals. An unreadable
image (``DataError``) stops the run the same way, after saving, so that it continues once the file is fixed.

Resume: ``--resume`` (``train(cfg, resume=True)``) continues from ``last.pt``. The config must be the run's own,
except for ``config.SAFE_TO_CHANGE_ON_RESUME`` (each change is printed and recorded in metrics.jsonl), and the
dataset must have as many images as before. On CPU the resumed run is bit-identical to an uninterrupted one, with
or without data workers (nothing is loaded or drawn for the batches of the epoch already trained).

Distributed: under torchrun each rank takes ``train.batch_size / world_size`` images per step; the student and the
method are wrapped in DDP (the frozen teacher is not); metrics are all-reduced and only rank 0 writes files. Plain
BatchNorm keeps per-rank batch statistics (and USKD's target term a per-rank batch mean, as in its released
multi-GPU code), so N ranks match one process only for BatchNorm-free models and per-sample losses.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from unikd._checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    capture_rng_state,
    load_checkpoint,
    load_student_weights,
    non_finite_state,
    restore_rng_state,
)
from unikd._distributed import DistInfo, all_reduce, init_distributed, resolve_device
from unikd._engine import (
    AMP_DTYPES,
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
    on_main_rank,
    optimizer_step,
    raise_for_signal,
    resume_checkpoint,
    run_directory,
    seed_everything,
    stop_data_workers,
    worker_kwargs,
    wrap_ddp,
)
from unikd._errors import DataError, UnikdError
from unikd._logging import MetricsWriter, console, peak_memory_mb, progress_bar
from unikd._optim import build_optimizer, build_scheduler
from unikd._rundir import (
    CONFIG,
    FINAL,
    LAST,
    METRICS,
    check_writable,
    trim_metrics,
    write_checkpoints,
    write_json,
    write_text,
)
from unikd._sampling import EpochBatchSampler, keyed_loader, preserved_rng
from unikd._teacher_cache import (
    TeacherCache,
    data_fingerprint,
    epoch_bytes,
    read_teacher_scores,
    teacher_fingerprint,
    write_teacher_scores,
)
from unikd.config import (
    SAFE_TO_CHANGE_ON_RESUME,
    Config,
    ModelConfig,
    check_teacher_num_classes,
    config_for_checkpoint,
    config_for_weights,
    config_from_dict,
    config_to_dict,
    dump_config,
)
from unikd.data import DataBundle, build_datasets, build_mix, dataset_root, mix_description
from unikd.methods import METHODS, Method, create_method, forward_student
from unikd.models import create_model, feature_dim, init_student_from_file, load_model_weights, read_model_weights

__all__ = [
    "TrainableModules",
    "evaluate",
    "evaluate_checkpoint",
    "evaluate_weights",
    "optimizer_step",
    "student_for_evaluation",
    "student_from_checkpoint",
    "teacher_from_config",
    "train",
]

# What a non-finite loss or model state advises (the detection engine's advice adds its warm-up).
_LOSS_ADVICE = "Lower optim.lr, set optim.clip_grad_norm, or use train.amp=bf16 instead of fp16"
_STATE_ADVICE = "Lower optim.lr, set optim.clip_grad_norm, or check the data for huge values"


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


@dataclass
class _Run:
    """Everything one training run holds, built by ``_set_up``; ``step`` and ``metrics`` advance as it trains."""

    cfg: Config
    dist: DistInfo
    device: torch.device
    output_dir: Path
    bundle: DataBundle
    train_loader: DataLoader
    train_sampler: EpochBatchSampler
    val_loader: DataLoader
    steps_per_epoch: int
    student: nn.Module
    method: Method
    teacher: nn.Module | None  # the frozen checkpoint teacher once built (with a teacher cache: on the first miss)
    ema: ModelEmaV3 | None  # the EMA copy of the student that gives teacher_logits (method.teacher_source == "ema")
    model: nn.Module  # what a step calls: TrainableModules, wrapped in DDP and/or compiled
    eval_model: nn.Module  # the student, compiled or not
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    run_id: str
    start_epoch: int
    step: int
    metrics: dict  # history, best_top1, best_epoch, teacher_top1, epoch_train_time_s (of a mid-epoch checkpoint)
    writer: MetricsWriter | None = None
    trainable_params: list[nn.Parameter] = field(default_factory=list)
    resumed: bool = False
    safe_changes: dict[str, tuple] = field(default_factory=dict)  # config keys a resume changed, all safe ones
    weights: dict[str, str] = field(default_factory=dict)  # what was read from which file: "teacher", "student"
    build_teacher: Callable[[], nn.Module] | None = None  # builds the checkpoint teacher when it is still None
    teacher_cache: TeacherCache | None = None
    cache_info: dict = field(default_factory=dict)  # the header's teacher-cache line, as a metrics record
    cache_counts: dict[str, int] = field(default_factory=dict)  # this epoch's batches: hits, misses, verified

    @property
    def has_teacher(self) -> bool:
        """Whether the method takes a checkpoint teacher's logits (built or not)."""
        return self.teacher is not None or self.build_teacher is not None

    def live_teacher(self) -> nn.Module:
        """The checkpoint teacher, built now if it was not: outside the seeded streams (its initialisation draws
        from the global generators before its weights are loaded), so a run is the same whenever it is built."""
        if self.teacher is None:
            with preserved_rng():
                self.teacher = self.build_teacher()
        return self.teacher

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return AMP_DTYPES[self.cfg.train.amp]

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.cfg.train.channels_last else torch.contiguous_format

    def say(self, message: str) -> None:
        """Print one line to the console (rank 0 only)."""
        console(message, enabled=self.dist.is_main)


@dataclass
class _EpochStats:
    """What ``_train_epoch`` measured, for the epoch's line and its val record."""

    train_time_s: float
    loss_sum: torch.Tensor  # summed over this process's steps of the epoch (not all-reduced yet)
    steps: int


def train(cfg: Config, *, resume: bool = False) -> dict:
    """Train ``cfg``'s student with ``cfg``'s method; see the module docstring for what is written where.

    Returns ``{"best_top1", "best_epoch", "last_top1", "last_top5", "teacher_top1", "history", "device", "run_id"}``
    (accuracies in percent; history: one dict per evaluation). Raises ``UnikdError`` for a user error: the run
    directory, a resume that does not fit the run, a non-finite loss or model state, damaged data.
    """
    dist_info, device, owns_process_group = init_distributed(cfg.train.device)
    try:
        with (
            determinism(cfg.train.deterministic),
            graceful_stop() as stop,
            run_directory(cfg.output_dir, resume, dist_info, device) as output_dir,
        ):
            run = _set_up(cfg, resume, output_dir, dist_info, device)
            try:
                _open_logs(run)
                with run.writer:
                    for epoch in range(run.start_epoch, cfg.train.epochs):
                        stats = _train_epoch(run, epoch, stop)
                        _end_epoch(run, epoch, stats)
                return _finish(run)
            finally:
                stop_data_workers(run.train_loader, run.val_loader)
                if run.teacher_cache is not None:
                    run.teacher_cache.close()
    finally:
        if owns_process_group:
            dist.destroy_process_group()


# ---- phase 1: set-up ---------------------------------------------------------------------------------------------


def _set_up(cfg: Config, resume: bool, output_dir: Path, dist_info: DistInfo, device: torch.device) -> _Run:
    """Everything before the first step: checks that need no data first, then data, models, optimizer, state."""
    check_run_settings(cfg.train, device, dist_info.world_size)
    checkpoint, safe_changes = _resume_checkpoint(cfg, output_dir, dist_info, device) if resume else (None, {})

    seed_everything(cfg.train.seed)
    bundle = build_datasets(cfg.data)
    check_teacher_num_classes(cfg.model, bundle.num_classes)
    if checkpoint is not None:
        _check_same_data(checkpoint, bundle, output_dir)
    train_loader = _train_loader(cfg, bundle.train, bundle.num_classes, dist_info, device)
    train_sampler = train_loader.batch_sampler
    val_loader = _eval_loader(cfg, bundle.val, dist_info, device)
    steps_per_epoch = train_sampler.num_batches
    if steps_per_epoch == 0:
        raise UnikdError(
            f"train.batch_size: {cfg.train.batch_size} is larger than the training set ({len(bundle.train)} images); "
            "lower it"
        )

    # Seed again right before the student so its initialisation depends on the seed only (not on the data
    # pipeline, not on the method built after it): paired runs across methods start from the same weights.
    seed_everything(cfg.train.seed)
    cache_wanted = cfg.train.teacher_cache is not None
    models = _build_models(cfg, bundle, device, initialise=checkpoint is None, lazy_teacher=cache_wanted)
    student, method = models.student, models.method
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    trainable = TrainableModules(student, method, cfg.model.feature_layer).to(device, memory_format=memory_format)
    # The EMA copy is made of the student as it starts (on its device), and is never given to DDP or the optimizer.
    ema = None
    if method.teacher_source == "ema":
        ema = ModelEmaV3(student, decay=cfg.train.ema_decay, use_warmup=cfg.train.ema_warmup)
    optimizer = build_optimizer(trainable, cfg.optim)
    needed = _checkpoint_bytes(trainable, cfg.optim, ema)
    on_main_rank(lambda: check_writable(output_dir, needed), dist_info, device)
    run = _Run(
        cfg=cfg, dist=dist_info, device=device, output_dir=output_dir, bundle=bundle, train_loader=train_loader,
        train_sampler=train_sampler, val_loader=val_loader, steps_per_epoch=steps_per_epoch, student=student,
        method=method, teacher=models.teacher, ema=ema, model=trainable, eval_model=student, optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg.schedule, cfg.optim.lr, cfg.train.epochs, steps_per_epoch),
        scaler=torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16"),
        run_id=uuid.uuid4().hex, start_epoch=0, step=0,
        metrics={"history": [], "best_top1": None, "best_epoch": None, "teacher_top1": None, "epoch_train_time_s": 0.0},
        trainable_params=[p for p in trainable.parameters() if p.requires_grad], weights=models.weights,
        build_teacher=models.build_teacher,
    )  # fmt: skip
    if checkpoint is not None:
        _restore(run, checkpoint)
    run.resumed, run.safe_changes = checkpoint is not None, safe_changes
    if cache_wanted:
        _open_teacher_cache(run, models.teacher_state)
    _wrap_model(run, trainable)

    # Training randomness (dropout, augmentations drawn in this process) starts from the seed after everything is
    # built, so it too is the same across methods; each rank gets its own stream. A resume restores it instead.
    seed_everything(cfg.train.seed + dist_info.rank)
    if checkpoint is not None:
        restore_rng_state(checkpoint["rng"])
    return run


def _resume_checkpoint(
    cfg: Config, output_dir: Path, dist_info: DistInfo, device: torch.device
) -> tuple[dict, dict[str, tuple]]:
    """``last.pt`` after rank 0 repaired the checkpoint set, and the config changes, all of them safe ones.

    Raises ``UnikdError`` listing the differing keys when the config differs elsewhere from the one stored in the
    checkpoint (the config the run was trained with).
    """
    checkpoint = resume_checkpoint(output_dir, dist_info, device)
    changes = check_resume_config(
        checkpoint["config"], cfg, from_dict=config_from_dict, safe=SAFE_TO_CHANGE_ON_RESUME, output_dir=output_dir
    )
    epochs_needed = checkpoint["epoch"] + checkpoint["mid_epoch"]  # the epochs done, and the one in progress
    if cfg.train.epochs < epochs_needed:
        raise UnikdError(
            f"train.epochs: {cfg.train.epochs} is fewer than the {epochs_needed} epochs the run in {output_dir} has "
            f"trained or started; pass train.epochs={epochs_needed} or more"
        )
    return checkpoint, changes


def _check_same_data(checkpoint: dict, bundle: DataBundle, output_dir: Path) -> None:
    now = {"train_images": len(bundle.train), "val_images": len(bundle.val)}
    if checkpoint["data"] != now:
        before = ", ".join(f"{key} {checkpoint['data'].get(key)} -> {value}" for key, value in now.items())
        raise UnikdError(
            f"--resume: the dataset changed since {output_dir / LAST} was written ({before}); resume with the data "
            "the run was trained on (replace damaged images rather than delete them)"
        )


@dataclass
class _Models:
    student: nn.Module
    method: Method
    teacher: nn.Module | None
    weights: dict[str, str]  # one line per file read: "teacher", "student" (initialisation)
    build_teacher: Callable[[], nn.Module] | None = None  # lazy_teacher: builds the teacher that was only read
    teacher_state: dict | None = None  # lazy_teacher: the teacher's weights, in its key names (its fingerprint)


def _build_models(
    cfg: Config, bundle: DataBundle, device: torch.device, *, initialise: bool, lazy_teacher: bool = False
) -> _Models:
    """The student (initialised from ``model.student_checkpoint`` when ``initialise``: a new run), the method (with
    USKD's weak head sized to the student's feature) and the frozen teacher, each on its way to ``device``.

    ``lazy_teacher`` (a teacher cache): a ``model.teacher_checkpoint`` teacher is only read (its weights fingerprint
    it) and ``build_teacher`` builds it on the first cache miss; a pretrained teacher is built (to fingerprint its
    weights) but runs only on a miss too.
    """
    num_classes, model_cfg = bundle.num_classes, cfg.model
    student = create_model(model_cfg.student, num_classes, in_chans=bundle.in_chans, **model_cfg.student_kwargs)
    report = None
    if initialise and model_cfg.student_checkpoint is not None:
        report = init_student_from_file(
            student, model_cfg.student, model_cfg.student_checkpoint, layout=model_cfg.student_format,
            model_kwargs=model_cfg.student_kwargs,
        )  # fmt: skip
    method_cls = METHODS[cfg.method.name]
    student_feature_dim = None
    if method_cls.student_output_for(cfg.method.params) in ("feature", "feature_map"):
        student_feature_dim = feature_dim(student, model_cfg.feature_layer)
    method = create_method(cfg.method.name, num_classes, feature_dim=student_feature_dim, **cfg.method.params)
    weights = {}
    if report is not None:
        weights["student"] = report.describe() + _reuse_weak_head(method, report)
    models = _Models(student, method, None, weights)
    if method.teacher_source != "checkpoint":
        return models
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format

    def frozen(teacher: nn.Module) -> nn.Module:
        # Frozen either way: no gradient, no optimizer. teacher_mode=train only lets its BatchNorm normalise with the
        # batch's statistics (and update its running ones), as cls_KD's ImageNet runs left it.
        teacher = teacher.to(device, memory_format=memory_format).requires_grad_(False)
        return teacher.train(model_cfg.teacher_mode == "train")

    if lazy_teacher and model_cfg.teacher_checkpoint is not None:
        state, report, build = read_model_weights(
            model_cfg.teacher, num_classes, model_cfg.teacher_checkpoint, layout=model_cfg.teacher_format,
            role="teacher", in_chans=bundle.in_chans, **model_cfg.teacher_kwargs,
        )  # fmt: skip
        weights["teacher"] = report.describe()
        models.teacher_state, models.build_teacher = state, lambda: frozen(build(state))
        return models
    teacher, weights["teacher"] = teacher_from_config(model_cfg, num_classes, bundle.in_chans)
    if lazy_teacher:
        models.teacher_state = teacher.state_dict()
    models.teacher = frozen(teacher)
    return models


def _reuse_weak_head(method: Method, report) -> str:
    """Load a unikd checkpoint's weak head (``report.method_state``) into ``method`` when it fits; what was done."""
    own, stored = method.state_dict(), report.method_state
    if not own or not stored:
        return ""  # nothing to reuse: the weak head (if any) starts fresh, as in any run
    if report.reinitialized:
        return "; its weak head is for another class count: re-initialised too"
    if set(stored) != set(own) or any(stored[key].shape != own[key].shape for key in own):
        keys = ", ".join(sorted(stored))
        return f"; its method state ({keys}) does not fit this method: weak head initialised afresh"
    method.load_state_dict(stored)
    return "; weak head from the checkpoint"


def _checkpoint_bytes(trainable: nn.Module, optim_cfg, ema: ModelEmaV3 | None = None) -> int:
    """About the size of one checkpoint: the weights and buffers (and the EMA copy's), the optimizer's
    per-parameter slots, and 1 MiB."""
    tensors = [*trainable.state_dict().values(), *(ema.module.state_dict().values() if ema is not None else ())]
    state = sum(tensor.numel() * tensor.element_size() for tensor in tensors)
    parameters = sum(p.numel() * p.element_size() for p in trainable.parameters() if p.requires_grad)
    slots = 2 if optim_cfg.name == "adamw" else int(optim_cfg.momentum > 0)
    return state + slots * parameters + 2**20


def _restore(run: _Run, checkpoint: dict) -> None:
    """Put the run where ``checkpoint`` left it: weights, optimizer, schedule, scaler, position and metrics."""
    last = run.output_dir / LAST
    load_student_weights(run.student, checkpoint, last)
    try:
        run.method.load_state_dict(checkpoint["method"])
        run.optimizer.load_state_dict(checkpoint["optimizer"])
        run.scheduler.load_state_dict(checkpoint["scheduler"])
        run.scaler.load_state_dict(checkpoint["scaler"])
        if run.ema is not None:
            run.ema.module.load_state_dict(checkpoint["ema"])
    except (RuntimeError, ValueError, KeyError, TypeError) as error:  # an edited file: its config matched
        reason = " ".join(str(error).split())[:300]
        raise UnikdError(f"--resume: cannot restore the run from {last} ({type(error).__name__}: {reason})") from None
    run.run_id, run.start_epoch, run.step = checkpoint["run_id"], checkpoint["epoch"], checkpoint["step"]
    run.metrics = {"teacher_top1": None, **checkpoint["metrics"]}


def _wrap_model(run: _Run, trainable: TrainableModules) -> None:
    if run.dist.is_distributed:
        run.model = wrap_ddp(trainable, run.device)
    if run.cfg.train.compile:
        run.model, run.eval_model = torch.compile(run.model), torch.compile(run.student)


def _open_teacher_cache(run: _Run, teacher_state: dict | None) -> None:
    """Open ``train.teacher_cache`` for this run's teacher, data pipeline and seed, say how much of the run it
    holds (and, when not all of it, why), and refuse to start when the disk cannot hold what is missing.

    Only a checkpoint teacher is cached: EMA soft targets (USKD's S2) change every step, and a method without a
    teacher has nothing to cache (the header says so). Under DDP every rank reads and writes its own share.
    """
    cfg, bundle, train_cfg = run.cfg, run.bundle, run.cfg.train
    if not run.has_teacher:
        source = "an EMA copy of the student" if run.ema is not None else "no teacher"
        run.cache_info = {"used": False, "reason": f"method {cfg.method.name} takes {source}"}
        return
    per_rank = train_cfg.batch_size // run.dist.world_size
    device = run.device.type
    if device == "cuda":
        device += f" {torch.cuda.get_device_name(run.device)}, cudnn {torch.backends.cudnn.version()}"
    teacher_fp = teacher_fingerprint(
        cfg.model.teacher, {**cfg.model.teacher_kwargs, "in_chans": bundle.in_chans}, teacher_state,
        num_classes=bundle.num_classes, mode=cfg.model.teacher_mode, device=device, amp=train_cfg.amp,
        memory_format="channels_last" if train_cfg.channels_last else "contiguous", batch_size=per_rank,
        deterministic=train_cfg.deterministic,
    )  # fmt: skip
    cache = TeacherCache(
        train_cfg.teacher_cache, teacher=teacher_fp, data=_data_fingerprint(run, bundle.train, training=True),
        seed=train_cfg.seed, num_classes=bundle.num_classes, num_samples=len(bundle.train),
        dtype=train_cfg.teacher_cache_dtype,
    )  # fmt: skip
    epochs = range(run.start_epoch, train_cfg.epochs)
    rows_per_epoch = run.steps_per_epoch * train_cfg.batch_size
    statuses = [cache.status(run.train_sampler.epoch_keys(epoch)) for epoch in epochs]
    cache.check_space(len(epochs), rows_per_epoch, rows_per_record=per_rank, stored=cache.stored_bytes(epochs))
    scores = read_teacher_scores(cache.root, teacher_fp, _data_fingerprint(run, bundle.val, training=False))
    complete = sum(status.complete for status in statuses)
    reason = next((status.reason for status in statuses if not status.complete), None)
    run.teacher_cache = cache
    run.cache_info = {
        "used": True, "entry": str(cache.entry_dir), "dtype": cache.dtype,
        "epoch_mb": epoch_bytes(rows_per_epoch, per_rank, bundle.num_classes, cache.dtype) / 1e6,
        "epochs_cached": complete, "epochs": len(epochs), "teacher_top1_cached": scores is not None,
        "resumed": run.resumed, "reason": reason, "verify": train_cfg.teacher_cache_verify,
    }  # fmt: skip
    if scores is not None and not run.resumed:
        run.metrics["teacher_top1"] = scores["top1"]


def _data_fingerprint(run: _Run, dataset: Dataset, *, training: bool):
    """The teacher cache's fingerprint of the training images (augmented, as a function of the seed) or of the
    validation images (what the teacher's top-1 was measured on)."""
    cfg, bundle = run.cfg, run.bundle
    subset = None
    if isinstance(dataset, Subset):
        dataset, subset = dataset.dataset, list(dataset.indices)
    extra = {"channels": bundle.in_chans, "num_classes": bundle.num_classes}
    if not training:
        extra.update(eval_batch_size=cfg.train.eval_batch_size, ranks=run.dist.world_size, amp=cfg.train.amp)
    return data_fingerprint(
        dataset=cfg.data.name, root=None if cfg.data.name == "fake" else dataset_root(cfg.data),
        num_samples=len(dataset), transform=getattr(dataset, "transform", None), img_size=bundle.img_size,
        subset=subset, mix=mix_description(cfg.data) if training else None, batch_size=cfg.train.batch_size,
        world_size=run.dist.world_size, split="train" if training else "val", **extra,
    )  # fmt: skip


def _teacher_top1(run: _Run) -> float:
    """The teacher's validation top-1: read from the teacher cache when it holds it (on every rank, or on none:
    the measurement is collective), else measured, and stored there."""
    known = run.metrics["teacher_top1"]
    if run.dist.is_distributed:
        missing = all_reduce(torch.tensor(float(known is None), device=run.device), op="max")
        known = None if missing.item() else known
    if known is not None:
        return known
    top1 = evaluate(run.live_teacher(), run.val_loader, run.device, amp_dtype=run.amp_dtype)["top1"]
    if run.teacher_cache is not None and run.dist.is_main:
        val_fp = _data_fingerprint(run, run.bundle.val, training=False)
        write_teacher_scores(run.teacher_cache.root, run.teacher_cache.teacher, val_fp, {"top1": top1})
    return top1


def _open_logs(run: _Run) -> None:
    """Measure the teacher (once per run), write config.yaml, drop the metrics a resume will log again, open the
    writers, print the header and any resume changes."""
    cfg, output_dir, resumed = run.cfg, run.output_dir, run.resumed
    if run.has_teacher and not resumed:  # a resume reads it from the checkpoint
        run.metrics["teacher_top1"] = _teacher_top1(run)

    def write_run_files() -> None:
        write_text(output_dir / CONFIG, dump_config(cfg))
        trim_metrics(output_dir / METRICS, run.step, run.start_epoch)
        if resumed and run.start_epoch < cfg.train.epochs:
            (output_dir / FINAL).unlink(missing_ok=True)  # the run goes on: that result no longer describes it

    on_main_rank(write_run_files, run.dist, run.device)
    run.writer = MetricsWriter(
        output_dir, enabled=run.dist.is_main, tensorboard=cfg.train.tensorboard, purge_step=run.step + 1
    )
    _print_header(run, resumed)
    if run.weights:  # what was read from which file (the header's lines), for the record
        run.writer.write({"split": "weights", "step": run.step, "epoch": run.start_epoch, **run.weights})
    if run.cache_info:
        run.writer.write({"split": "teacher_cache", "step": run.step, "epoch": run.start_epoch, **run.cache_info})
    if run.safe_changes:
        for key, (old, new) in run.safe_changes.items():
            run.say(f"unikd: resume: {key} {old!r} -> {new!r}")
        changed = {key: [old, new] for key, (old, new) in run.safe_changes.items()}
        run.writer.write({"split": "resume", "step": run.step, "epoch": run.start_epoch, "changed": changed})


def _print_header(run: _Run, resumed: bool) -> None:
    cfg, bundle = run.cfg, run.bundle
    count = sum(p.numel() for p in run.student.parameters())
    parameters = f"{count / 1e6:.2f}M" if count >= 100_000 else f"{count:,}"
    image = f"{bundle.in_chans}x{bundle.img_size}x{bundle.img_size}"
    run.say(
        f"unikd train: {cfg.model.student} ({parameters} parameters), method {cfg.method.name}, "
        f"device {run.device}{f' x {run.dist.world_size} processes' if run.dist.is_distributed else ''}"
    )
    run.say(f"  data: {cfg.data.name}, {len(bundle.train)} training / {len(bundle.val)} validation images, "
            f"{bundle.num_classes} classes, {image}")  # fmt: skip
    if run.has_teacher:
        run.say(f"  teacher: {cfg.model.teacher} from {cfg.model.teacher_checkpoint or 'pretrained weights'} "
                f"({cfg.model.teacher_mode} mode), validation top-1 {run.metrics['teacher_top1']:.2f}")  # fmt: skip
        run.say(f"    read {run.weights['teacher']}")
    if run.cache_info:
        run.say(f"  teacher cache: {_cache_line(run.cache_info, cfg.train.teacher_cache)}")
    if "student" in run.weights:
        run.say(f"  student initialised from {run.weights['student']}")
    if run.ema is not None:
        warmup = ", with warm-up" if cfg.train.ema_warmup else ""
        run.say(f"  teacher logits: an EMA copy of the student (train.ema_decay {cfg.train.ema_decay:g}{warmup})")
    where = f"resumed at epoch {run.start_epoch}, step {run.step}" if resumed else "new run"
    run.say(f"  {cfg.train.epochs} epochs x {run.steps_per_epoch} steps of {cfg.train.batch_size} images; "
            f"output_dir {run.output_dir} ({where})")  # fmt: skip


def _cache_line(info: dict, root: str) -> str:
    """The header's teacher-cache line, e.g. '<entry> (float32, 0.5 MB an epoch): 2 of 2 epochs cached, ...'."""
    if not info["used"]:
        return f"{root} not used ({info['reason']})"
    line = f"{info['entry']} ({info['dtype']}, {info['epoch_mb']:.1f} MB an epoch): "
    line += f"{info['epochs_cached']} of {info['epochs']} epochs cached"
    top1_known = info["teacher_top1_cached"] or info["resumed"]  # a resume reads it from the checkpoint
    if info["epochs_cached"] == info["epochs"] and top1_known and not info["verify"]:
        line += ", the teacher is not built"
    elif info["reason"]:
        line += f"; the teacher computes the rest ({info['reason']})"
    if info["verify"]:
        line += f"; {info['verify']} cached batches an epoch are re-checked by the live teacher"
    return line


# ---- phase 2: one epoch, one step --------------------------------------------------------------------------------


def _train_epoch(run: _Run, epoch: int, stop: StopRequest) -> _EpochStats:
    """Train epoch ``epoch`` from where the run stands (mid-epoch after a resume), logging every ``log_every`` steps.

    Stops the run after the current step on SIGINT/SIGTERM, and before a batch with an unreadable image, saving a
    resumable ``last.pt`` either way.
    """
    cfg, steps_per_epoch = run.cfg, run.steps_per_epoch
    batches_done = run.step - epoch * steps_per_epoch  # > 0 only when resuming mid-epoch
    run.train_sampler.set_epoch(epoch)
    run.train_sampler.start_batch = batches_done  # nothing is loaded, nor drawn, for the batches already trained
    time_before = run.metrics["epoch_train_time_s"] if batches_done else 0.0
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    run.model.train()
    run.cache_counts = {"hits": 0, "misses": 0, "verified": 0}
    bar = progress_bar(steps_per_epoch, batches_done, f"epoch {epoch}", cfg.train.progress and run.dist.is_main)
    window: dict[str, torch.Tensor] = {}
    window_steps, window_start, epoch_start = 0, time.perf_counter(), time.perf_counter()
    loss_sum, steps = torch.zeros((), device=run.device), 0
    batches = iter(run.train_loader)
    for batch_index in range(batches_done, steps_per_epoch):
        try:
            images, target, keys = next(batches)  # keys: (N, 4) int64 (epoch, batch, slot, index)
        except DataError as error:
            bar.close()
            if run.dist.is_distributed:  # torchrun stops the other ranks
                raise
            _save_mid_epoch(run, epoch, time_before + time.perf_counter() - epoch_start)
            raise DataError(
                f"{error}; saved {run.output_dir / LAST}, continue with --resume once it is fixed"
            ) from None
        progress = epoch + batch_index / steps_per_epoch
        terms, lr, stop_requested = _train_step(run, images, target, keys, progress, stop)
        bar.update(1)
        for name, value in terms.items():
            window[name] = window.get(name, 0.0) + value.detach().float()
        loss_sum += sum(terms.values()).detach().float()
        window_steps, steps = window_steps + 1, steps + 1
        if run.step % cfg.train.log_every == 0 or batch_index == steps_per_epoch - 1:
            log_train_window(
                run.writer, bar, window, steps=window_steps, seconds=time.perf_counter() - window_start,
                step=run.step, epoch=epoch, lr=lr, batch_size=cfg.train.batch_size, world_size=run.dist.world_size,
            )  # fmt: skip
            window, window_steps, window_start = {}, 0, time.perf_counter()
        if stop_requested:
            bar.close()
            _save_mid_epoch(run, epoch, time_before + time.perf_counter() - epoch_start)
            raise_for_signal(stop.signum, run.output_dir / LAST, run.dist.is_main)
    bar.close()
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    return _EpochStats(time_before + time.perf_counter() - epoch_start, loss_sum, steps)


def _train_step(
    run: _Run, images: torch.Tensor, target: torch.Tensor, keys: torch.Tensor, progress: float, stop: StopRequest
) -> tuple[dict[str, torch.Tensor], float, bool]:
    """One optimizer step; returns the loss terms, the learning rate it used, and whether to stop after it.

    One check per step, agreed by all ranks, before the backward pass: a non-finite loss stops the run (the last
    checkpoint stays as it was); a stop request stops it after this step.
    """
    images = images.to(run.device, non_blocking=True, memory_format=run.memory_format)
    target = target.to(run.device, non_blocking=True)
    with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
        teacher_logits = None
        if run.teacher_cache is not None:
            teacher_logits = _cached_teacher_logits(run, images, keys)
        elif run.teacher is not None or run.ema is not None:  # the frozen teacher, or the student's EMA copy (eval)
            with torch.no_grad():
                teacher_logits = (run.teacher if run.teacher is not None else run.ema.module)(images).float()
        terms = run.model(images, target, teacher_logits, progress)
    loss = sum(terms.values())
    non_finite, stop_requested = check_step(
        loss, stop, nan_check=run.cfg.train.nan_check, dist_info=run.dist, device=run.device
    )
    if non_finite:
        last = run.output_dir / LAST
        raise UnikdError(non_finite_loss_message(terms, run.step + 1, int(progress), last, _LOSS_ADVICE))
    lr = run.optimizer.param_groups[0]["lr"]
    optimizer_step(loss, run.optimizer, run.scaler, run.trainable_params, run.cfg.optim.clip_grad_norm)
    run.scheduler.step()
    run.step += 1
    if run.ema is not None:  # every rank: its student is the same after a DDP step (BatchNorm buffers: per rank)
        run.ema.update(run.student, step=run.step)
    return terms, lr, stop_requested


def _cached_teacher_logits(run: _Run, images: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The teacher's float32 logits (N, C) of this batch: from the cache, or computed (the teacher is built on the
    first miss) and stored; the first ``train.teacher_cache_verify`` hits of an epoch are computed too and must
    equal the cached ones. A float16 cache gives the rounded logits on a miss too, so cold and warm runs agree."""
    cache, counts = run.teacher_cache, run.cache_counts
    cached = cache.get(keys)
    verify = cached is not None and counts["verified"] < run.cfg.train.teacher_cache_verify
    if cached is not None and not verify:
        counts["hits"] += 1
        return cached.to(run.device, non_blocking=True)
    with torch.no_grad():
        live = run.live_teacher()(images).float()
    if cached is not None:
        cache.verify(keys, live)
        counts["hits"], counts["verified"] = counts["hits"] + 1, counts["verified"] + 1
        return cached.to(run.device, non_blocking=True)
    cache.put(keys, live)
    counts["misses"] += 1
    return live if cache.dtype == "float32" else live.half().float()


def _save_mid_epoch(run: _Run, epoch: int, train_time_s: float) -> None:
    run.metrics["epoch_train_time_s"] = train_time_s
    _check_finite_state(run, f"when stopping in epoch {epoch}")
    if run.dist.is_main:
        write_checkpoints(run.output_dir, _checkpoint(run, epoch, mid_epoch=True), is_best=False)


# ---- phase 3: end of epoch: evaluate and checkpoint --------------------------------------------------------------


def _end_epoch(run: _Run, epoch: int, stats: _EpochStats) -> None:
    """Check the model state, evaluate when due, print the epoch's line, then write its checkpoints.

    The checkpoint files are written by ``unikd._rundir.write_checkpoints`` only, in the order described there.
    """
    cfg = run.cfg
    _check_finite_state(run, f"at the end of epoch {epoch}")
    run.metrics["epoch_train_time_s"] = 0.0
    mean_loss = all_reduce(torch.stack([stats.loss_sum, torch.tensor(float(stats.steps), device=run.device)]))
    mean_loss = (mean_loss[0] / mean_loss[1].clamp_min(1)).item()
    line = f"epoch {epoch:>3}  train loss {mean_loss:.4f}"
    if run.teacher_cache is not None:  # this epoch's batches (of every rank; a resumed epoch: since the resume)
        counts = all_reduce(torch.tensor([float(count) for count in run.cache_counts.values()], device=run.device))
        counts = dict(zip(run.cache_counts, (int(count) for count in counts.tolist()), strict=True))
        run.writer.write({"split": "teacher_cache", "step": run.step, "epoch": epoch, **counts})
        line += f"  teacher cache {counts['hits']} hits, {counts['misses']} misses"
    is_best = False
    if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
        val = evaluate(run.eval_model, run.val_loader, run.device, amp_dtype=run.amp_dtype,
                       memory_format=run.memory_format)  # fmt: skip
        record = {
            "split": "val",
            "step": run.step,
            "epoch": epoch,
            "top1": val["top1"],
            "top5": val["top5"],
            "val_loss": val["loss"],
            "epoch_time_s": stats.train_time_s,
            "peak_mem_mb": peak_memory_mb(run.device),
        }
        run.writer.write(record)
        run.metrics["history"].append({key: value for key, value in record.items() if key != "split"})
        is_best = run.metrics["best_top1"] is None or val["top1"] > run.metrics["best_top1"]
        if is_best:
            run.metrics["best_top1"], run.metrics["best_epoch"] = val["top1"], epoch
        line += f"  val top-1 {val['top1']:6.2f}  top-5 {val['top5']:6.2f}  loss {val['loss']:.4f}"
    best = run.metrics["best_top1"]
    best_text = f"  best {best:.2f} (epoch {run.metrics['best_epoch']})" if best is not None else ""
    run.say(f"{line}  {stats.train_time_s:.1f} s{best_text}")
    if run.dist.is_main:
        write_checkpoints(run.output_dir, _checkpoint(run, epoch + 1, mid_epoch=False), is_best=is_best)


def _checkpoint(run: _Run, epoch: int, *, mid_epoch: bool) -> dict:
    """The checkpoint dict (format: unikd._checkpoint) of the run as it stands, ``epoch`` being the one in progress."""
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "run_id": run.run_id,
        "model_name": run.cfg.model.student,
        "num_classes": run.bundle.num_classes,
        "in_chans": run.bundle.in_chans,
        "model": run.student.state_dict(),
        "method": run.method.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "epoch": epoch,
        "step": run.step,
        "mid_epoch": mid_epoch,
        "rng": capture_rng_state(),
        "config": config_to_dict(run.cfg),
        "metrics": run.metrics,
        "data": {"train_images": len(run.bundle.train), "val_images": len(run.bundle.val)},
        **({"ema": run.ema.module.state_dict()} if run.ema is not None else {}),
    }


def _check_finite_state(run: _Run, when: str) -> None:
    """Stop the run, before any checkpoint is written, when a parameter, buffer or optimizer slot is not finite.

    A loss can stay finite for a while after BatchNorm's running variance has overflowed; without this check the
    broken model would be saved as the last good one, and a resume would "succeed" with it.
    """
    modules = {"student": run.student, "method": run.method, **({"ema": run.ema.module} if run.ema else {})}
    bad = non_finite_state(modules, run.optimizer)
    flag = torch.tensor(float(bool(bad)), device=run.device)
    if run.dist.is_distributed:
        all_reduce(flag, op="max")
    if not flag.item():
        return
    where = f"{when} (step {run.step})"
    raise UnikdError(non_finite_state_message(bad, where, run.output_dir / LAST, _STATE_ADVICE))


# ---- phase 4: done -----------------------------------------------------------------------------------------------


def _finish(run: _Run) -> dict:
    history = run.metrics["history"]
    result = {
        "best_top1": run.metrics["best_top1"],
        "best_epoch": run.metrics["best_epoch"],
        "last_top1": history[-1]["top1"] if history else None,
        "last_top5": history[-1]["top5"] if history else None,
        "teacher_top1": run.metrics["teacher_top1"],
        "history": history,
        "device": run.device.type,
        "run_id": run.run_id,
    }
    if run.dist.is_main:
        write_json(run.output_dir / FINAL, result)
    return result


# ---- public helpers ----------------------------------------------------------------------------------------------


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


def student_from_checkpoint(checkpoint: dict, cfg: Config, bundle: DataBundle, source: str | os.PathLike) -> nn.Module:
    """Rebuild the student of the training checkpoint ``checkpoint`` (read from ``source``) for ``bundle``'s data."""
    if bundle.num_classes != checkpoint["num_classes"]:
        raise UnikdError(
            f"{source}: the checkpoint's student predicts {checkpoint['num_classes']} classes but data.name="
            f"{cfg.data.name} has {bundle.num_classes}; pass the dataset it was trained on"
        )
    in_chans = checkpoint.get("in_chans", bundle.in_chans)
    if in_chans != bundle.in_chans:
        raise UnikdError(
            f"{source}: the student takes {in_chans}-channel images but the data gives {bundle.in_chans}; set "
            f"data.channels={in_chans}"
        )
    student = create_model(checkpoint["model_name"], checkpoint["num_classes"], in_chans=in_chans,
                           **cfg.model.student_kwargs)  # fmt: skip
    load_student_weights(student, checkpoint, source)
    return student


def teacher_from_config(model_cfg: ModelConfig, num_classes: int, in_chans: int) -> tuple[nn.Module, str]:
    """The teacher ``model_cfg`` names, for ``num_classes`` classes of ``in_chans``-channel images, and one line on
    what was read: ``model.teacher_checkpoint`` in any layout ``unikd.models`` reads (``model.teacher_format``), or
    without it timm's / torchvision's pretrained weights (``model.teacher_kwargs.pretrained``). Not frozen yet."""
    kwargs = {"in_chans": in_chans, **model_cfg.teacher_kwargs}
    if model_cfg.teacher_checkpoint is None:  # teacher_kwargs.pretrained: timm's / torchvision's download
        teacher = create_model(model_cfg.teacher, num_classes, **kwargs)
        return teacher, f"{model_cfg.teacher}: pretrained weights (timm / torchvision)"
    teacher, report = load_model_weights(
        model_cfg.teacher, num_classes, model_cfg.teacher_checkpoint, layout=model_cfg.teacher_format,
        role="teacher", **kwargs,
    )  # fmt: skip
    return teacher, report.describe()


def student_for_evaluation(checkpoint: dict, cfg: Config, source: str | os.PathLike) -> tuple[DataBundle, nn.Module]:
    """The validation data of ``cfg`` and the student of the training checkpoint ``checkpoint`` (read from
    ``source``) rebuilt for it: what ``unikd eval`` and ``unikd softlabels`` score, ``cfg`` being the checkpoint's
    ``config.config_for_checkpoint``."""
    bundle = build_datasets(cfg.data, with_train=False)
    return bundle, student_from_checkpoint(checkpoint, cfg, bundle, source)


def evaluate_checkpoint(path: str | os.PathLike, overrides: list[str] = ()) -> dict:
    """Rebuild the student saved in the training checkpoint ``path`` and score it on the whole validation set.

    The checkpoint's stored config only says what the student is and which dataset it was trained on
    (``config.config_for_checkpoint``); ``overrides`` (``key=value``) set anything else, e.g. ``data.root=DIR``,
    ``data.val_subset=1000``, ``train.device=cpu``. Nothing is downloaded unless ``data.download=true`` is passed.
    Returns ``{"top1", "top5", "loss", "split", "images", "dataset", "model_name"}``.
    """
    checkpoint = load_checkpoint(path)
    cfg = config_for_checkpoint(checkpoint["config"], overrides)
    bundle, student = student_for_evaluation(checkpoint, cfg, path)
    return {**_evaluate_on(student, cfg, bundle), "model_name": checkpoint["model_name"]}


def evaluate_weights(
    model_name: str, path: str | os.PathLike, overrides: list[str] = (), *, layout: str = "auto"
) -> dict:
    """Score any weights file of a ``model_name`` model on a dataset's whole validation set (``unikd eval --model``).

    The file's layout is detected (``layout="auto"``) or named (one of ``unikd.models.FORMATS``): unikd checkpoints
    and exports, timm / torchvision state_dicts, CRD / mdistiller and mmpretrain / cls_KD files. ``overrides``
    (``key=value``) choose the data as ``config.config_for_weights`` says (``data.root=DIR``, inferred
    ``data.name``, ``data.eval_interpolation``, ...); the model's classifier must fit the dataset's class count.
    Returns ``{"top1", "top5", "loss", "split", "images", "dataset", "model_name", "weights", "transform"}``,
    ``weights`` being the one-line description of what was read.
    """
    cfg = config_for_weights(model_name, overrides, layout=layout)
    bundle = build_datasets(cfg.data, with_train=False)
    kwargs = {"in_chans": bundle.in_chans, **cfg.model.student_kwargs}
    model, report = load_model_weights(model_name, bundle.num_classes, path, layout=layout, **kwargs)
    scores = _evaluate_on(model, cfg, bundle)
    return {**scores, "model_name": model_name, "weights": report.describe(), "transform": _eval_transform(cfg)}


def _evaluate_on(model: nn.Module, cfg: Config, bundle: DataBundle) -> dict:
    device = resolve_device(cfg.train.device)
    loader = _eval_loader(cfg, bundle.val, DistInfo(), device)
    try:
        scores = evaluate(model.to(device), loader, device, amp_dtype=AMP_DTYPES[cfg.train.amp])
    finally:
        stop_data_workers(loader)
    return {**scores, "split": "val", "images": len(bundle.val), "dataset": cfg.data.name}


def _eval_transform(cfg: Config) -> str:
    """The evaluation resize in words (ImageNet-layout folders), e.g. 'resize 256 bicubic, centre crop 224'."""
    size = cfg.data.img_size or 224
    if cfg.data.name != "imagefolder":
        return f"{cfg.data.name} images" + (f" resized to {size}" if cfg.data.img_size else "")
    return f"resize {math.floor(size / cfg.data.eval_crop_pct)} {cfg.data.eval_interpolation}, centre crop {size}"


# ---- helpers -----------------------------------------------------------------------------------------------------


def _train_loader(cfg: Config, dataset, num_classes: int, dist_info: DistInfo, device: torch.device) -> DataLoader:
    """This rank's share of each global batch, augmented as a function of (seed, epoch, sample index) and mixed as
    one of (seed, epoch, batch index, rank) (unikd._sampling): the same images whatever the data workers, ranks or
    resume point. Yields ``(images, target, keys)``; ``loader.batch_sampler`` is the ``EpochBatchSampler``."""
    return keyed_loader(
        dataset, batch_size=cfg.train.batch_size, seed=cfg.train.seed, rank=dist_info.rank,
        world_size=dist_info.world_size, mix=build_mix(cfg.data, num_classes),
        max_batches=cfg.train.max_steps_per_epoch, **worker_kwargs(cfg.data, device),
    )  # fmt: skip


def _eval_loader(cfg: Config, dataset, dist_info: DistInfo, device: torch.device) -> DataLoader:
    return evaluation_loader(dataset, cfg.data, cfg.train.eval_batch_size, dist_info=dist_info, device=device)
