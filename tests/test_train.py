"""The training engine on tiny FakeData runs (CPU, a few steps each): run directory, resume, failure, AMP, clipping.

Interrupts are real signals: a wrapped ``forward_student`` sends SIGINT to this process during step k (the engine
finishes the step, saves ``last.pt`` and raises ``KeyboardInterrupt``), or the test sends SIGTERM to a subprocess.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_files import save

import unikd.train
from unikd import UnikdError
from unikd._checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from unikd.config import load_config
from unikd.models import create_model
from unikd.models._mdistiller import to_mdistiller
from unikd.train import evaluate_checkpoint, optimizer_step, train

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 4
TINY = [
    "data.name=fake",
    "data.img_size=8",
    "data.train_subset=64",
    "data.val_subset=24",
    "data.num_workers=0",
    "model.student=cifar/smallcnn",
    "model.student_kwargs={width: 4}",
    "optim.lr=0.05",
    "train.batch_size=8",
    "train.eval_batch_size=16",
    "train.epochs=2",
    f"train.max_steps_per_epoch={STEPS_PER_EPOCH}",
    "train.log_every=1",
    "train.progress=false",
    "train.tensorboard=false",
]


def tiny_overrides(output_dir: Path, *overrides: str) -> list[str]:
    return [*TINY, f"output_dir={output_dir}", *overrides]


def tiny_config(output_dir: Path, *overrides: str):
    return load_config(None, tiny_overrides(output_dir, *overrides))


def wrap_forward_student(monkeypatch, on_call):
    """Replace the engine's ``forward_student`` with one that calls ``on_call(call_number, output)`` (1-based)."""
    real = unikd.train.forward_student
    calls = []

    def wrapped(*args, **kwargs):
        output = real(*args, **kwargs)
        calls.append(len(calls) + 1)
        on_call(len(calls), output)
        return output

    monkeypatch.setattr(unikd.train, "forward_student", wrapped)
    return calls


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


# ---- one complete run ------------------------------------------------------------------------------------------


def test_train_writes_the_run_directory_and_eval_checkpoint_agrees(tmp_path, monkeypatch):
    clip_calls = []
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(
        torch.nn.utils, "clip_grad_norm_", lambda p, max_norm: clip_calls.append(max_norm) or real_clip(p, max_norm)
    )
    run = tmp_path / "run"
    overrides = ("method.name=uskd", "optim.clip_grad_norm=2.0", "train.tensorboard=true", "train.progress=true")
    result = train(tiny_config(run, *overrides))

    assert {p.name for p in run.iterdir()} == {"config.yaml", "metrics.jsonl", "tb", "last.pt", "best.pt", "final.json"}
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tb").iterdir())
    assert json.loads((run / "final.json").read_text()) == result
    assert set(result) == {
        *("best_top1", "best_epoch", "last_top1", "last_top5", "teacher_top1", "history", "device", "run_id"),
    }
    assert result["device"] == "cpu" and result["teacher_top1"] is None
    assert len(result["history"]) == 2 and result["last_top1"] == result["history"][-1]["top1"]
    assert clip_calls == [2.0] * 2 * STEPS_PER_EPOCH

    records = read_metrics(run)
    train_records = [r for r in records if r["split"] == "train"]
    val_records = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in train_records] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert train_records[0]["lr"] == 0.05  # the rate the step used (cosine, no warm-up: the base rate first)
    assert set(train_records[0]) == {"split", "step", "epoch", "lr", "loss_ce", "loss_uskd", "loss", "images_per_s"}
    assert all(
        math.isfinite(r["loss"]) and r["loss"] == pytest.approx(r["loss_ce"] + r["loss_uskd"]) for r in train_records
    )
    assert [r["epoch"] for r in val_records] == [0, 1]
    assert set(val_records[0]) == {"split", "step", "epoch", "top1", "top5", "val_loss", "epoch_time_s", "peak_mem_mb"}
    assert all(r["epoch_time_s"] > 0 and r["peak_mem_mb"] > 0 for r in val_records)

    checkpoint = load_checkpoint(run / "last.pt")
    assert checkpoint["model_name"] == "cifar/smallcnn" and checkpoint["num_classes"] == 10
    assert (checkpoint["epoch"], checkpoint["step"]) == (2, 2 * STEPS_PER_EPOCH)
    assert set(checkpoint["method"]) == {"weak_head.weight", "weak_head.bias"}  # USKD's weak head is saved
    assert checkpoint["config"]["method"]["name"] == "uskd"
    assert checkpoint["metrics"]["history"] == result["history"]

    assert checkpoint["run_id"] == result["run_id"] and checkpoint["in_chans"] == 3
    assert checkpoint["data"] == {"train_images": 64, "val_images": 24}

    # eval scores the whole validation set unless asked: FakeData's is 200 images, the run used a 24-image subset
    assert evaluate_checkpoint(run / "last.pt", [])["images"] == 200
    scores = evaluate_checkpoint(run / "last.pt", ["data.val_subset=24"])
    assert (scores["split"], scores["images"], scores["dataset"], scores["model_name"]) == (
        "val",
        24,
        "fake",
        "cifar/smallcnn",
    )
    assert scores["top1"] == pytest.approx(result["last_top1"])
    assert scores["top5"] == pytest.approx(result["last_top5"])
    assert scores["loss"] == pytest.approx(result["history"][-1]["val_loss"], rel=1e-5)


def test_same_seed_gives_the_same_student_init_and_data_order_across_methods(tmp_path, monkeypatch):
    first_batches = {}
    inits = {}
    real_create_model = unikd.train.create_model

    def recording_create_model(*args, **kwargs):
        model = real_create_model(*args, **kwargs)
        inits[method] = {k: v.clone() for k, v in model.state_dict().items()}
        return model

    monkeypatch.setattr(unikd.train, "create_model", recording_create_model)
    real_forward = unikd.train.forward_student

    def recording_forward(model, images, *args, **kwargs):
        first_batches.setdefault(method, images.clone())
        return real_forward(model, images, *args, **kwargs)

    monkeypatch.setattr(unikd.train, "forward_student", recording_forward)
    for method in ("baseline", "uskd"):
        train(tiny_config(tmp_path / method, f"method.name={method}", "train.epochs=1", "train.max_steps_per_epoch=1"))
    assert inits["baseline"].keys() == inits["uskd"].keys()
    assert all(torch.equal(inits["baseline"][k], inits["uskd"][k]) for k in inits["baseline"])
    assert torch.equal(first_batches["baseline"], first_batches["uskd"])


def record_batches(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Replace the engine's ``_train_step`` with one that records each step's (images, target) first."""
    real, batches = unikd.train._train_step, []

    def recording(run, images, target, *args, **kwargs):
        batches.append((images.clone(), target.clone()))
        return real(run, images, target, *args, **kwargs)

    monkeypatch.setattr(unikd.train, "_train_step", recording)
    return batches


def test_the_same_batches_whatever_the_number_of_data_workers(tmp_path, monkeypatch):
    # Random crops and flips per sample, MixUp/CutMix per batch: every draw is a function of (seed, epoch, key).
    overrides = ("data.augment=default", "data.mixup=0.8", "data.cutmix=1.0", "train.max_steps_per_epoch=2")
    seen = {}
    for workers in (0, 1, 2):
        monkeypatch.undo()
        batches = record_batches(monkeypatch)
        train(tiny_config(tmp_path / f"workers{workers}", f"data.num_workers={workers}", *overrides))
        seen[workers] = batches
    assert len(seen[0]) == 4 and seen[0][0][1].shape == (8, 10)  # 2 epochs x 2 steps; mixed (N, C) targets
    for workers in (1, 2):
        for (images, target), (images_0, target_0) in zip(seen[workers], seen[0], strict=True):
            assert torch.equal(images, images_0) and torch.equal(target, target_0)
    assert not torch.equal(seen[0][0][0], seen[0][2][0])  # another epoch, other crops and order


# ---- resume ------------------------------------------------------------------------------------------------------


# USKD: its weak head must resume too, and with target_soft_label=ema the EMA copy of the student (its soft targets);
# default augmentation: random crops/flips drawn in this process.
RESUME_OVERRIDES = (
    *("method.name=uskd", "method.target_soft_label=ema", "train.ema_decay=0.9"),
    *("data.augment=default", "schedule.warmup_epochs=0.5"),
)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> tuple[dict, Path]:
    """The uninterrupted reference run of the resume tests."""
    run = tmp_path_factory.mktemp("straight")
    return train(tiny_config(run, *RESUME_OVERRIDES)), run


# The straight run has no data workers; the interrupted and resumed one may have two: the same result.
@pytest.mark.parametrize(("interrupt_at_step", "workers"), [(3, 0), (STEPS_PER_EPOCH, 0), (6, 0), (3, 2)])
def test_interrupt_then_resume_is_bit_identical_to_a_straight_run(
    tmp_path, monkeypatch, straight_run, interrupt_at_step, workers
):
    straight, straight_dir = straight_run
    overrides = (*RESUME_OVERRIDES, f"data.num_workers={workers}")

    def interrupt(call, output):
        if call == interrupt_at_step:
            os.kill(os.getpid(), signal.SIGINT)

    calls = wrap_forward_student(monkeypatch, interrupt)
    with pytest.raises(KeyboardInterrupt, match=r"interrupted: saved .*last\.pt; continue with --resume"):
        train(tiny_config(tmp_path / "resumed", *overrides))
    assert len(calls) == interrupt_at_step  # the step in flight finished, then the run stopped
    interrupted = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert interrupted["step"] == interrupt_at_step
    assert not (tmp_path / "resumed" / "final.json").exists()

    monkeypatch.undo()
    resumed = train(tiny_config(tmp_path / "resumed", *overrides), resume=True)

    a, b = load_checkpoint(straight_dir / "last.pt"), load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert b["step"] == 2 * STEPS_PER_EPOCH
    for part in ("model", "method", "ema"):
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    momentum_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    momentum_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(momentum_a, momentum_b, strict=True))
    assert resumed["history"] == [
        {**entry, "epoch_time_s": resumed_entry["epoch_time_s"], "peak_mem_mb": resumed_entry["peak_mem_mb"]}
        for entry, resumed_entry in zip(straight["history"], resumed["history"], strict=True)
    ]
    train_steps = [r["step"] for r in read_metrics(tmp_path / "resumed") if r["split"] == "train"]
    assert train_steps == list(range(1, 2 * STEPS_PER_EPOCH + 1))  # each step logged once across both runs


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    run = tmp_path / "run"
    message = f"--resume: no checkpoint {run / 'last.pt'} to resume from; run without --resume to start a new run there"
    with pytest.raises(UnikdError, match=f"^{re.escape(message)}$"):
        train(tiny_config(run), resume=True)


def test_new_run_into_an_existing_run_directory_is_an_error(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"")
    message = (
        f"output_dir {run} already holds a run ({run / 'last.pt'}); pass --resume to continue it, "
        "or choose another output_dir"
    )
    with pytest.raises(UnikdError, match=f"^{re.escape(message)}$"):
        train(tiny_config(run))


def test_sigterm_saves_a_resumable_checkpoint_and_exits_143(tmp_path):
    run = tmp_path / "run"
    overrides = tiny_overrides(run, "train.max_steps_per_epoch=null")  # 8 steps per epoch, slowed down below
    script = (
        "import time, unikd.train as engine\n"
        "from unikd.config import load_config\n"
        "real = engine.forward_student\n"
        "def slow(*args, **kwargs):\n"
        "    time.sleep(0.1)\n"
        "    return real(*args, **kwargs)\n"
        "engine.forward_student = slow\n"
        f"engine.train(load_config(None, {overrides!r}))\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not ((run / "metrics.jsonl").exists() and len(read_metrics(run)) >= 2):
            assert child.poll() is None and time.monotonic() < deadline, child.communicate()[0]
            time.sleep(0.05)
        child.send_signal(signal.SIGTERM)
        output = child.communicate(timeout=60)[0]
    finally:
        child.kill()
    assert child.returncode == 143, output
    assert f"unikd: SIGTERM: saved {run / 'last.pt'}; continue with --resume" in output
    checkpoint = load_checkpoint(run / "last.pt")
    assert 2 <= checkpoint["step"] < 16 and checkpoint["epoch"] == checkpoint["step"] // 8

    result = train(load_config(None, overrides), resume=True)
    assert load_checkpoint(run / "last.pt")["step"] == 16
    assert len(result["history"]) == 2


# ---- failure -----------------------------------------------------------------------------------------------------


def test_non_finite_loss_stops_with_the_step_and_term_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"

    def poison(call, output):
        if call == 6:  # epoch 1, after epoch 0's checkpoint
            output.logits = output.logits * float("nan")

    wrap_forward_student(monkeypatch, poison)
    message = (
        f"non-finite loss at step 6 (epoch 1): loss_ce=nan; last good checkpoint: {run / 'last.pt'}. "
        "Lower optim.lr, set optim.clip_grad_norm, or use train.amp=bf16 instead of fp16"
    )
    with pytest.raises(UnikdError, match=f"^{re.escape(message)}$"):
        train(tiny_config(run))
    checkpoint = load_checkpoint(run / "last.pt")
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, STEPS_PER_EPOCH)
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())
    assert not (run / "final.json").exists()


def test_amp_bf16_on_cpu_trains_finite_and_deterministic_mode_is_restored(tmp_path):
    result = train(tiny_config(tmp_path / "run", "train.amp=bf16", "train.epochs=1", "train.deterministic=true"))
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    assert len(losses) == STEPS_PER_EPOCH and all(math.isfinite(x) for x in losses)
    assert math.isfinite(result["history"][0]["val_loss"])
    assert not torch.are_deterministic_algorithms_enabled()  # global torch flags are put back after the run


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is about CPU-only machines")
def test_fp16_without_cuda_is_a_clear_error(tmp_path):
    with pytest.raises(
        UnikdError,
        match=r"^train\.amp: 'fp16' needs CUDA \(its GradScaler\); on CPU use train\.amp="
        r"bf16 or none$",
    ):
        train(tiny_config(tmp_path / "run", "train.amp=fp16"))


def test_optimizer_step_clips_the_gradient_norm():
    def step(clip):
        weight = torch.nn.Parameter(torch.zeros(10))
        optimizer = torch.optim.SGD([weight], lr=1.0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        optimizer_step((weight * 100.0).sum(), optimizer, scaler, [weight], clip)
        return weight.detach().norm().item()

    assert step(None) == pytest.approx(100.0 * math.sqrt(10))
    assert step(0.5) == pytest.approx(0.5)


# ---- checkpoint files ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "disk full: could not write {path} ("),
        (OSError(errno.EACCES, "Permission denied"), "cannot write {path}: Permission denied; check the folder"),
    ],
    ids=["disk-full", "permission"],
)
def test_a_failed_save_leaves_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch, error, message):
    path = tmp_path / "last.pt"
    save_checkpoint({"format": "unikd-checkpoint", "version": 1, "step": 1}, path)
    before = path.read_bytes()

    def failing_save(obj, f):
        f.write(b"partial")
        raise error

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(UnikdError, match=f"^{re.escape(message.format(path=path))}"):
        save_checkpoint({"format": "unikd-checkpoint", "version": 1, "step": 2}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_write_that_torch_reports_without_errno_is_disk_full_when_the_disk_is(tmp_path, monkeypatch):
    def failing_save(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # torch on ENOSPC

    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(total=100, used=100, free=0))
    with pytest.raises(UnikdError, match=r"^disk full: could not write .*last\.pt \(0 MiB free\); the previous"):
        save_checkpoint({"step": 2}, tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    save_checkpoint({"format": "unikd-checkpoint", "version": 1, "rng": capture_rng_state()}, tmp_path / "c.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(load_checkpoint(tmp_path / "c.pt", required=())["rng"])
    actual = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == actual[:2] and torch.equal(expected[2], actual[2])


def test_loading_a_file_that_is_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(UnikdError, match=f"^checkpoint not found: {re.escape(str(tmp_path / 'missing.pt'))}$"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weight": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(
        UnikdError, match=r"plain\.pt is not a unikd training checkpoint \(no format='unikd-checkpoint'"
    ):
        load_checkpoint(tmp_path / "plain.pt")


# ---- where the weights come from: teacher and student files, teacher mode, the EMA copy ----------------------------


def models_of(models) -> tuple:
    return models.student, models.method


def capture_models(monkeypatch) -> list:
    """Record what ``_build_models`` returns, with a copy of the student's and method's state as built."""
    captured = []
    real = unikd.train._build_models

    def wrapped(*args, **kwargs):
        models = real(*args, **kwargs)
        student, method = ({key: value.clone() for key, value in m.state_dict().items()} for m in models_of(models))
        captured.append(types.SimpleNamespace(models=models, student=student, method=method))
        return models

    monkeypatch.setattr(unikd.train, "_build_models", wrapped)
    return captured


def crd_teacher_file(path: Path, arch: str = "resnet8") -> dict[str, torch.Tensor]:
    """A CRD teacher file (legacy serialisation, mdistiller's key names) of a seeded ``cifar/<arch>``; its weights."""
    torch.manual_seed(7)
    teacher = create_model(f"cifar/{arch}", 10)
    with torch.no_grad():  # running statistics that are not BatchNorm's defaults, so that their changes show
        for module in teacher.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    save({"epoch": 240, "model": to_mdistiller(teacher.state_dict(), arch), "accuracy": 70.0}, path, legacy=True)
    return {key: value.clone() for key, value in teacher.state_dict().items()}


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_teacher_mode_train_changes_its_running_statistics_only_and_never_its_weights(tmp_path, monkeypatch, mode):
    weights = crd_teacher_file(tmp_path / "ckpt_epoch_240.pth")
    captured = capture_models(monkeypatch)
    teacher_keys = ("model.teacher=mdistiller/resnet8", f"model.teacher_checkpoint={tmp_path / 'ckpt_epoch_240.pth'}")
    run = tmp_path / "run"
    train(tiny_config(run, "method.name=kd", *teacher_keys, f"model.teacher_mode={mode}", "train.epochs=1"))
    teacher = captured[0].models.teacher
    assert teacher.training == (mode == "train")  # its top-1 measurement (in eval mode) put the mode back
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())  # no gradient reaches it
    state = teacher.state_dict()
    assert all(torch.equal(state[name], weights[name]) for name, _ in teacher.named_parameters())
    changed = {name for name, _ in teacher.named_buffers() if not torch.equal(state[name], weights[name])}
    running = {name for name, _ in teacher.named_buffers() if "running" in name}
    assert changed >= running if mode == "train" else changed == set()
    # The header and metrics.jsonl say what was read: CRD's file, found in mdistiller's layout.
    described = f"{tmp_path / 'ckpt_epoch_240.pth'}: torch legacy file; CRD teacher file, epoch 240, accuracy 70.00; "
    (record,) = [r for r in read_metrics(run) if r["split"] == "weights"]
    assert record == {"split": "weights", "step": 0, "epoch": 0, "teacher": described + "mdistiller layout"}


def test_the_student_starts_from_a_checkpoint_and_reuses_its_weak_head_when_it_fits(tmp_path, monkeypatch, capsys):
    source = tmp_path / "source"
    train(tiny_config(source, "method.name=uskd", "train.epochs=1"))
    stored = load_checkpoint(source / "last.pt")
    captured = capture_models(monkeypatch)
    capsys.readouterr()

    # The same classes: every weight and the weak head come from the file.
    same = tmp_path / "same"
    train(tiny_config(same, "method.name=uskd", f"model.student_checkpoint={source / 'last.pt'}", "train.epochs=1"))
    built = captured[0]
    assert built.student.keys() == stored["model"].keys()
    assert all(torch.equal(built.student[key], stored["model"][key]) for key in stored["model"])
    assert all(torch.equal(built.method[key], stored["method"][key]) for key in stored["method"])
    described = f"{source / 'last.pt'}: torch zip file; unikd training checkpoint, epoch 1; native layout"
    header = capsys.readouterr().out.splitlines()
    assert f"  student initialised from {described}; weak head from the checkpoint" in header
    (record,) = [r for r in read_metrics(same) if r["split"] == "weights"]
    assert record["student"] == f"{described}; weak head from the checkpoint"

    # Five classes: the classifier and the weak head start afresh, the rest comes from the file, and the run says so.
    other = tmp_path / "other"
    overrides = ("method.name=uskd", "data.num_classes=5", f"model.student_checkpoint={source / 'last.pt'}")
    train(tiny_config(other, *overrides, "train.epochs=1"))
    built = captured[1]
    classifier = {"fc.weight", "fc.bias"}
    assert classifier < set(stored["model"])  # the names the message lists
    assert all(torch.equal(built.student[key], stored["model"][key]) for key in set(stored["model"]) - classifier)
    assert built.student["fc.weight"].shape == (5, stored["model"]["fc.weight"].shape[1])
    assert built.method["weak_head.weight"].shape[0] == 5
    line = (
        f"  student initialised from {described}; re-initialised (class count differs): fc.bias, "
        "fc.weight; its weak head is for another class count: re-initialised too"
    )
    assert line in capsys.readouterr().out.splitlines()

    # A resume takes the student from last.pt and does not read the file it was initialised from, which may be gone:
    # model.student_checkpoint may then change (here to null).
    (source / "last.pt").rename(tmp_path / "moved.pt")
    resumed = train(tiny_config(same, "method.name=uskd", "model.student_checkpoint=null", "train.epochs=2"),
                    resume=True)  # fmt: skip
    assert len(resumed["history"]) == 2 and captured[2].models.weights == {}
    (change,) = [r for r in read_metrics(same) if r["split"] == "resume"]
    assert change["changed"]["model.student_checkpoint"] == [str(source / "last.pt"), None]


def test_ema_soft_targets_are_the_logits_of_timms_moving_average_of_the_student(tmp_path, monkeypatch):
    captured = capture_models(monkeypatch)
    after_steps, calls = [], []
    real_step = unikd.train.optimizer_step

    def recording_step(*args, **kwargs):
        real_step(*args, **kwargs)
        after_steps.append({key: value.clone() for key, value in captured[0].models.student.state_dict().items()})

    monkeypatch.setattr(unikd.train, "optimizer_step", recording_step)
    real_forward = unikd.train.TrainableModules.forward

    def recording_forward(self, images, target, teacher_logits, progress):
        calls.append((images.clone(), teacher_logits.clone()))
        return real_forward(self, images, target, teacher_logits, progress)

    monkeypatch.setattr(unikd.train.TrainableModules, "forward", recording_forward)
    run = tmp_path / "run"
    overrides = ("method.name=uskd", "method.target_soft_label=ema", "train.ema_decay=0.5", "train.epochs=1")
    train(tiny_config(run, *overrides))

    # timm's ModelEmaV3 with warm-up: a copy at step 1, then decay min(train.ema_decay, 1 - k^(-2/3)) at step k.
    decays = [0.0, *(min(0.5, 1 - k ** (-2 / 3)) for k in range(2, STEPS_PER_EPOCH + 1))]
    assert decays[1] < 0.5 == decays[2]  # both the warm-up and train.ema_decay show
    expected, history = dict(captured[0].student), []
    for decay, student in zip(decays, after_steps, strict=True):
        history.append(expected)
        expected = {
            key: decay * value + (1 - decay) * student[key] if value.is_floating_point() else student[key]
            for key, value in expected.items()
        }
    ema = load_checkpoint(run / "last.pt")["ema"]
    for key, value in expected.items():
        torch.testing.assert_close(ema[key], value, msg=key)
    # Each step's teacher_logits: the EMA as it stood before the step, in eval mode, on that step's images.
    model = create_model("cifar/smallcnn", 10, width=4).eval()
    for (images, teacher_logits), state in zip(calls, history, strict=True):
        model.load_state_dict(state)
        with torch.no_grad():
            torch.testing.assert_close(teacher_logits, model(images))
