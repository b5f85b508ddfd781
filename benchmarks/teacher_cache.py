"""What the teacher-logit cache (``train.teacher_cache``) saves, measured side by side in one run on the CPU.

(a) Epoch time of KD with a warm cache and with the live teacher, each over the baseline's (plain CE), through the
    real trainer (data pipeline, student step, teacher or cache read; evaluation is not timed). Two setups: the
    fmnist-cpu profile (Fashion-MNIST, cifar/smallcnn student, cifar/resnet20 teacher) and a CIFAR-shaped step on
    FakeData (3x32x32, 100 classes, cifar/resnet8x4 student, cifar/resnet32x4 teacher). A cold cached KD run fills the
    cache first (untimed); then rounds of one 1-epoch run per variant, the order alternating from round to round
    (ABC, CBA, ...), so that machine noise hits every variant alike. Reported: each variant's median epoch time
    (min-max), and the median (min-max) of the per-round ratios to the baseline.
(b) ``unikd bench fmnist-cpu --methods baseline kd dkd nkd wsld --seeds 0`` with the cache (the bench's default) and
    with ``train.teacher_cache=null``, both in this process, the second reusing the first one's teacher; per-run wall
    time (from the bench's log lines: set-up, training, evaluation) and the cache's size.

Teacher weights do not change the time, so (a) uses randomly initialised teachers; (b) trains the bench's teacher.

    OMP_NUM_THREADS=1 python benchmarks/teacher_cache.py --out /tmp/cache_bench --rounds 5 \
        --bench-overrides train.epochs=1 data.train_subset=10000
    python benchmarks/teacher_cache.py --setups imagenet-fake --device cuda --amp bf16 --skip-bench   # on a GPU
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import torch

from unikd.bench import TEACHER_METHODS, run_bench
from unikd.config import load_config
from unikd.models import create_model
from unikd.train import train

FMNIST = "/usr/share/datasets/fashion-mnist"
SETUPS = {
    "fmnist": {
        "teacher": ("cifar/resnet20", 10, 1),
        "overrides": ["data.train_subset=6400", "data.val_subset=500", f"data.root={FMNIST}"],
        "describe": "Fashion-MNIST 1x28x28, cifar/smallcnn <- cifar/resnet20, batch 128",
    },
    "cifar-fake": {  # the fmnist configs' method sections (KD T=4); the data and models overridden
        "teacher": ("cifar/resnet32x4", 100, 3),
        "overrides": [
            *("data.name=fake", "data.num_classes=100", "data.img_size=32", "data.train_subset=640"),
            *("data.val_subset=100", "model.student=cifar/resnet8x4", "train.batch_size=64"),
        ],
        "describe": "FakeData 3x32x32, 100 classes, cifar/resnet8x4 <- cifar/resnet32x4, batch 64",
    },
    "imagenet-fake": {  # the ResNet-34 -> ResNet-18 at 224 (a GPU measurement: --device cuda --amp bf16)
        "teacher": ("tv/resnet34", 1000, 3),
        "overrides": [
            *("data.name=fake", "data.num_classes=1000", "data.img_size=224", "data.train_subset=5120"),
            *("data.val_subset=256", "model.student=tv/resnet18", "train.batch_size=256", "data.num_workers=8"),
        ],
        "describe": "FakeData 3x224x224, 1000 classes, tv/resnet18 <- tv/resnet34, batch 256",
    },
}
CONFIGS = {"baseline": "configs/fmnist_baseline.yaml", "kd": "configs/fmnist_kd.yaml"}
COMMON = ["train.epochs=1", "train.progress=false", "train.tensorboard=false", "data.num_workers=0"]


def load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def one_run(config: str, overrides: list[str], output_dir: Path) -> tuple[float, dict]:
    shutil.rmtree(output_dir, ignore_errors=True)
    result = train(load_config(config, [*overrides, f"output_dir={output_dir}"]))
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    cache = [record for record in records if record["split"] == "teacher_cache"]
    return result["history"][0]["epoch_time_s"], {"cache": cache}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def measure_setup(name: str, out: Path, rounds: int, device: list[str]) -> dict:
    setup = SETUPS[name]
    teacher_name, classes, channels = setup["teacher"]
    out.mkdir(parents=True, exist_ok=True)
    teacher_file = out / f"{name}-teacher.pt"
    torch.manual_seed(0)
    torch.save(create_model(teacher_name, classes, in_chans=channels).state_dict(), teacher_file)
    base = [*COMMON, *setup["overrides"], *device]
    teacher = [f"model.teacher={teacher_name}", f"model.teacher_checkpoint={teacher_file}"]
    cache = out / f"{name}-cache"
    shutil.rmtree(cache, ignore_errors=True)
    variants = {
        "baseline": (CONFIGS["baseline"], base),
        "kd live teacher": (CONFIGS["kd"], [*base, *teacher]),
        "kd warm cache": (CONFIGS["kd"], [*base, *teacher, f"train.teacher_cache={cache}"]),
    }
    cold_time, cold = one_run(*variants["kd warm cache"], out / "run")  # fills the cache
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    for round_index in range(rounds):
        order = list(variants) if round_index % 2 == 0 else list(reversed(variants))
        for variant in order:
            seconds, info = one_run(*variants[variant], out / "run")
            if variant == "kd warm cache":
                assert all(record.get("misses", 0) == 0 for record in info["cache"]), info
            times[variant].append(seconds)
    ratios = {
        variant: spread([t / b for t, b in zip(times[variant], times["baseline"], strict=True)])
        for variant in variants
        if variant != "baseline"
    }
    return {
        "setup": setup["describe"],
        "epoch_time_s": {variant: spread(values) for variant, values in times.items()},
        "ratio_to_baseline": ratios,
        "cold_cache_epoch_time_s": cold_time,
        "cache_mb_per_epoch": cold["cache"][0]["epoch_mb"],
    }


def measure_bench(out: Path, overrides: list[str]) -> dict:
    methods = ["baseline", *TEACHER_METHODS]
    report = {}
    for label, extra in (("cache", []), ("no cache", ["train.teacher_cache=null"])):
        folder = out / f"bench-{label.replace(' ', '-')}"
        shutil.rmtree(folder, ignore_errors=True)
        if label == "no cache":  # the same teacher: the bench reuses a finished teacher run with the same config
            shutil.copytree(out / "bench-cache" / "teacher", folder / "teacher")
        marks: list[tuple[float, str]] = []

        def mark(message: str, marks: list = marks) -> None:
            marks.append((time.perf_counter(), message))

        start = time.perf_counter()
        results = run_bench("fmnist-cpu", folder, methods=methods, seeds=[0], overrides=[*overrides, *extra], log=mark)
        total = time.perf_counter() - start
        walls, teacher_s = {}, None
        for (begin, message), (end, _) in itertools.pairwise(marks):
            if message.startswith("[bench] teacher:"):
                teacher_s = end - begin
            elif " seed 0 -> " in message:
                walls[message.removeprefix("[bench] ").split(" seed 0 -> ")[0]] = end - begin
        cache_bytes = sum(path.stat().st_size for path in (folder / "teacher_cache").rglob("*.rec"))
        report[label] = {
            "total_s": total,
            "teacher_training_s": teacher_s,
            "run_wall_s": walls,
            "teacher_methods_s": sum(walls[method] for method in TEACHER_METHODS),
            "epoch_time_s": {run["method"]: [e["epoch_time_s"] for e in run["history"]] for run in results["runs"]},
            "teacher_cache": {run["method"]: run.get("teacher_cache") for run in results["runs"]},
            "cache_mb": cache_bytes / 1e6,
        }
    baseline = report["cache"]["run_wall_s"]["baseline"]
    teacher_pass = report["cache"]["run_wall_s"]["kd"] - baseline  # what the paying run cost over the baseline
    report["summary"] = {
        "baseline_s": baseline,
        "teacher_pass_s": teacher_pass,
        "teacher_methods_with_cache_over_baseline": report["cache"]["teacher_methods_s"] / baseline,
        "teacher_methods_without_cache_over_baseline": report["no cache"]["teacher_methods_s"] / baseline,
        "goal_4_baselines_plus_one_pass_s": 4 * baseline + teacher_pass,
    }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/unikd_teacher_cache_bench"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--setups", default="fmnist,cifar-fake", help=f"comma-separated, from: {', '.join(SETUPS)}")
    parser.add_argument("--bench-overrides", nargs="*", default=["train.epochs=1", "data.train_subset=10000"])
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--device", default="cpu", help="train.device of (a): cpu or cuda")
    parser.add_argument("--amp", default="none", help="train.amp of (a): none, bf16 or fp16")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"threads": torch.get_num_threads(), "cores": os.cpu_count(), "load_before": os.getloadavg()}
    report["epoch"] = {}
    for name in args.setups.split(","):
        device = [f"train.device={args.device}", f"train.amp={args.amp}"]
        report["epoch"][name] = result = measure_setup(name, args.out / "epoch", args.rounds, device)
        print(
            f"\n(a) {name}: {result['setup']}; {args.rounds} rounds; cache {result['cache_mb_per_epoch']:.2f} MB/epoch"
        )
        for variant, times in result["epoch_time_s"].items():
            line = f"  {variant:16s} epoch {times['median']:7.2f} s (min {times['min']:.2f}, max {times['max']:.2f})"
            if variant in result["ratio_to_baseline"]:
                ratio = result["ratio_to_baseline"][variant]
                line += f"   x{ratio['median']:.3f} the baseline (min {ratio['min']:.3f}, max {ratio['max']:.3f})"
            print(line, flush=True)
        print(f"  kd cold cache (fills it, once): {result['cold_cache_epoch_time_s']:.2f} s")
    report["load_after_epochs"] = os.getloadavg()
    if not args.skip_bench:
        report["bench"] = bench = measure_bench(args.out / "bench", args.bench_overrides)
        command = "unikd bench fmnist-cpu --methods baseline kd dkd nkd wsld --seeds 0"
        print(f"\n(b) {command} {' '.join(args.bench_overrides)}")
        for label in ("cache", "no cache"):
            walls = ", ".join(f"{method} {seconds:.1f}" for method, seconds in bench[label]["run_wall_s"].items())
            print(f"  {label:8s}: runs (s) {walls}; teacher methods {bench[label]['teacher_methods_s']:.1f} s; "
                  f"cache {bench[label]['cache_mb']:.1f} MB")  # fmt: skip
        summary = bench["summary"]
        print(f"  teacher methods / baseline: {summary['teacher_methods_with_cache_over_baseline']:.2f} with the cache "
              f"(goal 4 + pass/baseline = {summary['goal_4_baselines_plus_one_pass_s'] / summary['baseline_s']:.2f}), "
              f"{summary['teacher_methods_without_cache_over_baseline']:.2f} without")  # fmt: skip
    report["load_after"] = os.getloadavg()
    print(f"\nload average before {report['load_before']}, after {report['load_after']}")
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
