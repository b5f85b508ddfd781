"""`unikd bench`: paired runs, cached teacher, resume of a killed bench, honest summary, and the demo's profile."""

from __future__ import annotations

import json
import os

import pytest

import unikd.train
from unikd import UnikdError
from unikd.bench import (
    PROFILES,
    _build_config,
    _plan,
    bar_chart,
    machine_note,
    markdown_table,
    run_bench,
    run_training,
    summarize,
)

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


def test_the_teacher_pass_is_paid_once_per_seed_and_the_results_say_by_which_run(tmp_path, fashion_mnist_root):
    overrides = [f"data.root={fashion_mnist_root}", *TINY]
    out = tmp_path / "bench"
    results = run_bench("fmnist-cpu", out, methods=["kd", "dkd"], seeds=[0], overrides=overrides, log=lambda m: None)
    use = {run["method"]: run["teacher_cache"] for run in results["runs"]}
    assert use == {
        "baseline": None,
        "kd": {"hits": 0, "misses": 2, "verified": 0},
        "dkd": {"hits": 2, "misses": 0, "verified": 0},
    }
    note = "Teacher pass (teacher-logit cache): seed 0 paid by kd (2 batches); dkd read it."
    assert note in (out / "results.md").read_text()
    assert str(out / "teacher_cache") in (out / "runs" / "dkd-s0" / "config.yaml").read_text()

    # train.teacher_cache=null turns it off; a run finished before the bench used the cache is reused as it is.
    profile = PROFILES["fmnist-cpu"]
    (run,) = [r for r in _plan(profile, ["kd"], {}, [0], ["train.teacher_cache=null"], out) if r.column == "kd"]
    assert _build_config(run.config, run.overrides, run.output_dir, None, check_files=False).train.teacher_cache is None
    calls = []
    real_train = unikd.train.train
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(unikd.train, "train", lambda cfg, *, resume=False: calls.append(resume) or real_train(cfg))
        rerun = run_bench(
            "fmnist-cpu", out, methods=["kd"], seeds=[0], overrides=[*overrides, "train.teacher_cache=null"],
            log=lambda m: None,
        )  # fmt: skip
    assert calls == [] and [r["last_top1"] for r in rerun["runs"]] == [r["last_top1"] for r in results["runs"][:2]]


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
    summary = summarize(runs, ["baseline", "uskd"])
    figure = bar_chart([(row["method"], *row["last_top1"], len(row["seeds"])) for row in summary], "top-1 (%)")
    axis = figure.axes[0]
    assert axis.get_ylim()[0] == 0
    error_bars = [c for c in axis.containers if type(c).__name__ == "ErrorbarContainer"]
    assert len(error_bars) == (1 if seeds > 1 else 0)
    assert ("no spread shown" in axis.get_ylabel()) == (seeds == 1)
    plt.close(figure)


def test_profiles_point_at_existing_configs_and_every_run_of_every_profile_validates(tmp_path):
    from unikd.bench import _check_configs, _columns, _plan, config_path, parse_grid

    for name, profile in PROFILES.items():
        for config in [*profile.configs.values(), *([profile.teacher_config] if profile.teacher_config else [])]:
            assert config_path(config).is_file(), (name, config)
        runs = _plan(
            profile, _columns(profile, name, None), parse_grid(profile.grid), list(profile.seeds), [], tmp_path
        )
        teacher = (profile.teacher_config, [*profile.overrides, *profile.teacher_overrides], tmp_path / "teacher")
        _check_configs(runs, teacher if profile.teacher_config else None)  # raises, naming the run, if one is invalid
        assert len(runs) == len({run.output_dir for run in runs}), name


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


# --- labelled variants, the paper-table profiles and --grid sweeps ----------------------------------------------------


def test_columns_are_methods_or_labelled_variants():
    from unikd.bench import parse_column, parse_grid, split_values

    assert parse_column("uskd") == ("uskd", [])
    assert parse_column("uskd[rank=weak,alpha=0.2]") == ("uskd", ["method.rank=weak", "method.alpha=0.2"])
    assert parse_column("dkd[warmup=[1,2]]") == ("dkd", ["method.warmup=[1,2]"])  # commas inside brackets stay
    for bad in ("uskd[]", "uskd[rank]", "uskd[method.rank=weak]", "uskd rank=weak", "uskd[rank=weak"):
        with pytest.raises(UnikdError) as error:
            parse_column(bad)
        assert str(error.value) == (
            f"method column {bad!r}: expected METHOD or METHOD[key=value,...], e.g. uskd or uskd[rank=weak]"
        )
    assert split_values("0.1, [30,60] ,{a: 1, b: 2},x") == ["0.1", "[30,60]", "{a: 1, b: 2}", "x"]
    assert parse_grid(["method.alpha=0.6,0.8", "optim.lr=0.1"]) == {"method.alpha": ["0.6", "0.8"], "optim.lr": ["0.1"]}
    errors = {
        "method.alpha": "--grid method.alpha: expected KEY=V1,V2,... e.g. method.alpha=0.6,0.8,1.0",
        "method alpha=1": "--grid method alpha=1: expected KEY=V1,V2,... e.g. method.alpha=0.6,0.8,1.0",
        "method.alpha=0.6,,1": "--grid method.alpha=0.6,,1: an empty value; expected KEY=V1,V2,... e.g. "
        "method.alpha=0.6,0.8,1.0",
        "method.alpha=0.6,1,0.6": "--grid method.alpha=0.6,1,0.6: 0.6 given twice",
        "train.seed=0,1": "--grid train.seed: not a key to sweep: the bench sets it from --seeds",
        "output_dir=a,b": "--grid output_dir: not a key to sweep: the bench names every run's folder",
    }
    for spec, message in errors.items():
        with pytest.raises(UnikdError) as error:
            parse_grid([spec])
        assert str(error.value) == message
    with pytest.raises(UnikdError, match=r"^--grid optim\.lr: given twice; put all its values in one --grid"):
        parse_grid(["optim.lr=0.1", "optim.lr=0.2"])


def _fake_training(calls):
    """A stand-in for run_training that records each run and returns a result whose top-1 encodes the run."""

    def fake(config, overrides, output_dir, method_section=None):
        calls.append((config, list(overrides), output_dir, method_section))
        top1 = 80.0 + 10 * float(next((o.split("=")[1] for o in overrides if o.startswith("method.alpha=")), 0))
        top1 += next(int(o.split("=")[1]) for o in overrides if o.startswith("train.seed=")) / 10
        history = [{"epoch": 0, "top1": top1, "epoch_time_s": 1.0}]
        return {"last_top1": top1, "best_top1": top1, "best_epoch": 0, "history": history, "device": "cpu"}

    return fake


def test_grid_sweeps_every_column_but_the_baseline_on_method_keys(tmp_path, monkeypatch, fashion_mnist_root):
    import unikd.bench as bench

    calls = []
    monkeypatch.setattr(bench, "run_training", _fake_training(calls))
    results = run_bench(
        "fmnist-cpu", tmp_path, methods=["uskd", "uskd[rank=weak]"], seeds=[0, 1],
        overrides=[f"data.root={fashion_mnist_root}"], grid=["method.alpha=0.1,0.4"], log=lambda m: None,
    )  # fmt: skip
    rows = [row["method"] for row in results["summary"]]
    assert rows == [
        "baseline",
        "uskd method.alpha=0.1",
        "uskd method.alpha=0.4",
        "uskd[rank=weak] method.alpha=0.1",
        "uskd[rank=weak] method.alpha=0.4",
    ]
    folders = sorted({path.name for _, _, path, _ in calls})
    assert folders == sorted(
        f"{name}-s{seed}"
        for name in ("baseline", "uskd_method.alpha_0.1", "uskd_method.alpha_0.4", "uskd_rank_weak_method.alpha_0.1",
                     "uskd_rank_weak_method.alpha_0.4")
        for seed in (0, 1)
    )  # fmt: skip
    weak = next(o for c, o, path, _ in calls if path.name == "uskd_rank_weak_method.alpha_0.4-s1")
    assert (
        weak.index("method.rank=weak") < weak.index("method.alpha=0.4") < weak.index(f"data.root={fashion_mnist_root}")
    )
    by_row = {row["method"]: row for row in results["summary"]}
    assert by_row["uskd method.alpha=0.4"]["grid"] == {"method.alpha": "0.4"}
    assert by_row["uskd method.alpha=0.4"]["column"] == "uskd" and by_row["baseline"]["grid"] == {}
    assert by_row["uskd method.alpha=0.4"]["deltas"] == pytest.approx([4.0, 4.0])  # paired with the one baseline
    assert results["grid"] == {"method.alpha": ["0.1", "0.4"]} and results["files"][-1] == "sweep.png"
    table = (tmp_path / "results.md").read_text()
    assert (
        "Grid: method.alpha in 0.1, 0.4, for uskd, uskd[rank=weak]; the baseline has no method.* key and is " in table
    )
    assert "| uskd[rank=weak] method.alpha=0.4 | 84.05 +- 0.07 |" in table
    assert (tmp_path / "sweep.png").stat().st_size > 0 and not (tmp_path / "bars.png").exists()


def test_a_non_method_grid_key_sweeps_the_baseline_too(tmp_path, monkeypatch, fashion_mnist_root):
    import unikd.bench as bench

    calls = []
    monkeypatch.setattr(bench, "run_training", _fake_training(calls))
    results = run_bench(
        "fmnist-demo", tmp_path, seeds=[0], overrides=[f"data.root={fashion_mnist_root}"],
        grid=["method.alpha=0.1,0.2", "optim.lr=0.05,0.1"], log=lambda m: None,
    )  # fmt: skip
    by_row = {row["method"]: row for row in results["summary"]}
    assert list(by_row)[:2] == ["baseline optim.lr=0.05", "baseline optim.lr=0.1"]
    assert len(by_row) == 2 + 4 and len(calls) == 6
    assert by_row["uskd method.alpha=0.2 optim.lr=0.1"]["deltas"] == pytest.approx([2.0])
    assert (
        "the baseline is trained at every value of the grid's non-method keys" in (tmp_path / "results.md").read_text()
    )


def test_grid_and_override_conflicts_and_bad_columns_fail_before_any_training(
    tmp_path, monkeypatch, fashion_mnist_root
):
    import unikd.bench as bench

    calls = []
    monkeypatch.setattr(bench, "run_training", _fake_training(calls))
    root = f"data.root={fashion_mnist_root}"

    def error(**kwargs):
        kwargs.setdefault("overrides", [root])
        with pytest.raises(UnikdError) as caught:
            run_bench(kwargs.pop("profile", "fmnist-cpu"), tmp_path, log=lambda m: None, **kwargs)
        return str(caught.value)

    assert error(methods=["uskd[rank=weak]"], grid=["method.rank=paper,sum"]) == (
        "--grid method.rank: column uskd[rank=weak] sets method.rank itself"
    )
    assert error(methods=["uskd[rank=weak]"], overrides=[root, "method.rank=sum"]) == (
        "method.rank=sum: column uskd[rank=weak] sets method.rank itself; drop one of them"
    )
    assert error(methods=["uskd"], overrides=[root, "method.alpha=1"], grid=["method.alpha=0.1,0.2"]) == (
        "method.alpha=1: method.alpha is also a --grid key; give it in one place"
    )
    assert error(methods=["baseline"], grid=["method.alpha=0.1,0.2"]) == (
        "--grid method.alpha: no column to sweep (the baseline has no method.* keys)"
    )
    # Every run's config is built up front: a key that one column lacks fails before the first run trains.
    message = error(methods=["uskd", "ls"], grid=["method.alpha=0.1,0.2"], seeds=[3])
    assert message.startswith("ls method.alpha=0.1, seed 3 (configs/fmnist_ls.yaml): method.alpha: unknown key for ")
    assert error(methods=["uskd[rnak=weak]"]).startswith(
        "uskd[rnak=weak], seed 0 (configs/fmnist_uskd.yaml): method.rnak: unknown key for method 'uskd'"
    )
    assert error(methods=["uskd[rank=wek]"]).startswith(
        "uskd[rank=wek], seed 0 (configs/fmnist_uskd.yaml): method.rank"
    )
    assert error(methods=["mixup[p=1]"]).startswith("--methods: ['mixup[p=1]'] not in profile fmnist-cpu (baseline, ")
    assert calls == []


def test_paper_table_profiles_are_the_rows_files_variants():
    """fmnist-table9-rank and fmnist-table5-nkd run the method overrides of configs/paper/table09/table05's rows."""
    import yaml

    from unikd.bench import config_path, parse_column, parse_grid

    for profile_name, rows_file, method in (
        ("fmnist-table9-rank", "configs/paper/table09_rank.yaml", "uskd"),
        ("fmnist-table5-nkd", "configs/paper/table05_nkd_terms.yaml", "nkd"),
    ):
        rows = yaml.safe_load(config_path(rows_file).read_text())["rows"]
        expected = [sorted(o for o in row["overrides"] if o.startswith("method.")) for row in rows.values()]
        profile = PROFILES[profile_name]
        columns = [parse_column(column) for column in profile.methods if column != "baseline"]
        assert {name for name, _ in columns} == {method}
        # A row without a method override is the method's default (NKD's normalised term, USKD's Eq. 10 rank): the
        # profile names that default explicitly so that the table says what it ran.
        defaults = {"nkd": ["method.non_target_loss=normalized"], "uskd": ["method.rank=paper"]}
        assert sorted(sorted(variant) for _, variant in columns) == sorted(e or defaults[method] for e in expected)
    assert PROFILES["fmnist-table5-nkd"].teacher_config == PROFILES["fmnist-cpu"].teacher_config
    assert PROFILES["fmnist-table5-nkd"].teacher_overrides == PROFILES["fmnist-cpu"].teacher_overrides
    for name in ("fmnist-table9-rank", "fmnist-table5-nkd"):
        assert PROFILES[name].overrides == PROFILES["fmnist-cpu"].overrides and PROFILES[name].seeds == (0, 1, 2)
    # Table 10's rows (NKD's temperature) are the grid of the CIFAR-100 sweep profile, on the rows file's base config.
    rows_file = yaml.safe_load(config_path("configs/paper/table10_nkd_temperature.yaml").read_text())
    temperatures = [float(o.split("=")[1]) for row in rows_file["rows"].values() for o in row["overrides"]
                    if o.startswith("method.temperature=")]  # fmt: skip
    table10 = PROFILES["cifar100-table10-temperature"]
    (values,) = parse_grid(table10.grid).values()
    assert [float(value) for value in values] == temperatures and table10.configs["nkd"] == rows_file["base"]


def test_every_teacher_method_is_in_the_fmnist_and_cifar_kd_profiles():
    from unikd.bench import TEACHER_METHODS

    assert TEACHER_METHODS == ("kd", "dkd", "nkd", "wsld")
    for name in ("fmnist-cpu", "fmnist-gpu", "cifar100-kd"):
        assert set(TEACHER_METHODS) <= set(PROFILES[name].methods), name
    assert PROFILES["cifar100-kd"].method_sections["wsld"] == {"name": "wsld", "temperature": 4.0, "alpha": 2.25}


def test_figure_profiles_sweep_uskd_on_the_imagenet_configs():
    from unikd.bench import parse_grid

    expected = {
        "fig4-alpha": ["method.alpha", ["0.6", "0.8", "1", "1.2", "1.4"]],
        "fig5-beta": ["method.beta", ["0.06", "0.08", "0.1", "0.12", "0.14"]],
        "fig6-mu": ["method.mu", ["0.003", "0.004", "0.005", "0.006", "0.007"]],
    }
    for figure, (key, values) in expected.items():
        for model, config in (("resnet18", "resnet18"), ("regnetx016", "regnetx_016")):
            profile = PROFILES[f"imagenet-{figure}-{model}"]
            assert parse_grid(profile.grid) == {key: values}
            assert profile.configs == {m: f"configs/imagenet_selfkd_{config}.yaml" for m in ("baseline", "uskd")}
            assert profile.method_sections == {"baseline": {"name": "baseline"}}


@pytest.mark.parametrize("profile", ["fmnist-table9-rank", "fmnist-table5-nkd"])
def test_paper_table_profiles_train_tiny(profile, tmp_path, fashion_mnist_root):
    from unikd.bench import _slug, parse_column

    results = run_bench(
        profile, tmp_path, seeds=[0], overrides=[f"data.root={fashion_mnist_root}", *TINY], log=lambda m: None
    )
    assert [row["method"] for row in results["summary"]] == list(PROFILES[profile].methods)
    for column in PROFILES[profile].methods[1:]:  # each run's stored config holds its variant
        method, variant = parse_column(column)
        key, value = variant[0].removeprefix("method.").split("=")
        config = (tmp_path / "runs" / f"{_slug(column)}-s0" / "config.yaml").read_text()
        assert f"  name: {method}\n" in config and f"  {key}: {value}\n" in config
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {column} |" in table for column in PROFILES[profile].methods)
    assert (tmp_path / "bars.png").stat().st_size > 0


def test_the_sweep_profile_trains_tiny_resumes_and_reuses_finished_points(
    tmp_path, fashion_mnist_root, monkeypatch, capsys
):
    from unikd.cli import main

    overrides = [f"data.root={fashion_mnist_root}", *TINY]
    out = tmp_path / "sweep"
    args = ["bench", "fmnist-sweep-alpha", *overrides, "--out", str(out), "--seeds", "0", "--grid"]
    assert main([*args, "method.alpha=0.05,0.2"]) == 0
    stdout = capsys.readouterr().out
    assert "| uskd method.alpha=0.05 |" in stdout and "| baseline |" in stdout
    assert stdout.rstrip().endswith(f"results.json, results.md, curves.png, sweep.png in {out}")
    results = json.loads((out / "results.json").read_text())
    assert [row["method"] for row in results["summary"]] == [
        "baseline",
        "uskd method.alpha=0.05",
        "uskd method.alpha=0.2",
    ]
    assert "  alpha: 0.2\n" in (out / "runs" / "uskd_method.alpha_0.2-s0" / "config.yaml").read_text()

    # A killed sweep (one point lost its final.json) continues: only that point trains, resumed; a wider grid trains
    # only its new point and reuses every finished one.
    (out / "runs" / "uskd_method.alpha_0.2-s0" / "final.json").unlink()
    calls = []
    real_train = unikd.train.train

    def recording_train(cfg, *, resume=False):
        calls.append((cfg.output_dir, resume))
        return real_train(cfg, resume=resume)

    monkeypatch.setattr(unikd.train, "train", recording_train)
    assert main([*args, "method.alpha=0.05,0.2,0.4"]) == 0
    assert calls == [
        (str(out / "runs" / "uskd_method.alpha_0.2-s0"), True),
        (str(out / "runs" / "uskd_method.alpha_0.4-s0"), False),
    ]
    capsys.readouterr()
    assert main([*args, "method.alpha=0.05,0.2,0.4"]) == 0 and len(calls) == 2  # everything finished: nothing trains


def test_sweep_chart_plots_top1_against_the_values_with_the_baseline_as_a_reference():
    import matplotlib.pyplot as plt

    from unikd.bench import sweep_chart

    def sweep(column, key, values, seeds):
        """Baseline rows (79 + seed) and one row per value of key (80, 81, 82 + seed), summarised together."""
        runs, labels = [_run("baseline", s, 79.0 + s, 1.0) for s in range(seeds)], ["baseline"]
        for index, value in enumerate(values):
            labels.append(f"{column} {key}={value}")
            for seed in range(seeds):
                runs.append(
                    {**_run(labels[-1], seed, 80.0 + index + seed, 1.0), "column": column, "grid": {key: value}}
                )
        return summarize(runs, labels)

    for seeds in (1, 3):
        summary = sweep("uskd", "method.alpha", ["0.025", "0.1", "0.4"], seeds)
        figure = sweep_chart(summary, {"method.alpha": ["0.025", "0.1", "0.4"]})
        axis = figure.axes[0]
        assert axis.get_xscale() == "log" and [t.get_text() for t in axis.get_xticklabels()] == ["0.025", "0.1", "0.4"]
        (uskd,) = [c for c in axis.containers if c.get_label() == "uskd"]  # errorbar: data line + error bars
        assert list(uskd.lines[0].get_ydata()) == pytest.approx([80 + (seeds - 1) / 2 + d for d in (0, 1, 2)])
        assert uskd.has_yerr == (seeds > 1) and axis.get_xlabel() == "method.alpha"
        (baseline,) = [line for line in axis.get_lines() if line.get_label() == "baseline (not swept)"]
        assert list(baseline.get_ydata()) == pytest.approx([79 + (seeds - 1) / 2] * 2)  # a horizontal reference line
        assert len(axis.patches) == (1 if seeds > 1 else 0)  # its +- std band
        plt.close(figure)
    figure = sweep_chart(sweep("uskd", "method.rank", ["weak", "paper"], 1), {"method.rank": ["weak", "paper"]})
    assert figure.axes[0].get_xscale() == "linear" and list(figure.axes[0].get_xticks()) == [0.0, 1.0]
    plt.close(figure)


def test_a_sweep_runs_under_torchrun_with_one_process_group_and_rank_0_writing(tmp_path, fashion_mnist_root):
    """Two gloo processes: every run is one DDP job (the trainer joins the bench's process group; one it made itself
    could not be made again for the next run), and only rank 0 prints and writes the bench's files."""
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
        "-m", "unikd", "bench", "fmnist-sweep-alpha", f"data.root={fashion_mnist_root}", *TINY,
        "--out", str(out), "--seeds", "0", "--grid", "method.alpha=0.05,0.2",
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("unikd bench: fmnist-sweep-alpha done") == 1
    assert done.stdout.count("[bench] baseline seed 0 -> ") == 1 and "device cpu x 2 processes" in done.stdout
    results = json.loads((out / "results.json").read_text())
    assert [row["method"] for row in results["summary"]] == [
        "baseline",
        "uskd method.alpha=0.05",
        "uskd method.alpha=0.2",
    ]


def test_docs_paper_names_only_configs_and_profiles_that_exist():
    """docs/PAPER.md: every config path (with {a,b} alternatives) is a file, every bench profile is one."""
    import re
    from pathlib import Path

    from unikd.detection.bench import PROFILES as DETECTION_PROFILES

    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "PAPER.md").read_text()
    paths = set()
    for found in re.findall(r"configs/[\w/{},.-]+\.yaml", text):
        brace = re.search(r"\{([^}]*)\}", found)
        options = brace[1].split(",") if brace else [""]
        paths |= {found[: brace.start()] + option + found[brace.end() :] if brace else found for option in options}
    assert len(paths) > 30 and [path for path in sorted(paths) if not (root / path).is_file()] == []
    named = set(re.findall(r"unikd bench ([\w-]+)", text)) | set(re.findall(r"`(imagenet-fig[\w-]+)`", text))
    assert named - set(PROFILES) == {"PROFILE"} and "fmnist-table9-rank" in named  # PROFILE: the usage line
    assert set(re.findall(r"unikd detect bench ([\w-]+)", text)) <= set(DETECTION_PROFILES)
    rows = {line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")}
    assert {f"Table {n}" for n in range(3, 16)} | {"Table 1, CIFAR-100", "Table 2, ImageNet"} <= rows
    assert {f"Figure {n}" for n in range(3, 7)} <= rows
