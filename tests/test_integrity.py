"""A run never lies (issue 8): a run's files stay consistent however its process dies, a second run cannot share its
directory, no model with a NaN or an infinity is saved as the last good one, a resume cannot silently change the
run, a checkpoint's stored config cannot steer its evaluation, and a bad output folder is found before any work.

Kills are real process deaths without clean-up (``os._exit`` in a forked child, as ``kill -9``: no ``finally``, no
temp-file removal, the lock left to the kernel) at each write boundary of a tiny 3-epoch run: before a file's temp
file exists, inside it (the temp half written, not renamed) and after the rename. The run is then resumed as a user
would (``--resume`` when a checkpoint exists, else a new run) and every file is checked against ``final.json`` and
against an uninterrupted run, bit for bit. Validation top-1 is scripted per epoch (50, 40, 60; the rest of the
evaluation is real) so that the run has a new best, a worse epoch, and a new best again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
import types
from pathlib import Path

import pytest
import torch
from conftest import write_imagefolder

import unikd._rundir
import unikd.train
from unikd import UnikdError
from unikd._checkpoint import RESUME_ENTRIES, load_checkpoint, save_checkpoint
from unikd._logging import MetricsWriter
from unikd._rundir import BEST, CONFIG, FINAL, LAST, LOCK, METRICS, lock_run_directory
from unikd.config import SAFE_TO_CHANGE_ON_RESUME, dump_config, load_config
from unikd.train import evaluate_checkpoint, train

EPOCHS, STEPS = 3, 2
SCRIPTED_TOP1 = (50.0, 40.0, 60.0)
TINY = [
    "data.name=fake",
    "data.img_size=8",
    "data.train_subset=32",
    "data.val_subset=16",
    "data.num_workers=0",
    "model.student=cifar/smallcnn",
    "model.student_kwargs={width: 4}",
    "optim.lr=0.05",
    "train.batch_size=8",
    "train.eval_batch_size=16",
    f"train.epochs={EPOCHS}",
    f"train.max_steps_per_epoch={STEPS}",
    "train.log_every=1",
    "train.progress=false",
    "train.tensorboard=false",
]
# The atomic writes of the run above, in order (epoch 1 is not a new best, so it writes last.pt only).
WRITES = ("config.yaml", "best.pt", "last.pt", "last.pt", "best.pt", "last.pt", "final.json")
KILLED = 86


def tiny_config(run: Path, *overrides: str):
    return load_config(None, [*TINY, f"output_dir={run}", *overrides])


def quiet_train(cfg, resume: bool = False) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        return train(cfg, resume=resume)


def script_evaluation(monkeypatch) -> None:
    """Validation top-1 = SCRIPTED_TOP1[epoch], the epoch read from the student's BatchNorm step counter (restored on
    resume like every buffer), so the script holds across kills; the other scores stay real."""
    real = unikd.train.evaluate

    def scripted(model, loader, device, **kwargs):
        scores = real(model, loader, device, **kwargs)
        steps = int(next(buffer for name, buffer in model.named_buffers() if name.endswith("num_batches_tracked")))
        return {**scores, "top1": SCRIPTED_TOP1[steps // STEPS - 1]}

    monkeypatch.setattr(unikd.train, "evaluate", scripted)


def read_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / METRICS).read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict, list[str]]:
    """The uninterrupted run, and the names of the files it wrote, in order."""
    run = tmp_path_factory.mktemp("reference") / "run"
    writes = []
    real_replace = os.replace

    def recording_replace(source, target):
        real_replace(source, target)
        if Path(target).parent == run:
            writes.append(Path(target).name)

    with pytest.MonkeyPatch.context() as monkeypatch:
        script_evaluation(monkeypatch)
        monkeypatch.setattr(os, "replace", recording_replace)
        result = quiet_train(tiny_config(run))
    return run, result, writes


# ---- kills at every write boundary -------------------------------------------------------------------------------


def _die_at_write(run: Path, index: int, phase: str) -> None:
    """In a doomed child: exit at once (no clean-up) at ``phase`` of the ``index``-th atomic write into ``run``."""
    real_mkstemp, real_replace = tempfile.mkstemp, os.replace
    writes = {"count": -1}

    def mkstemp(*args, prefix=None, dir=None, **kwargs):
        if Path(dir or ".") == run and not str(prefix).startswith(".write-probe."):
            writes["count"] += 1
            if writes["count"] == index and phase == "before":
                os._exit(KILLED)
        return real_mkstemp(*args, prefix=prefix, dir=dir, **kwargs)

    def replace(source, target):
        dying = Path(target).parent == run and writes["count"] == index
        if dying and phase == "inside":
            os.truncate(source, os.path.getsize(source) // 2)  # the temp file as a kill mid-write leaves it
            os._exit(KILLED)
        real_replace(source, target)
        if dying and phase == "after":
            os._exit(KILLED)

    tempfile.mkstemp, os.replace = mkstemp, replace


def train_in_child(cfg, doom=None, timeout: float = 120.0) -> int:
    """Run ``train(cfg)`` in a forked child after ``doom()`` set up how it dies; return the child's exit status."""
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (the process ends here)
            if doom is not None:
                doom()
            train(cfg)
            status = 0
        except BaseException:
            status = 1
        os._exit(status)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the child training run did not end")
        time.sleep(0.01)


def resume_like_a_user(run: Path) -> dict:
    """``--resume`` when the run left a checkpoint, else a new run (``--resume`` would say there is none)."""
    return quiet_train(tiny_config(run), resume=(run / LAST).is_file() or (run / BEST).is_file())


def check_run_files(run: Path, reference: tuple[Path, dict, list[str]]) -> None:
    """Every file of the finished ``run`` agrees with its final.json, and with the uninterrupted run."""
    reference_run, reference_result, _ = reference
    final = json.loads((run / FINAL).read_text())

    def scores(result: dict) -> dict:
        history = [(h["epoch"], h["step"], h["top1"], h["top5"], h["val_loss"]) for h in result["history"]]
        return {key: result[key] for key in ("best_top1", "best_epoch", "last_top1", "last_top5")} | {"h": history}

    assert scores(final) == scores(reference_result)
    last, best = load_checkpoint(run / LAST, RESUME_ENTRIES), load_checkpoint(run / BEST, RESUME_ENTRIES)
    assert last["run_id"] == best["run_id"] == final["run_id"]
    assert (last["epoch"], last["step"], last["mid_epoch"]) == (EPOCHS, EPOCHS * STEPS, False)
    assert (best["epoch"], best["mid_epoch"]) == (final["best_epoch"] + 1, False)
    assert last["metrics"]["history"] == final["history"]
    assert (last["metrics"]["best_epoch"], last["metrics"]["best_top1"]) == (final["best_epoch"], final["best_top1"])
    for name in (LAST, BEST):  # bit-identical to the uninterrupted run (CPU, no data workers)
        mine, theirs = load_checkpoint(run / name, RESUME_ENTRIES), load_checkpoint(reference_run / name)
        for part in ("model", "method"):
            assert mine[part].keys() == theirs[part].keys()
            assert all(torch.equal(mine[part][key], theirs[part][key]) for key in theirs[part]), (name, part)
        momentum = [[s["momentum_buffer"] for s in c["optimizer"]["state"].values()] for c in (mine, theirs)]
        assert all(torch.equal(a, b) for a, b in zip(*momentum, strict=True)), name

    records = read_records(run)
    assert len({(r["split"], r["step"]) for r in records}) == len(records)  # no step logged twice
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, EPOCHS * STEPS + 1))
    assert [(r["epoch"], r["top1"]) for r in records if r["split"] == "val"] == list(enumerate(SCRIPTED_TOP1))
    assert (run / CONFIG).read_text() == dump_config(tiny_config(run))
    assert sorted(p.name for p in run.iterdir()) == sorted([CONFIG, METRICS, LAST, BEST, FINAL])  # no temp, no lock


def test_an_epoch_writes_best_before_last_and_the_run_ends_with_final_json(reference):
    run, result, writes = reference
    assert tuple(writes) == WRITES
    assert (result["best_epoch"], result["best_top1"]) == (2, 60.0)
    check_run_files(run, reference)


@pytest.mark.parametrize("phase", ["before", "inside", "after"])
@pytest.mark.parametrize("index", range(len(WRITES)), ids=[f"{i}-{name}" for i, name in enumerate(WRITES)])
def test_a_kill_at_any_write_then_resume_leaves_files_that_agree(index, phase, reference, tmp_path, monkeypatch):
    script_evaluation(monkeypatch)
    run = tmp_path / "run"
    assert train_in_child(tiny_config(run), doom=lambda: _die_at_write(run, index, phase)) == KILLED
    resume_like_a_user(run)
    check_run_files(run, reference)


def test_a_kill_while_appending_to_metrics_then_resume(reference, tmp_path, monkeypatch):
    script_evaluation(monkeypatch)
    run = tmp_path / "run"
    real_write = MetricsWriter.write
    calls = {"count": 0}

    def half_a_line_then_die(self, record):
        calls["count"] += 1
        if calls["count"] == 4:  # epoch 1's first train record, after epoch 0's checkpoints
            self._jsonl.write(json.dumps(record)[:20])
            self._jsonl.flush()
            os._exit(KILLED)
        real_write(self, record)

    def doom():
        MetricsWriter.write = half_a_line_then_die

    assert train_in_child(tiny_config(run), doom=doom) == KILLED
    assert not (run / METRICS).read_text().endswith("\n")
    resume_like_a_user(run)
    check_run_files(run, reference)


def test_a_copied_in_best_checkpoint_of_another_run_is_reported(reference, tmp_path, monkeypatch):
    script_evaluation(monkeypatch)
    run = tmp_path / "run"
    quiet_train(tiny_config(run, "train.epochs=2"))
    shutil.copy(reference[0] / BEST, run / BEST)
    with pytest.raises(UnikdError, match=rf"^--resume: {re.escape(str(run / BEST))} belongs to another run than "):
        quiet_train(tiny_config(run), resume=True)


def test_a_checkpoint_set_counted_in_steps_is_repaired_like_one_counted_in_epochs(tmp_path):
    """``unit="step"`` (the detection engine evaluates every so many steps): the same repairs and refusals, with the
    best checkpoint named by its step."""

    def write(name: str, step: int, best_step: int | None) -> None:
        save_checkpoint({"run_id": "r", "step": step, "metrics": {"best_step": best_step}}, tmp_path / name)

    def reconcile() -> tuple[dict, list[str]]:
        return unikd._rundir.reconcile_checkpoints(tmp_path, lambda path: torch.load(path), unit="step")

    write(BEST, 4, 4)  # a kill between best.pt and last.pt at a new best at step 4 (last.pt at step 2)
    write(LAST, 2, 2)
    last, notes = reconcile()
    assert last["step"] == torch.load(tmp_path / LAST)["step"] == 4
    assert notes == [
        f"{tmp_path / LAST} was 2 steps behind {tmp_path / BEST} (the run stopped between writing the two); "
        f"continuing from {tmp_path / BEST}"
    ]
    (tmp_path / LAST).unlink()  # a kill right after the first best.pt
    assert reconcile()[0]["step"] == 4 and (tmp_path / LAST).is_file()
    write(BEST, 2, 2)  # best.pt of another step than last.pt records, and last.pt is that step: restored
    last, notes = reconcile()
    assert torch.load(tmp_path / BEST)["step"] == 4
    assert notes == [f"{tmp_path / BEST} did not hold the best step 4; restored it from {tmp_path / LAST}"]
    write(BEST, 2, 2)
    write(LAST, 6, 4)  # the best step's checkpoint is lost for good
    with pytest.raises(UnikdError) as error:
        reconcile()
    assert str(error.value) == (
        f"--resume: {tmp_path / BEST} holds step 2, but {tmp_path / LAST} records step 4 as the best; restore "
        "best.pt, or start a new run"
    )


# ---- one run per directory ---------------------------------------------------------------------------------------


def test_a_second_run_in_the_same_directory_fails_at_once_and_writes_nothing(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setattr(unikd.train, "build_datasets", lambda *a: pytest.fail("the second run built its data"))
    with lock_run_directory(run):
        message = (
            f"output_dir {run} is in use by another unikd run (pid {os.getpid()} on {socket.gethostname()}); wait "
            "for it to end, or choose another output_dir"
        )
        with pytest.raises(UnikdError, match=f"^{re.escape(message)}$"):
            train(tiny_config(run))
        assert sorted(p.name for p in run.iterdir()) == [LOCK]
    assert list(run.iterdir()) == []  # released and removed on exit


def test_the_lock_of_a_killed_run_is_no_obstacle_and_an_error_releases_it(tmp_path, monkeypatch):
    run = tmp_path / "run"
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # holds the lock, says so, then waits to be killed
        with lock_run_directory(unikd._rundir.prepare_output_dir(run)):
            os.write(write_end, b"locked")
            time.sleep(60)
        os._exit(0)
    assert os.read(read_end, 6) == b"locked"
    with pytest.raises(UnikdError, match=rf"is in use by another unikd run \(pid {pid} on "):
        quiet_train(tiny_config(run))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert (run / LOCK).is_file()  # a stale lock file, no lock

    def no_model(*args, **kwargs):
        raise UnikdError("no model")

    monkeypatch.setattr(unikd.train, "create_model", no_model)
    with pytest.raises(UnikdError, match=r"^no model$"):
        quiet_train(tiny_config(run))
    assert not (run / LOCK).exists()
    monkeypatch.undo()
    assert quiet_train(tiny_config(run, "train.epochs=1"))["best_epoch"] == 0


# ---- no non-finite state saved -----------------------------------------------------------------------------------


def test_a_huge_learning_rate_stops_before_saving_inf_batchnorm_statistics(tmp_path):
    run = tmp_path / "run"
    # lr=1e6: the loss stays finite through epoch 1 while BatchNorm running variances overflow to inf.
    with pytest.raises(UnikdError) as error:
        quiet_train(tiny_config(run, "optim.lr=1e6"))
    assert re.fullmatch(
        r"non-finite model state at the end of epoch 1 \(step 4\): student\.layer\S+\.running_var, .* not saved, "
        rf"last good checkpoint: {re.escape(str(run / LAST))}\. Lower optim\.lr, set optim\.clip_grad_norm, or check "
        r"the data for huge values",
        str(error.value),
    )
    last = load_checkpoint(run / LAST, RESUME_ENTRIES)
    assert (last["epoch"], last["step"]) == (1, STEPS)
    assert all(torch.isfinite(value).all() for value in last["model"].values() if value.is_floating_point())
    assert load_checkpoint(run / BEST, RESUME_ENTRIES)["step"] == STEPS and not (run / FINAL).exists()


@pytest.mark.parametrize("nan_check", [True, False])
def test_huge_finite_inputs_stop_the_run_with_or_without_the_loss_check(tmp_path, monkeypatch, nan_check):
    real_build = unikd.train.build_datasets

    class Huge(torch.utils.data.Dataset):
        def __init__(self, dataset):
            self.dataset = dataset

        def __len__(self):
            return len(self.dataset)

        def __getitem__(self, index):
            image, label = self.dataset[index]
            return torch.full_like(image, 3e38), label

    def huge_training_images(cfg):
        bundle = real_build(cfg)
        return dataclasses.replace(bundle, train=Huge(bundle.train))

    monkeypatch.setattr(unikd.train, "build_datasets", huge_training_images)
    run = tmp_path / "run"
    expected = "non-finite loss at step 1 (epoch 0)" if nan_check else "non-finite model state at the end of epoch 0"
    with pytest.raises(UnikdError, match=f"^{re.escape(expected)}"):
        quiet_train(tiny_config(run, f"train.nan_check={str(nan_check).lower()}"))
    assert not (run / LAST).exists() and not (run / BEST).exists()


def test_a_poisoned_buffer_mid_run_keeps_the_last_good_checkpoint_and_resume_continues_from_it(tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_forward = unikd.train.forward_student
    calls = []

    def poisoning_forward(model, images, *args, **kwargs):
        calls.append(1)
        if len(calls) == STEPS + 1:  # epoch 1, step 1
            model.layer3[0][1].running_var.fill_(float("inf"))
        return real_forward(model, images, *args, **kwargs)

    monkeypatch.setattr(unikd.train, "forward_student", poisoning_forward)
    with pytest.raises(UnikdError, match=r"^non-finite model state at the end of epoch 1 \(step 4\): student\.layer3"):
        quiet_train(tiny_config(run))
    monkeypatch.undo()
    assert load_checkpoint(run / LAST, RESUME_ENTRIES)["step"] == STEPS
    result = quiet_train(tiny_config(run), resume=True)
    assert [h["epoch"] for h in result["history"]] == [0, 1, 2]


# ---- resume must be the same run --------------------------------------------------------------------------------


@pytest.fixture
def one_epoch_run(tmp_path) -> Path:
    run = tmp_path / "run"
    quiet_train(tiny_config(run, "train.epochs=1"))
    return run


@pytest.mark.parametrize(
    ("override", "listed"),
    [
        ("optim.lr=0.2", "optim.lr 0.05 -> 0.2"),
        ("optim.name=adamw", "optim.name 'sgd' -> 'adamw'"),
        ("method.name=uskd", "method.name 'baseline' -> 'uskd'; method.alpha '<unset>' -> 1.0"),
        ("train.seed=1", "train.seed 0 -> 1"),
        ("train.batch_size=4", "train.batch_size 8 -> 4"),
        ("data.train_subset=24", "data.train_subset 32 -> 24"),
        ("model.student_kwargs={width: 8}", "model.student_kwargs.width 4 -> 8"),
    ],
)
def test_resume_refuses_a_changed_config_and_lists_the_keys(one_epoch_run, override, listed):
    run = one_epoch_run
    with pytest.raises(UnikdError) as error:
        quiet_train(tiny_config(run, "train.epochs=1", override), resume=True)
    message = str(error.value)
    assert message.startswith(f"--resume: the config differs from the one {run / LAST} was trained with: {listed}")
    assert message.endswith(
        f". Only {', '.join(SAFE_TO_CHANGE_ON_RESUME)} may change on resume; resume with the run's config "
        f"({run / CONFIG}), or start a new run in another output_dir"
    )


def test_resume_with_keys_that_may_change_logs_each_change(one_epoch_run, capsys):
    run = one_epoch_run
    result = train(tiny_config(run, "train.epochs=2", "train.log_every=2", "train.eval_batch_size=4"), resume=True)
    out = capsys.readouterr().out
    assert "unikd: resume: train.epochs 1 -> 2\n" in out and "unikd: resume: train.log_every 1 -> 2\n" in out
    assert [h["epoch"] for h in result["history"]] == [0, 1]
    resumes = [r for r in read_records(run) if r["split"] == "resume"]
    changed = {"train.epochs": [1, 2], "train.eval_batch_size": [16, 4], "train.log_every": [1, 2]}
    assert resumes == [{"split": "resume", "step": STEPS, "epoch": 1, "changed": changed}]
    assert load_config(run / CONFIG).train.epochs == 2  # config.yaml describes the run as it now is


def test_resume_refuses_fewer_epochs_than_done_and_a_changed_dataset(tmp_path):
    run = tmp_path / "run"
    quiet_train(tiny_config(run, "train.epochs=2"))
    message = (
        f"train.epochs: 1 is fewer than the 2 epochs the run in {run} has trained or started; pass train.epochs=2 or "
        "more"
    )
    with pytest.raises(UnikdError, match=f"^{re.escape(message)}$"):
        quiet_train(tiny_config(run, "train.epochs=1"), resume=True)

    root = write_imagefolder(tmp_path / "images")
    run = tmp_path / "folder_run"
    overrides = ("data.name=imagefolder", f"data.root={root}", "data.img_size=8", "data.train_subset=null")
    quiet_train(tiny_config(run, "train.epochs=1", *overrides, "data.val_subset=null"))
    next((root / "train" / "cat").iterdir()).unlink()
    with pytest.raises(UnikdError, match=r"^--resume: the dataset changed since .*last\.pt was written \("
                       r"train_images 96 -> 95, val_images 32 -> 32\); resume with the data"):  # fmt: skip
        quiet_train(tiny_config(run, "train.epochs=2", *overrides, "data.val_subset=null"), resume=True)


# ---- evaluation is not steered by the checkpoint -----------------------------------------------------------------


def test_eval_takes_only_the_model_and_dataset_from_a_stored_config(tmp_path, monkeypatch, cifar10_root):
    run = tmp_path / "run"
    quiet_train(tiny_config(run, "train.epochs=1"))
    checkpoint = load_checkpoint(run / LAST, RESUME_ENTRIES)
    evil = tmp_path / "elsewhere" / "deep"
    checkpoint["config"]["data"].update(name="cifar10", root=str(evil), download=True, num_workers=64, val_subset=3)
    checkpoint["config"]["train"].update(eval_batch_size=10**6, device="cuda", amp="fp16")
    checkpoint["config"]["model"]["student_kwargs"]["pretrained"] = True
    save_checkpoint(checkpoint, tmp_path / "foreign.pt")
    monkeypatch.setattr("unikd.data._download", lambda *a: pytest.fail("eval downloaded"))
    loaders = []
    real_loader = unikd.train._eval_loader
    monkeypatch.setattr(unikd.train, "_eval_loader", lambda cfg, *a: loaders.append(cfg) or real_loader(cfg, *a))

    with pytest.raises(UnikdError, match=rf"^data\.root: cifar10 not found in {re.escape(str(evil))} "):
        evaluate_checkpoint(tmp_path / "foreign.pt")
    assert not (tmp_path / "elsewhere").exists()  # no folder made, nothing fetched
    scores = evaluate_checkpoint(tmp_path / "foreign.pt", [f"data.root={cifar10_root}"])
    assert (scores["dataset"], scores["images"]) == ("cifar10", 100)  # the whole validation set, not 3 images
    (cfg,) = loaders
    assert (cfg.data.num_workers, cfg.train.eval_batch_size, cfg.train.device, cfg.train.amp) == (
        2,
        256,
        "auto",
        "none",
    )
    assert cfg.data.img_size == 8 and cfg.model.student_kwargs == {"width": 4}


# ---- problems with the output folder are found first ------------------------------------------------------------


@pytest.fixture
def no_data(monkeypatch):
    """Fail the test if the run gets as far as building its data."""
    monkeypatch.setattr(unikd.train, "build_datasets", lambda *a: pytest.fail("the run built its data"))


def test_an_output_dir_that_is_a_file_or_under_one(tmp_path, no_data):
    file = tmp_path / "taken"
    file.write_text("")
    message = f"output_dir: {file} is a file, not a folder; choose another output_dir"
    with pytest.raises(UnikdError, match=f"^{re.escape(message)}$"):
        train(tiny_config(file))
    message = f"output_dir: {file / 'run'} is inside {file}, which is a file; choose another output_dir"
    with pytest.raises(UnikdError, match=f"^{re.escape(message)}$"):
        train(tiny_config(file / "run"))


def test_an_unwritable_output_dir_is_found_before_the_data(tmp_path, monkeypatch, no_data):
    real_mkstemp = tempfile.mkstemp

    def read_only(*args, prefix=None, dir=None, **kwargs):
        if str(prefix).startswith(".write-probe."):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_mkstemp(*args, prefix=prefix, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    run = tmp_path / "run"
    message = f"output_dir: cannot write in {run} (Permission denied); fix its permissions or choose another output_dir"
    with pytest.raises(UnikdError, match=f"^{re.escape(message)}$"):
        train(tiny_config(run))


def test_a_full_disk_is_found_before_the_first_step_and_mid_run_says_disk_full(tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setattr(unikd.train, "forward_student", lambda *a, **k: pytest.fail("the run trained"))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(total=10**9, used=10**9, free=4096))
    with pytest.raises(UnikdError, match=rf"^output_dir: disk full: {re.escape(str(run))} has 0 MiB free but one "
                       r"checkpoint needs about 2 MiB; free some space or choose another output_dir$"):  # fmt: skip
        quiet_train(tiny_config(run))
    monkeypatch.undo()

    # The disk fills up during epoch 1: the run stops saying so, the temp file is gone, epoch 0 stays resumable.
    real_save, saves = torch.save, []

    def full_after_two(obj, file):
        saves.append(1)
        if len(saves) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, file)

    script_evaluation(monkeypatch)  # epoch 1 is no new best: its first write is last.pt
    monkeypatch.setattr(torch, "save", full_after_two)
    with pytest.raises(UnikdError, match=rf"^disk full: could not write {re.escape(str(run / LAST))} \("):
        quiet_train(tiny_config(run))
    monkeypatch.undo()
    assert sorted(p.name for p in run.iterdir()) == sorted([CONFIG, METRICS, LAST, BEST])
    assert [h["epoch"] for h in quiet_train(tiny_config(run), resume=True)["history"]] == [0, 1, 2]
