"""Detection benchmarks on the Fashion-MNIST mosaics: methods side by side over paired seeds, honest tables.

    unikd detect bench mosaics-cpu --out bench_out/mosaics-cpu          # baseline, KD, DKD, NKD; ~1 h on 2 cores
    unikd detect bench mosaics-uskd-backbone --out bench_out/uskd       # paper Table 7's question on CPU
    unikd detect bench mosaics-smoke --out /tmp/smoke --threads 1       # the whole pipeline in a few minutes

A profile makes the mosaics (``OUT/data``, cached by their parameters), pretrains the backbones it needs as
Fashion-MNIST classifiers with the classification engine (``OUT/backbones/<name>``, as ImageNet pretraining is to
COCO), trains the teacher detector once (``OUT/teacher``), then every (variant, seed) student
(``OUT/runs/<variant>-s<seed>``). A finished run with the same config is not redone and an interrupted one resumes,
so a killed bench continues where it stopped. Seeds are paired: the same seed gives every variant the same student
initialisation (the same pretrained backbone and seeded heads), data order and flips, so the per-seed AP difference
to the first variant (the reference) cancels most of the seed-to-seed noise; the table gives it next to the mean +-
std. For profiles with a teacher, the step-time overhead of each distillation term is measured side by side in this
process: every variant's training step (forward, backward, SGD) on the same batches, interleaved, median of the
timed steps, as a ratio to the reference step (the ratio includes the teacher's forward pass, the bulk of it).

Outputs: ``results.json`` (every run's evaluations, the summary, the overhead), ``results.md`` (the table),
``curves.png`` (validation box AP over training steps) and ``bars.png`` (final box AP from 0, +- std over seeds).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from unikd._errors import UnikdError
from unikd.bench import (
    bar_chart,
    curves_chart,
    lookup_profile,
    mean_std,
    plus_minus,
    reuse_or_train,
    run_config,
    run_training,
)

__all__ = ["PROFILES", "DetectionProfile", "Variant", "measure_step_overhead", "run_detection_bench"]

_SMALL_RESNET18 = {"channels": [16, 32, 64, 128], "stem_width": 16}
_WIDE_RESNET18 = {"channels": [32, 64, 128, 256], "stem_width": 32}


def _classifier(width: dict, *extra: str) -> tuple[str, ...]:
    """Overrides of configs/fmnist_*.yaml that make its student the timm ResNet-18 of a detection backbone."""
    kwargs = ", ".join(f"{key}: {value}" for key, value in width.items())
    return ("model.student=timm/resnet18", f"model.student_kwargs={{{kwargs}}}", "train.progress=false", *extra)


@dataclass(frozen=True)
class Variant:
    """One column of the comparison: the student's method section and which pretrained backbone it starts from."""

    method: dict
    backbone: str  # a key of DetectionProfile.backbones


@dataclass(frozen=True)
class DetectionProfile:
    """A detection benchmark. The first variant is the reference of the paired differences and step-time ratios.

    ``backbones`` maps a name to (classification config, overrides) trained once on Fashion-MNIST; ``overrides`` go
    to every detection run (teacher included), ``teacher_overrides`` to the teacher only.
    """

    description: str
    mosaics: dict
    backbones: dict[str, tuple[str, tuple[str, ...]]]
    student_config: str
    variants: dict[str, Variant]
    seeds: tuple[int, ...]
    overrides: tuple[str, ...] = ()
    teacher_config: str | None = None
    teacher_backbone: str | None = None
    teacher_overrides: tuple[str, ...] = ()
    overhead_steps: int = 0  # timed training steps per variant (0: no overhead measurement)
    extra: dict = field(default_factory=dict)

    @property
    def reference(self) -> str:
        return next(iter(self.variants))


_KD_VARIANTS = {
    "baseline": Variant({"name": "baseline"}, "student"),
    "kd": Variant({"name": "kd", "temperature": 1.0}, "student"),
    "dkd": Variant({"name": "dkd", "temperature": 1.0, "alpha": 1.0, "beta": 0.25}, "student"),
    "nkd": Variant({"name": "nkd", "temperature": 1.0, "gamma": 1.5}, "student"),
}
_BACKBONES = {
    "student": ("configs/fmnist_baseline.yaml", _classifier(_SMALL_RESNET18, "train.epochs=1")),
    "teacher": ("configs/fmnist_baseline.yaml", _classifier(_WIDE_RESNET18, "train.epochs=1")),
}

PROFILES: dict[str, DetectionProfile] = {
    "mosaics-cpu": DetectionProfile(
        description="Fashion-MNIST mosaics (4000 train / 500 val canvases of 128 px), Faster R-CNN: a ResNet-18-FPN "
        "of widths 16-128 student (400 steps of 4 images, the 1x shape) distilled from a widths 32-256 teacher "
        "(800 steps, the 2x shape), both on backbones pretrained 1 epoch on Fashion-MNIST; baseline, KD, DKD, NKD "
        "over 3 paired seeds. Sized for about an hour on 2 CPU cores.",
        mosaics={"num_train": 4000, "num_val": 500},
        backbones=_BACKBONES,
        student_config="configs/detection/mosaics_student.yaml",
        variants=_KD_VARIANTS,
        seeds=(0, 1, 2),
        overrides=("train.progress=false",),
        teacher_config="configs/detection/mosaics_teacher.yaml",
        teacher_backbone="teacher",
        overhead_steps=20,
    ),
    "mosaics-smoke": DetectionProfile(
        description="The mosaics-cpu pipeline at toy size (200 / 50 canvases, backbones pretrained on 2000 images, "
        "20-step students, a 40-step teacher, 2 seeds): checks the bench end to end in a few minutes; its numbers "
        "mean nothing.",
        mosaics={"num_train": 200, "num_val": 50},
        backbones={
            name: (config, (*overrides, "data.train_subset=2000", "data.val_subset=500"))
            for name, (config, overrides) in _BACKBONES.items()
        },
        student_config="configs/detection/mosaics_student.yaml",
        variants=_KD_VARIANTS,
        seeds=(0, 1),
        overrides=(
            "train.progress=false",
            "schedule.length=20",
            "schedule.milestones=[15]",
            "schedule.warmup_iters=5",
            "train.eval_every=10",
        ),
        teacher_config="configs/detection/mosaics_teacher.yaml",
        teacher_backbone="teacher",
        teacher_overrides=("schedule.length=40", "schedule.milestones=[30]", "train.eval_every=40"),
        overhead_steps=3,
    ),
    "mosaics-uskd-backbone": DetectionProfile(
        description="Paper Table 7's question on the mosaics: Mask R-CNN (ResNet-18-FPN of widths 16-128, 400 steps "
        "of 4 images) on a backbone pretrained 2 epochs on Fashion-MNIST with plain CE vs with USKD, 3 paired seeds.",
        mosaics={"num_train": 4000, "num_val": 500},
        backbones={
            "plain": ("configs/fmnist_baseline.yaml", _classifier(_SMALL_RESNET18, "train.epochs=2")),
            "uskd": ("configs/fmnist_uskd.yaml", _classifier(_SMALL_RESNET18, "train.epochs=2")),
        },
        student_config="configs/detection/mosaics_mask_rcnn.yaml",
        variants={"plain": Variant({"name": "baseline"}, "plain"), "uskd": Variant({"name": "baseline"}, "uskd")},
        seeds=(0, 1, 2),
        overrides=("train.progress=false",),
    ),
}


def run_detection_bench(
    profile_name: str,
    out_dir: str | Path,
    *,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    overrides: list[str] = (),
    threads: int | None = None,
    log=print,
    profile: DetectionProfile | None = None,
) -> dict:
    """Run (or continue) every (variant, seed) of the profile, measure the overhead, write the results.

    ``methods`` picks variants (the reference is always included); ``overrides`` go to every detection run;
    ``threads`` sets torch's intra-op threads (on a shared machine, 1 avoids OpenMP threads spin-waiting for busy
    cores, which can slow a step tenfold); ``profile`` replaces the named profile (tests). Returns the dict written
    to ``results.json``.
    """
    import torch

    from unikd.detection.mosaics import make_mosaics

    if threads is not None:
        torch.set_num_threads(threads)

    profile = profile or lookup_profile(profile_name, PROFILES, label="PROFILE")
    variants = list(methods or profile.variants)
    unknown = [name for name in variants if name not in profile.variants]
    if unknown:
        raise UnikdError(f"--methods: {unknown} not in profile {profile_name} ({', '.join(profile.variants)})")
    if profile.reference not in variants:
        variants.insert(0, profile.reference)  # every difference is to the reference of the same seed
    seeds = list(profile.seeds if seeds is None else seeds)
    out_dir = Path(out_dir)
    bench_start = time.perf_counter()

    log(f"[bench] mosaics -> {out_dir / 'data'}")
    make_mosaics(out_dir / "data", **profile.mosaics)
    common = [f"data.root={out_dir / 'data'}", *profile.overrides, *overrides]

    distils = profile.teacher_config is not None and any(
        profile.variants[name].method["name"] != "baseline" for name in variants
    )
    backbone_weights, backbone_results = {}, {}
    needed = {profile.variants[name].backbone for name in variants}
    if distils and profile.teacher_backbone:
        needed.add(profile.teacher_backbone)
    for name in sorted(needed):
        config, backbone_overrides = profile.backbones[name]
        run_dir = out_dir / "backbones" / name
        log(f"[bench] backbone {name}: {config} -> {run_dir}")
        result = run_training(config, list(backbone_overrides), run_dir)
        backbone_results[name] = {"best_top1": result["best_top1"]}
        backbone_weights[name] = run_dir / "best.pt"
        log(f"[bench] backbone {name}: Fashion-MNIST top-1 {result['best_top1']:.2f}")

    teacher_checkpoint, teacher = None, None
    if distils:
        log(f"[bench] teacher: {profile.teacher_config} -> {out_dir / 'teacher'}")
        teacher_overrides = [
            *common,
            *profile.teacher_overrides,
            f"model.student.backbone_weights={backbone_weights[profile.teacher_backbone]}",
        ]
        teacher = run_detection(profile.teacher_config, teacher_overrides, out_dir / "teacher")
        teacher_checkpoint = out_dir / "teacher" / "best.pt"
        log(f"[bench] teacher: box AP {teacher['best_bbox_AP']:.2f}")

    runs = []
    for seed in seeds:
        for name in variants:
            run_dir = out_dir / "runs" / f"{name}-s{seed}"
            log(f"[bench] {name} seed {seed} -> {run_dir}")
            result = run_detection(
                profile.student_config,
                _run_overrides(profile, name, seed, common, backbone_weights, teacher_checkpoint),
                run_dir,
                profile.variants[name].method,
            )
            log(f"[bench] {name} seed {seed}: box AP {result['last']['bbox_AP']:.2f}")
            runs.append({"variant": name, "seed": seed, **result})

    overhead = None
    if profile.overhead_steps and teacher_checkpoint is not None:
        log(f"[bench] step-time overhead: {profile.overhead_steps} timed steps per variant, interleaved")
        configs = {
            name: _detection_config(
                profile.student_config,
                _run_overrides(profile, name, seeds[0], common, backbone_weights, teacher_checkpoint),
                out_dir / "overhead",
                profile.variants[name].method,
            )
            for name in variants
        }
        overhead = measure_step_overhead(configs, profile.overhead_steps)

    summary = summarize_detection(runs, variants, overhead)
    results = {
        "profile": profile_name,
        "description": profile.description,
        "seeds": seeds,
        "summary": summary,
        "overhead": overhead,
        "teacher": None if teacher is None else {"best_bbox_AP": teacher["best_bbox_AP"], "last": teacher["last"]},
        "backbones": backbone_results,
        "threads": torch.get_num_threads(),
        "runs": runs,
        "wall_time_s": time.perf_counter() - bench_start,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "results.md").write_text(markdown_table(results) + "\n")
    plot_detection_results(runs, summary, out_dir)
    return results


def run_detection(config: str, overrides: list[str], output_dir: Path, method_section: dict | None = None) -> dict:
    """Train one detection run, unless ``output_dir`` holds it finished with the same config (then return its
    ``final.json``). An interrupted run, or a finished one asked for a longer schedule, resumes; any other config
    change is refused by the trainer's resume check with the differing keys (``unikd.bench.reuse_or_train``)."""
    from unikd.detection.config import load_detection_config
    from unikd.detection.train import train_detector

    cfg = _detection_config(config, overrides, output_dir, method_section)
    return reuse_or_train(cfg, output_dir, load_config=load_detection_config, train=train_detector)[0]


def measure_step_overhead(configs: dict, steps: int, warmup: int = 2) -> dict[str, dict]:
    """Median seconds of one training step per config (``{name: DetectionConfig}``), measured side by side.

    Every variant is built as its run builds it (same seed: same student) and trained for ``warmup + steps`` steps
    on the same batches, one variant after the other within each step, so that a slower or busier stretch of time
    affects them all alike. Returns ``{name: {"step_s", "ratio"}}``, the ratio to the first config's step.
    """
    import torch

    from unikd._optim import build_optimizer
    from unikd.detection.data import build_detection_data, collate_detection
    from unikd.detection.distill import TrainableDetector
    from unikd.detection.models import detector_from_config, load_teacher_detector

    first = next(iter(configs.values()))
    data = build_detection_data(first.data, masks=first.model.student.arch == "mask_rcnn")
    loader = torch.utils.data.DataLoader(
        data.train,
        batch_size=first.train.batch_size,
        shuffle=True,
        collate_fn=collate_detection,
        generator=torch.Generator().manual_seed(0),
    )
    batches = [batch for batch, _ in zip(loader, range(warmup + steps))]
    trainers, teacher = {}, None
    for name, cfg in configs.items():
        torch.manual_seed(cfg.train.seed)
        student = detector_from_config(cfg.model.student, data.num_classes, cfg.data)
        trainable = TrainableDetector(student, cfg.method.name, **cfg.method.params).train()
        if trainable.needs_teacher and teacher is None:
            teacher = load_teacher_detector(cfg.model.teacher, data.categories, cfg.data)
        trainers[name] = (trainable, build_optimizer(trainable, cfg.optim))
    times: dict[str, list[float]] = {name: [] for name in configs}
    for index, (images, targets) in enumerate(batches):
        for name, (trainable, optimizer) in trainers.items():
            start = time.perf_counter()
            loss = sum(trainable(images, targets, teacher if trainable.needs_teacher else None).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if index >= warmup:
                times[name].append(time.perf_counter() - start)
    reference = statistics.median(times[next(iter(configs))])
    return {
        name: {"step_s": statistics.median(values), "ratio": statistics.median(values) / reference}
        for name, values in times.items()
    }


def summarize_detection(runs: list[dict], variants: list[str], overhead: dict | None = None) -> list[dict]:
    """One row per variant: last-evaluation box AP / AP50 / AR (and mask AP) mean and std over seeds, the paired AP
    difference to the reference variant, training time and the step-time ratio."""
    reference = {run["seed"]: run for run in runs if run["variant"] == variants[0]}
    rows = []
    for name in variants:
        variant_runs = sorted((run for run in runs if run["variant"] == name), key=lambda run: run["seed"])
        if not variant_runs:
            continue
        row = {"variant": name, "seeds": [run["seed"] for run in variant_runs]}
        for metric in ("bbox_AP", "bbox_AP50", "bbox_AR", "segm_AP", "segm_AR"):
            if metric in variant_runs[0]["last"]:
                row[metric] = mean_std([run["last"][metric] for run in variant_runs])
        deltas = [run["last"]["bbox_AP"] - reference[run["seed"]]["last"]["bbox_AP"] for run in variant_runs]
        row["delta_bbox_AP"], row["deltas"] = mean_std(deltas), deltas
        row["train_time_s"] = statistics.fmean(run["train_time_s"] for run in variant_runs)
        if overhead is not None and name in overhead:
            row["step_s"], row["step_ratio"] = overhead[name]["step_s"], overhead[name]["ratio"]
        rows.append(row)
    return rows


def markdown_table(results: dict) -> str:
    summary = results["summary"]
    has_masks = "segm_AP" in summary[0]
    reference = summary[0]["variant"]
    lines = [
        f"Profile `{results['profile']}`, seeds {results['seeds']}: COCO box AP / AP50 / AR (AR@100) in %, of the "
        f"last evaluation, mean +- std over seeds; delta: per-seed box AP difference to `{reference}` of the same "
        "seed (paired), mean +- std. Train time: seconds of training steps per run (mean). Step ratio: median step "
        f"time over `{reference}`'s, measured side by side in one process.",
    ]
    if results.get("teacher"):
        lines.append(f"Teacher box AP {results['teacher']['best_bbox_AP']:.2f}.")
    header = ["variant", "box AP", "AP50", "AR", *(["mask AP"] if has_masks else []), "delta box AP (paired)"]
    header += ["train time s", "step ms", "step ratio"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary:
        cells = [row["variant"], *(plus_minus(row[key]) for key in ("bbox_AP", "bbox_AP50", "bbox_AR"))]
        if has_masks:
            cells.append(plus_minus(row["segm_AP"]))
        cells.append(plus_minus(row["delta_bbox_AP"], signed=True))
        cells.append(f"{row['train_time_s']:.0f}")
        cells += [f"{1000 * row['step_s']:.0f}", f"{row['step_ratio']:.2f}"] if "step_s" in row else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_detection_results(runs: list[dict], summary: list[dict], out_dir: Path) -> None:
    """``curves.png``: mean validation box AP per evaluation step (band: min-max over seeds); ``bars.png``: final
    box AP per variant (axis from 0; +- std only over several seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = []
    for row in summary:
        histories = [run["history"] for run in runs if run["variant"] == row["variant"]]
        curves = [[record["bbox_AP"] for record in history] for history in histories]
        lines.append((row["variant"], curves, [record["step"] for record in histories[0]]))
    figure = curves_chart(lines, "training step", "validation box AP (%)")
    figure.savefig(out_dir / "curves.png", dpi=100)
    plt.close(figure)

    figure = bar_chart([(row["variant"], *row["bbox_AP"], len(row["seeds"])) for row in summary], "final box AP (%)")
    figure.savefig(out_dir / "bars.png", dpi=100)
    plt.close(figure)


# ---- helpers ----------------------------------------------------------------------------------------------------


def _run_overrides(
    profile: DetectionProfile, name: str, seed: int, common: list[str], backbones: dict, teacher_checkpoint
) -> list[str]:
    overrides = [
        *common,
        f"train.seed={seed}",
        f"model.student.backbone_weights={backbones[profile.variants[name].backbone]}",
    ]
    if profile.variants[name].method["name"] != "baseline":
        overrides.append(f"model.teacher.checkpoint={teacher_checkpoint}")
    return overrides


def _detection_config(config: str, overrides: list[str], output_dir: Path, method_section: dict | None):
    from unikd.detection.config import detection_config_from_dict

    return run_config(config, overrides, output_dir, method_section, from_dict=detection_config_from_dict)
