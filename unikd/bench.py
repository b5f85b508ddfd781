"""Side-by-side benchmarks: several methods, one profile, N paired seeds, honest tables.

    unikd bench fmnist-cpu --out bench_out/fmnist-cpu            # trains, resumes, tabulates
    unikd bench fmnist-cpu --out DIR --methods baseline uskd --seeds 0 1

A profile names a config per method (``configs/<prefix>_<method>.yaml``), the seeds, and overrides shared by every
run (epochs, subset sizes). Teacher methods get the profile's teacher, trained once into ``OUT/teacher`` and reused.
Each run lives in ``OUT/runs/<method>-s<seed>``: a finished run (``final.json``) with the same config is not redone,
an interrupted one (``last.pt``) resumes, so a killed bench continues where it stopped; a finished run asked for
more epochs continues to them, and one asked for a different config is refused (``unikd train --resume`` rules).
Seeds are paired: the same seed gives every method the same student initialisation and data order, so the per-seed
difference to the baseline cancels most of the seed-to-seed noise; the table reports it next to the plain mean +- std.

Outputs: ``results.json`` (every run's history and the summary), ``results.md`` (the table), ``curves.png``
(validation top-1 per epoch) and ``bars.png`` (final top-1 from 0, with +- std error bars when there are several
seeds). Epoch times are wall-clock: the table gives the machine's load average during the runs and says when it was
busy, when the time ratios are not a speed measurement. Peak memory is shown for CUDA runs only (CUDA's peak
allocation, reset per epoch); on the CPU the only figure is the process's peak RSS, which covers every run the
process made before, so it is not shown.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from unikd._errors import UnikdError

SELF_KD_METHODS = ("baseline", "ls", "tfkd", "zipf_ls", "uskd")
TEACHER_METHODS = ("kd", "dkd", "nkd")


@dataclass(frozen=True)
class Profile:
    """A benchmark: which config trains each method, the seeds, and the overrides every run shares.

    ``configs`` maps a method to its config file. ``method_sections`` optionally replaces a config's whole ``method``
    section for a method, so that one protocol config (say a CIFAR-100 teacher-student pair) serves every method.
    """

    description: str
    configs: dict[str, str]
    seeds: tuple[int, ...]
    overrides: tuple[str, ...] = ()
    method_sections: dict[str, dict] = field(default_factory=dict)
    teacher_config: str | None = None
    teacher_overrides: tuple[str, ...] = ()

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(self.configs)


def _per_method_configs(prefix: str, methods: tuple[str, ...]) -> dict[str, str]:
    return {method: f"configs/{prefix}_{method}.yaml" for method in methods}


# Released/paper hyper-parameters of the CIFAR-100 KD baselines (CRD/DKD protocol, as in mdistiller).
_CIFAR_KD_SECTIONS = {
    "baseline": {"name": "baseline"},
    "kd": {"name": "kd", "temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9},
    "dkd": {"name": "dkd", "temperature": 4.0, "alpha": 1.0, "beta": 8.0, "warmup": 20.0},
}

PROFILES: dict[str, Profile] = {
    "fmnist-cpu": Profile(
        description="Fashion-MNIST, cifar/smallcnn student, cifar/resnet20 teacher (3 epochs on the full training "
        "set); sized for under an hour on 2 CPU cores: each run trains 4 epochs on a fixed 20k-image subset.",
        configs=_per_method_configs("fmnist", SELF_KD_METHODS + TEACHER_METHODS),
        seeds=(0, 1, 2),
        overrides=("train.epochs=4", "data.train_subset=20000", "train.progress=false", "data.num_workers=0"),
        teacher_config="configs/fmnist_teacher.yaml",
        teacher_overrides=("train.epochs=3", "data.train_subset=null"),
    ),
    "fmnist-demo": Profile(
        description="make demo: baseline vs USKD on Fashion-MNIST, one seed, 4 epochs on a fixed 25k-image subset.",
        configs=_per_method_configs("fmnist", ("baseline", "uskd")),
        seeds=(0,),
        overrides=("train.epochs=4", "data.train_subset=25000", "data.num_workers=0"),
    ),
    "fmnist-gpu": Profile(
        description="Fashion-MNIST at full length for a GPU: the whole training set, 30 epochs per run, 3 seeds.",
        configs=_per_method_configs("fmnist", SELF_KD_METHODS + TEACHER_METHODS),
        seeds=(0, 1, 2),
        overrides=("train.epochs=30", "train.progress=false", "train.device=cuda", "data.num_workers=4"),
        teacher_config="configs/fmnist_teacher.yaml",
    ),
    "cifar100-kd": Profile(
        description="CIFAR-100, paper Table 1 pair ResNet32x4 -> ResNet8x4, CRD/DKD protocol (240 epochs, 3 seeds); "
        "KD, DKD and NKD from one teacher trained by configs/cifar100_teacher_resnet32x4.yaml. Needs CIFAR-100.",
        configs={m: "configs/cifar100_kd_resnet32x4_resnet8x4.yaml" for m in ("baseline", "kd", "dkd", "nkd")},
        method_sections=_CIFAR_KD_SECTIONS,
        seeds=(0, 1, 2),
        overrides=("train.progress=false",),
        teacher_config="configs/cifar100_teacher_resnet32x4.yaml",
    ),
    "cifar100-selfkd": Profile(
        description="CIFAR-100, paper Table 2 self-KD with ResNet18 (200 epochs, 3 seeds). Needs CIFAR-100.",
        configs={m: "configs/cifar100_selfkd_resnet18.yaml" for m in SELF_KD_METHODS},
        method_sections={m: {"name": m} for m in SELF_KD_METHODS if m != "uskd"},
        seeds=(0, 1, 2),
        overrides=("train.progress=false",),
    ),
}


def config_path(relative: str) -> Path:
    """A config shipped in the repository's ``configs/``: looked up from the working directory, then the source tree."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (base / relative).is_file():
            return base / relative
    raise UnikdError(f"config {relative} not found; run from the unikd repository root (it holds configs/)")


def run_training(config: str, overrides: list[str], output_dir: Path, method_section: dict | None = None) -> dict:
    """Train one run, unless ``output_dir`` holds it finished with the same config (then return its ``final.json``).

    An interrupted run, or a finished one asked for more epochs, resumes; a different config is refused by the
    trainer's resume check with the list of differing keys.
    """
    import yaml

    from unikd.config import config_changes, config_from_dict, config_to_dict, load_config
    from unikd.train import train

    raw = yaml.safe_load(config_path(config).read_text()) or {}
    if method_section is not None:
        raw["method"] = dict(method_section)
    cfg = config_from_dict(raw, [*overrides, f"output_dir={output_dir}"])
    final, stored = output_dir / "final.json", output_dir / "config.yaml"
    if final.is_file() and stored.is_file():
        same = not config_changes(config_to_dict(load_config(stored, check_files=False)), config_to_dict(cfg))
        if same:
            return json.loads(final.read_text())
    started = (output_dir / "last.pt").is_file() or (output_dir / "best.pt").is_file()
    result = train(cfg, resume=started)
    result["load_average"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return result


def run_bench(
    profile_name: str,
    out_dir: str | Path,
    *,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    overrides: list[str] = (),
    log=print,
) -> dict:
    """Run (or resume) every (method, seed) of the profile, then write the results; returns the summary dict."""
    profile = get_profile(profile_name)
    methods = list(methods or profile.methods)
    unknown = [m for m in methods if m not in profile.methods]
    if unknown:
        raise UnikdError(f"--methods: {unknown} not in profile {profile_name} ({', '.join(profile.methods)})")
    if "baseline" not in methods:
        methods.insert(0, "baseline")  # every delta is to the baseline of the same seed
    seeds = list(profile.seeds if seeds is None else seeds)
    out_dir = Path(out_dir)

    teacher_checkpoint = None
    if any(m in TEACHER_METHODS for m in methods):
        if profile.teacher_config is None:
            raise UnikdError(f"profile {profile_name} has no teacher for {', '.join(TEACHER_METHODS)}")
        log(f"[bench] teacher: {profile.teacher_config} -> {out_dir / 'teacher'}")
        teacher = run_training(
            profile.teacher_config, [*profile.overrides, *profile.teacher_overrides, *overrides], out_dir / "teacher"
        )
        log(f"[bench] teacher top-1 {teacher['best_top1']:.2f}")
        teacher_checkpoint = out_dir / "teacher" / "best.pt"

    runs = []
    for seed in seeds:
        for method in methods:
            run_overrides = [*profile.overrides, f"train.seed={seed}"]
            if method in TEACHER_METHODS:
                run_overrides.append(f"model.teacher_checkpoint={teacher_checkpoint}")
            run_dir = out_dir / "runs" / f"{method}-s{seed}"
            log(f"[bench] {method} seed {seed} -> {run_dir}")
            result = run_training(
                profile.configs[method], [*run_overrides, *overrides], run_dir, profile.method_sections.get(method)
            )
            log(f"[bench] {method} seed {seed}: last top-1 {result['last_top1']:.2f}")
            runs.append({"method": method, "seed": seed, **result})

    summary = summarize(runs, methods)
    machine = machine_note([run.get("load_average") for run in runs])
    results = {
        "profile": profile_name,
        "description": profile.description,
        "machine": machine,
        "summary": summary,
        "runs": runs,
    }
    if teacher_checkpoint is not None:
        results["teacher_top1"] = teacher["best_top1"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "results.md").write_text(markdown_table(summary, profile_name, seeds, machine) + "\n")
    plot_results(runs, summary, out_dir)
    return results


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        import difflib

        close = difflib.get_close_matches(name, list(PROFILES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnikdError(f"profile: {name!r} is not one of {', '.join(PROFILES)}{hint}")
    return PROFILES[name]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict], methods: list[str]) -> list[dict]:
    """One row per method: last-epoch top-1 mean/std, the paired delta to the baseline, best epoch, time, memory."""
    by_method = {m: sorted((r for r in runs if r["method"] == m), key=lambda r: r["seed"]) for m in methods}
    baseline_by_seed = {r["seed"]: r for r in by_method["baseline"]}
    baseline_time = statistics.fmean(e["epoch_time_s"] for r in by_method["baseline"] for e in r["history"])
    rows = []
    for method, method_runs in by_method.items():
        if not method_runs:
            continue
        last = [r["last_top1"] for r in method_runs]
        best = [r["best_top1"] for r in method_runs]
        deltas = [r["last_top1"] - baseline_by_seed[r["seed"]]["last_top1"] for r in method_runs]
        epoch_time = statistics.fmean(e["epoch_time_s"] for r in method_runs for e in r["history"])
        on_cuda = all(r.get("device") == "cuda" for r in method_runs)
        rows.append(
            {
                "method": method,
                "seeds": [r["seed"] for r in method_runs],
                "last_top1": _mean_std(last),
                "best_top1": _mean_std(best),
                "best_epoch": [r["best_epoch"] for r in method_runs],
                "delta_to_baseline": _mean_std(deltas),
                "deltas": deltas,
                "epoch_time_s": epoch_time,
                "time_ratio": epoch_time / baseline_time,
                # CUDA's peak is per epoch; the CPU's peak RSS spans every earlier run of the process: not shown.
                "peak_mem_mb": (
                    max(e.get("peak_mem_mb", 0.0) for r in method_runs for e in r["history"]) if on_cuda else None
                ),
            }
        )
    return rows


def machine_note(load_averages: list[float | None], cores: int | None = None) -> str:
    """One sentence on how busy the machine was while the runs were timed (their 1-minute load averages)."""
    cores = cores or os.cpu_count() or 1
    loads = [load for load in load_averages if load is not None]
    if not loads:
        return "Epoch times are wall-clock; the machine's load was not measured."
    span = f"{min(loads):.1f}-{max(loads):.1f}" if len(loads) > 1 else f"{loads[0]:.1f}"
    if max(loads) > cores:
        return (
            f"Measured on a busy machine (load average {span} on {cores} cores): epoch times and time ratios are "
            "wall-clock under contention, not a speed measurement."
        )
    return f"Epoch times are wall-clock (load average {span} on {cores} cores)."


def markdown_table(summary: list[dict], profile_name: str, seeds: list[int], machine: str = "") -> str:
    with_memory = any(row["peak_mem_mb"] is not None for row in summary)
    lines = [
        f"Profile `{profile_name}`, seeds {seeds}. Top-1 in %, mean +- std over seeds; delta: per-seed difference to "
        "the baseline of the same seed (paired), mean +- std. Best epoch per seed (0-based). "
        + (machine or machine_note([])),
        "",
        "| method | last top-1 | best top-1 | delta to baseline (paired) | best epoch | epoch time s | time ratio |"
        + (" peak CUDA mem MB |" if with_memory else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if with_memory else ""),
    ]
    for row in summary:
        (last, last_std), (best, best_std), (delta, delta_std) = (
            row["last_top1"],
            row["best_top1"],
            row["delta_to_baseline"],
        )
        memory = f" {row['peak_mem_mb']:.0f} |" if row["peak_mem_mb"] is not None else " - |"
        lines.append(
            f"| {row['method']} | {last:.2f} +- {last_std:.2f} | {best:.2f} +- {best_std:.2f} | "
            f"{delta:+.2f} +- {delta_std:.2f} | {', '.join(map(str, row['best_epoch']))} | {row['epoch_time_s']:.1f} | "
            f"{row['time_ratio']:.2f} |" + (memory if with_memory else "")
        )
    return "\n".join(lines)


def plot_results(runs: list[dict], summary: list[dict], out_dir: Path) -> None:
    """``curves.png``: mean validation top-1 per epoch (band: min-max over seeds); ``bars.png``: last top-1 +- std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for row in summary:
        curves = [[e["top1"] for e in r["history"]] for r in runs if r["method"] == row["method"]]
        length = min(len(c) for c in curves)
        epochs = list(range(1, length + 1))
        columns = [[c[i] for c in curves] for i in range(length)]
        axis.plot(epochs, [statistics.fmean(c) for c in columns], marker="o", label=row["method"])
        axis.fill_between(epochs, [min(c) for c in columns], [max(c) for c in columns], alpha=0.15)
    axis.set_xlabel("epoch")
    axis.set_ylabel("validation top-1 (%)")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out_dir / "curves.png", dpi=100)
    plt.close(figure)

    figure = bar_chart(summary)
    figure.savefig(out_dir / "bars.png", dpi=100)
    plt.close(figure)


def bar_chart(summary: list[dict]):
    """The ``bars.png`` figure: last-epoch top-1 per method on an axis from 0 (a cut axis exaggerates differences),
    with +- std error bars only when every method has several seeds (one seed has no spread to show)."""
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    names = [row["method"] for row in summary]
    means = [row["last_top1"][0] for row in summary]
    several = all(len(row["seeds"]) > 1 for row in summary)
    errors = [row["last_top1"][1] for row in summary] if several else None
    bars = axis.bar(names, means, yerr=errors, capsize=4 if several else 0, color="tab:blue", alpha=0.8)
    axis.bar_label(bars, fmt="%.2f", fontsize=8)
    axis.set_ylim(0, min(100.0, max(means) * 1.1 + 1.0))
    seeds = len(summary[0]["seeds"]) if summary else 0
    spread = "mean +- std over seeds" if several else f"{seeds} seed{'s' if seeds != 1 else ''}, no spread shown"
    axis.set_ylabel(f"last-epoch top-1 (%), {spread}")
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return figure
