"""`unikd bench`: paired runs, cached teacher, resume of a killed bench, honest summary, and the demo's profile."""

from __future__ import annotations

import json

import pytest

import unikd.train
from unikd import UnikdError
from unikd.bench import PROFILES, bar_chart, machine_note, markdown_table, run_bench, run_training, summarize

pytestmark = pytest.mark.slow

TINY = [
    "train.epochs=1",
    "train.max_steps_per_epoch=2",
    "train.batch_size=16",
    "data.train_subset=null",
    "data.num_workers=0",
    "train.tensorboard=false",
    "train.progress=false",
]


def test_bench_runs_pairs_caches_teacher_and_resumes(tmp_path, fashion_mnist_root, monkeypatch):
    overrides = [f"data.root={fashion_mnist_root}", *TINY]
    out = tmp_path / "bench"
    results = run_bench(
        "fmnist-cpu", out, methods=["uskd", "nkd"], seeds=[0, 1], overrides=overrides, log=lambda m: None
    )

    assert [row["method"] for row in results["summary"]] == ["baseline", "uskd", "nkd"]  # baseline added first
    assert {(r["method"], r["seed"]) for r in results["runs"]} == {
        (m, s) for m in ("baseline", "uskd", "nkd") for s in (0, 1)
    }
    baseline = results["summary"][0]
    assert baseline["deltas"] == [0.0, 0.0] and baseline["time_ratio"] == pytest.approx(1.0)
    for name in ("results.json", "results.md", "curves.png", "bars.png"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "results.json").read_text())["summary"] == json.loads(json.dumps(results["summary"]))
    assert (out / "teacher" / "best.pt").is_file()
    nkd_config = (out / "runs" / "nkd-s0" / "config.yaml").read_text()
    assert str(out / "teacher" / "best.pt") in nkd_config

    # A killed bench: one run lost its final.json (its last.pt stays); the rerun with the same settings trains only
    # that run, resumed, and reuses the teacher and every finished run.
    (out / "runs" / "uskd-s1" / "final.json").unlink()
    calls = []
    real_train = unikd.train.train

    def recording_train(cfg, *, resume=False):
        calls.append((cfg.output_dir, resume))
        return real_train(cfg, resume=resume)

    monkeypatch.setattr(unikd.train, "train", recording_train)
    rerun = run_bench("fmnist-cpu", out, methods=["uskd", "nkd"], seeds=[0, 1], overrides=overrides, log=print)
    assert calls == [(str(out / "runs" / "uskd-s1"), True)]
    resumed = next(r for r in rerun["runs"] if (r["method"], r["seed"]) == ("uskd", 1))
    assert resumed["history"] == next(r for r in results["runs"] if (r["method"], r["seed"]) == ("uskd", 1))["history"]

    # A finished run asked for more epochs continues to them instead of reporting its old result; a finished run asked
    # for another config is refused, naming the key.
    run_dir, run_overrides = (
        out / "runs" / "baseline-s0",
        [*PROFILES["fmnist-cpu"].overrides, "train.seed=0", *overrides],
    )
    longer = run_training("configs/fmnist_baseline.yaml", [*run_overrides, "train.epochs=2"], run_dir)
    assert calls[-1] == (str(run_dir), True) and [entry["epoch"] for entry in longer["history"]] == [0, 1]
    with pytest.raises(UnikdError, match=r"^--resume: the config differs .*: optim\.lr 0\.1 -> 0\.2\. Only output_dir"):
        run_training("configs/fmnist_baseline.yaml", [*run_overrides, "train.epochs=2", "optim.lr=0.2"], run_dir)


def _run(method, seed, last, epoch_time, device="cuda"):
    history = [{"epoch": 0, "top1": last, "epoch_time_s": epoch_time, "peak_mem_mb": 100.0}]
    return {
        "method": method,
        "seed": seed,
        "last_top1": last,
        "best_top1": last,
        "best_epoch": 0,
        "history": history,
        "device": device,
    }


def test_summary_pairs_seeds_and_reports_spread():
    runs = [_run("baseline", 0, 80.0, 10.0), _run("baseline", 1, 82.0, 10.0), _run("uskd", 0, 80.5, 11.0)]
    runs.append(_run("uskd", 1, 82.1, 11.0))
    rows = summarize(runs, ["baseline", "uskd"])
    uskd = rows[1]
    assert uskd["deltas"] == pytest.approx([0.5, 0.1])
    assert uskd["delta_to_baseline"][0] == pytest.approx(0.3)
    assert uskd["delta_to_baseline"][1] == pytest.approx(0.28284271, rel=1e-6)  # sample std of [0.5, 0.1]
    assert uskd["last_top1"][0] == pytest.approx(81.3)
    assert uskd["time_ratio"] == pytest.approx(1.1)
    table = markdown_table(rows, "toy", [0, 1])
    assert "| uskd | 81.30 +- 1.13 | 81.30 +- 1.13 | +0.30 +- 0.28 | 0, 0 | 11.0 | 1.10 | 100 |" in table
    assert "| method | last top-1 |" in table and "| peak CUDA mem MB |" in table


def test_cpu_peak_memory_is_not_shown_and_a_busy_machine_is_said_so():
    # On the CPU the only peak is the process's RSS, which spans every earlier run of the same process.
    rows = summarize([_run("baseline", 0, 80.0, 10.0, device="cpu")], ["baseline"])
    assert rows[0]["peak_mem_mb"] is None
    busy = machine_note([1.5, 3.2], cores=2)
    assert busy == (
        "Measured on a busy machine (load average 1.5-3.2 on 2 cores): epoch times and time ratios are wall-clock "
        "under contention, not a speed measurement."
    )
    table = markdown_table(rows, "toy", [0], busy)
    assert table.splitlines()[0].endswith(busy) and "mem" not in table
    assert table.splitlines()[-1] == "| baseline | 80.00 +- 0.00 | 80.00 +- 0.00 | +0.00 +- 0.00 | 0 | 10.0 | 1.00 |"
    assert machine_note([0.4], cores=2) == "Epoch times are wall-clock (load average 0.4 on 2 cores)."


@pytest.mark.parametrize("seeds", [1, 3])
def test_bars_start_at_zero_and_show_error_bars_only_over_several_seeds(seeds):
    import matplotlib.pyplot as plt

    runs = [_run(m, s, 85.0 + s + (m == "uskd"), 10.0) for m in ("baseline", "uskd") for s in range(seeds)]
    figure = bar_chart(summarize(runs, ["baseline", "uskd"]))
    axis = figure.axes[0]
    assert axis.get_ylim()[0] == 0
    error_bars = [c for c in axis.containers if type(c).__name__ == "ErrorbarContainer"]
    assert len(error_bars) == (1 if seeds > 1 else 0)
    assert ("no spread shown" in axis.get_ylabel()) == (seeds == 1)
    plt.close(figure)


def test_profiles_point_at_existing_configs():
    from unikd.bench import config_path

    for name, profile in PROFILES.items():
        for config in [*profile.configs.values(), *([profile.teacher_config] if profile.teacher_config else [])]:
            assert config_path(config).is_file(), (name, config)


def test_unknown_profile_and_method_are_clear_errors(tmp_path):
    from unikd import UnikdError

    with pytest.raises(UnikdError, match=r"profile: 'fmnist-cpuu' is not one of .* \(did you mean 'fmnist-cpu'\?\)"):
        run_bench("fmnist-cpuu", tmp_path)
    with pytest.raises(UnikdError, match=r"--methods: \['dino'\] not in profile fmnist-demo \(baseline, uskd\)"):
        run_bench("fmnist-demo", tmp_path, methods=["dino"])


def test_the_demo_says_when_it_shows_earlier_runs_instead_of_training(tmp_path, monkeypatch, capsys):
    import unikd.demo as demo

    summary = summarize(
        [_run("baseline", 0, 80.0, 10.0, "cpu"), _run("uskd", 0, 81.0, 11.0, "cpu")], ["baseline", "uskd"]
    )
    results = {"summary": summary, "machine": machine_note([0.5], cores=2)}
    monkeypatch.setattr(demo, "run_bench", lambda *args, **kwargs: results)
    monkeypatch.setattr(demo, "show_soft_labels", lambda *args: None)
    assert demo.main(["--out", str(tmp_path), "--epochs", "2"]) == 0
    assert capsys.readouterr().out.startswith("unikd demo: training baseline and USKD on Fashion-MNIST (2 epochs")

    for method in ("baseline", "uskd"):
        run = tmp_path / "runs" / f"{method}-s0"
        run.mkdir(parents=True)
        (run / "final.json").write_text("{}")
        (run / "config.yaml").write_text("train:\n  epochs: 2\n")
    assert demo.main(["--out", str(tmp_path), "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        f"unikd demo: {tmp_path / 'runs'} holds the finished runs of an earlier demo (2 epochs); showing them without "
        f"retraining. To train again: rm -rf {tmp_path}, or pass --out NEWDIR\n"
    )
    assert "| epoch time s (wall clock) |" in out and "Epoch times are wall-clock (load average 0.5 on 2 cores)." in out
    assert demo.main(["--out", str(tmp_path), "--epochs", "3"]) == 0  # other settings: it trains (continues) them
    assert capsys.readouterr().out.startswith("unikd demo: training baseline and USKD")
