"""The teacher-logit cache in the trainer (``train.teacher_cache``), on tiny FakeData runs with a CRD-file teacher.

A warm float32 cache is exact: KD, DKD, NKD and WSLD train the live teacher's student bit for bit without building
the teacher (its build raises here). float16 rounds each teacher logit (relative error <= 2**-11); a fingerprint
mismatch is a miss with the reason; a run killed mid-epoch leaves what it stored readable.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import REPO, crd_teacher_file, read_metrics, tiny_config, tiny_overrides

import unikd.train
from unikd._checkpoint import load_checkpoint
from unikd.train import TrainableModules, train

METHODS = ("kd", "dkd", "nkd", "wsld")
pytestmark = pytest.mark.xdist_group("teacher_cache")  # one worker: the module's runs share a cache


def teacher_keys(teacher: Path) -> tuple[str, ...]:
    return ("model.teacher=mdistiller/resnet8", f"model.teacher_checkpoint={teacher}", "data.augment=default")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A teacher file, and a cache filled by one cold KD run (which must equal the live KD run)."""
    root = tmp_path_factory.mktemp("cache")
    crd_teacher_file(root / "teacher.pth")
    keys = teacher_keys(root / "teacher.pth")
    cold = train(tiny_config(root / "kd-cold", *keys, "method.name=kd", f"train.teacher_cache={root / 'cache'}"))
    return root, keys, cold


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "last.pt")["model"]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def scores(result: dict) -> list[dict]:
    return [{k: v for k, v in entry.items() if k not in ("epoch_time_s", "peak_mem_mb")} for entry in result["history"]]


def cache_records(run: Path) -> list[dict]:
    return [record for record in read_metrics(run) if record["split"] == "teacher_cache"]


def forbid_teacher(monkeypatch) -> None:
    """Make building the checkpoint teacher (and measuring its top-1) fail: a warm run must need neither."""
    real = unikd.train.read_model_weights

    def reading_only(*args, **kwargs):
        state, report, _ = real(*args, **kwargs)

        def build(_state):
            raise AssertionError("the teacher was built")

        return state, report, build

    monkeypatch.setattr(unikd.train, "read_model_weights", reading_only)
    monkeypatch.setattr(unikd.train, "teacher_from_config", lambda *a, **k: pytest.fail("teacher_from_config"))


@pytest.mark.parametrize("method", METHODS)
def test_a_warm_float32_cache_trains_the_live_teachers_student_without_the_teacher(
    setup, tmp_path, monkeypatch, capsys, method
):
    root, keys, cold = setup
    live = train(tiny_config(tmp_path / "live", *keys, f"method.name={method}"))
    if method == "kd":
        assert same(weights(root / "kd-cold"), weights(tmp_path / "live")) and scores(cold) == scores(live)
    capsys.readouterr()
    forbid_teacher(monkeypatch)
    warm = train(
        tiny_config(tmp_path / "warm", *keys, f"method.name={method}", f"train.teacher_cache={root / 'cache'}")
    )
    assert same(weights(tmp_path / "live"), weights(tmp_path / "warm"))
    assert scores(warm) == scores(live)
    assert warm["teacher_top1"] == live["teacher_top1"]  # stored by the cold run
    assert "2 of 2 epochs cached, the teacher is not built" in capsys.readouterr().out
    header, *epochs = cache_records(tmp_path / "warm")
    assert header["used"] and header["epochs_cached"] == 2 and header["reason"] is None
    assert [(r["epoch"], r["hits"], r["misses"]) for r in epochs] == [(0, 4, 0), (1, 4, 0)]


def test_float16_rounds_each_teacher_logit_by_at_most_2_to_the_minus_11(setup, tmp_path, monkeypatch):
    root, keys, _ = setup
    seen: dict[str, list[torch.Tensor]] = {"live": [], "cold": [], "warm": []}
    real_forward = TrainableModules.forward
    for name in seen:

        def recording(self, images, target, teacher_logits, progress, name=name):
            seen[name].append(teacher_logits.clone())
            return real_forward(self, images, target, teacher_logits, progress)

        monkeypatch.setattr(TrainableModules, "forward", recording)
        cache = () if name == "live" else (f"train.teacher_cache={root / 'cache'}", "train.teacher_cache_dtype=float16")
        train(tiny_config(tmp_path / name, *keys, "method.name=kd", *cache))
    assert same(weights(tmp_path / "cold"), weights(tmp_path / "warm"))  # a miss gives the rounded logits too
    for live, rounded in zip(seen["live"], seen["warm"], strict=True):
        assert torch.equal(rounded, live.half().float())
        assert ((rounded - live).abs() <= live.abs() * 2**-11).all()
    assert not all(torch.equal(a, b) for a, b in zip(seen["live"], seen["warm"]))
    difference = max((a - b).abs().max() for a, b in zip(*(weights(tmp_path / n).values() for n in ("live", "warm"))))
    assert 0 < difference < 1e-3  # measured: ~1e-5 after 8 SGD steps of KD


def other_teacher(path: Path, source: Path) -> Path:
    checkpoint = torch.load(source, weights_only=False)
    first = next(iter(checkpoint["model"]))
    checkpoint["model"][first] = checkpoint["model"][first] + 1e-3
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(
    ("change", "field"),
    [("teacher", "teacher.weights"), ("data.augment=none", "data.transform"), ("data.img_size=16", "data.img_size")],
)
def test_a_fingerprint_mismatch_is_a_miss_with_the_reason(setup, tmp_path, capsys, change, field):
    root, keys, _ = setup
    if change == "teacher":
        keys = teacher_keys(other_teacher(tmp_path / "other.pth", root / "teacher.pth"))
        change = "data.augment=default"
    cache = root / "cache"
    train(tiny_config(tmp_path / "run", *keys, change, "method.name=kd", f"train.teacher_cache={cache}",
                      "train.epochs=1", "train.max_steps_per_epoch=1"))  # fmt: skip
    header, epoch = cache_records(tmp_path / "run")
    assert header["epochs_cached"] == 0 and epoch["misses"] == 1
    assert header["reason"].startswith(
        f"teacher cache {cache}: no logits for this teacher and data pipeline; the close"
    )
    assert f"{field} (here " in header["reason"]
    assert f"the teacher computes the rest ({header['reason']})" in capsys.readouterr().out


def test_a_run_killed_mid_epoch_leaves_the_logits_it_stored_readable(setup, tmp_path):
    root, keys, _ = setup
    cache = tmp_path / "cache"
    overrides = tiny_overrides(tmp_path / "killed", *keys, "method.name=kd", f"train.teacher_cache={cache}")
    script = (  # SIGKILL during the student's forward of step 3: the teacher's logits of steps 1-3 are stored
        "import os, signal, unikd.train as engine\n"
        "from unikd.config import load_config\n"
        "real, calls = engine.forward_student, []\n"
        "def dying(*args, **kwargs):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 3:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(*args, **kwargs)\n"
        "engine.forward_student = dying\n"
        f"engine.train(load_config(None, {overrides!r}))\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    train(tiny_config(tmp_path / "after", *keys, "method.name=kd", f"train.teacher_cache={cache}"))
    epochs = cache_records(tmp_path / "after")[1:]
    assert [(r["hits"], r["misses"]) for r in epochs] == [(3, 1), (0, 4)]
    assert same(weights(tmp_path / "after"), weights(root / "kd-cold"))


def test_a_method_without_a_checkpoint_teacher_does_not_use_the_cache(tmp_path, capsys):
    train(tiny_config(tmp_path / "run", "method.name=baseline", f"train.teacher_cache={tmp_path / 'cache'}",
                      "train.epochs=1", "train.max_steps_per_epoch=1"))  # fmt: skip
    assert f"teacher cache: {tmp_path / 'cache'} not used (method baseline takes no teacher)" in capsys.readouterr().out
    assert cache_records(tmp_path / "run") == [
        {"split": "teacher_cache", "step": 0, "epoch": 0, "used": False, "reason": "method baseline takes no teacher"}
    ]
    assert not (tmp_path / "cache").exists()


def test_verify_recomputes_cached_batches_and_fails_on_a_difference(setup, tmp_path, monkeypatch):
    root, keys, _ = setup
    real_get = unikd.train.TeacherCache.get

    def stale(self, keys):  # what a change the fingerprints do not see would give
        cached = real_get(self, keys)
        return None if cached is None else cached + 0.5

    monkeypatch.setattr(unikd.train.TeacherCache, "get", stale)
    cache = root / "cache"
    with pytest.raises(unikd.train.UnikdError, match=r"differ from the live teacher's by up to 0\.5 \(8 of 8 rows"):
        train(tiny_config(tmp_path / "run", *keys, "method.name=kd", f"train.teacher_cache={cache}",
                          "train.teacher_cache_verify=1"))  # fmt: skip


def test_a_run_resumed_with_the_cache_turned_on_reads_it_and_trains_the_same_student(setup, tmp_path, monkeypatch):
    root, keys, _ = setup
    real = unikd.train.forward_student
    calls = []

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(unikd.train, "forward_student", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path / "run", *keys, "method.name=kd"))  # the live teacher, no cache
    monkeypatch.undo()
    forbid_teacher(monkeypatch)  # resumed: the top-1 is in the checkpoint, the logits in the cache
    train(tiny_config(tmp_path / "run", *keys, "method.name=kd", f"train.teacher_cache={root / 'cache'}"), resume=True)
    header, *epochs = (r for r in cache_records(tmp_path / "run") if r["step"] >= 3)
    assert header["resumed"] and header["epochs_cached"] == 2
    assert [(r["hits"], r["misses"]) for r in epochs] == [(1, 0), (4, 0)]
    assert same(weights(tmp_path / "run"), weights(root / "kd-cold"))
