"""Side-by-side benchmarks: several methods, one profile, N paired seeds, honest tables; and sweeps.

    unikd bench fmnist-cpu --out bench_out/fmnist-cpu            # trains, resumes, tabulates
    unikd bench fmnist-cpu --out DIR --methods baseline uskd --seeds 0 1
    unikd bench fmnist-table9-rank --out DIR                       # labelled variants: uskd[rank=weak], ...
    unikd bench fmnist-sweep-alpha --out DIR                       # the profile's own --grid
    unikd bench fmnist-cpu --out DIR --methods uskd --grid method.alpha=0.05,0.1,0.2 --grid method.beta=0.1,0.2

A profile names a config per column, the seeds, and overrides shared by every run (epochs, subset sizes). A column
is a method (``uskd``: its config as it is) or a labelled variant of one, ``METHOD[key=value,...]``
(``uskd[rank=weak]``: the method's config with ``method.rank=weak``); ``--methods`` takes the profile's columns and
variants of its methods. Teacher methods get the profile's teacher, trained once into ``OUT/teacher`` and reused.
Their teacher logits go through the teacher-logit cache ``OUT/teacher_cache`` (``train.teacher_cache``; exact,
float32): the first teacher run of a seed computes them, every other teacher method and grid point of that seed (and
a resumed bench) reads them, so the teacher's forward pass is paid once per seed; ``train.teacher_cache=null`` turns
it off. The results say which run paid it.
Each run lives in ``OUT/runs/<column>-s<seed>`` (the column's name with ``[``, ``=``, ``]`` and spaces turned into
``_``): a finished run (``final.json``) with the same config is not redone, an interrupted one (``last.pt``)
resumes, so a killed bench continues where it stopped; a finished run asked for more epochs continues to them, and
one asked for a different config is refused (``unikd train --resume`` rules). Every run's config is built and
validated before the first one trains, so a typo fails in a second, not after an hour.
Seeds are paired: the same seed gives every method the same student initialisation and data order, so the per-seed
difference to the baseline cancels most of the seed-to-seed noise; the table reports it next to the plain mean +- std.

Sweeps: ``--grid KEY=V1,V2,...`` (any config key; values as in ``key=value`` overrides, split at top-level commas so
``[30,60]`` stays one value; several ``--grid`` give the product) trains every column at every grid point over the
seeds. A ``method.*`` key applies to every column except the baseline, which has no such key and is trained once
per seed as the reference; any other key (``optim.lr``, ``train.epochs``) applies to the baseline too, so that each
point is compared with the baseline trained the same way. The teacher is never swept: one teacher serves every point.
A grid point's run is ``OUT/runs/<column>_<key>_<value>...-s<seed>``, reused or resumed like any other run. A profile
may bring its own grid (the sweep profiles); ``--grid`` replaces it.

Outputs: ``results.json`` (every run's history and the summary), ``results.md`` (the table), ``curves.png``
(validation top-1 per epoch) and ``bars.png`` (final top-1 from 0, with +- std error bars when there are several
seeds); with a grid, ``sweep.png`` instead of ``bars.png``: last-epoch top-1 against the first grid key's values,
one line per column (and per value of the other keys), +- std error bars over seeds, and the baseline as a
horizontal reference line (band: +- std) when it is not swept. Epoch times are wall-clock: the table gives the
machine's load average during the runs and says when it was busy, when the time ratios are not a speed
measurement. Peak memory is shown for CUDA runs only (CUDA's peak allocation, reset per epoch); on the CPU the only
figure is the process's peak RSS, which covers every run the process made before, so it is not shown. Under
torchrun every rank trains (each run is one DDP job) and rank 0 writes the bench's files.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import statistics
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from unikd._errors import UnikdError

SELF_KD_METHODS = ("baseline", "ls", "tfkd", "zipf_ls", "uskd")
TEACHER_METHODS = ("kd", "dkd", "nkd", "wsld")
_COLUMN = re.compile(r"(?P<method>\w+)(?:\[(?P<params>.*)\])?")
T = TypeVar("T")
# Keys whose change leaves a finished run's result as it is (the exact cache gives the live teacher's logits): a run
# finished before the bench used the teacher cache is reused, not resumed.
_SAME_RESULT_KEYS = ("train.teacher_cache", "train.teacher_cache_verify")
_BENCH_KEYS = {"train.seed": "the bench sets it from --seeds", "output_dir": "the bench names every run's folder"}


@dataclass(frozen=True)
class Profile:
    """A benchmark: which config trains each column, the seeds, and the overrides every run shares.

    ``configs`` maps a column to its config file; a column is a method name or a labelled variant
    ``METHOD[key=value,...]`` (see ``parse_column``). ``method_sections`` optionally replaces a config's whole
    ``method`` section for a column (or, for a variant without its own entry, for its method), so that one protocol
    config (say a CIFAR-100 teacher-student pair) serves every method. ``grid``: the ``--grid`` specs the profile runs
    when none are given (``"method.alpha=0.6,0.8,1.0"``).
    """

    description: str
    configs: dict[str, str]
    seeds: tuple[int, ...]
    overrides: tuple[str, ...] = ()
    method_sections: dict[str, dict] = field(default_factory=dict)
    teacher_config: str | None = None
    teacher_overrides: tuple[str, ...] = ()
    grid: tuple[str, ...] = ()

    @property
    def methods(self) -> tuple[str, ...]:
        """The columns, in table order."""
        return tuple(self.configs)


def _per_method_configs(prefix: str, methods: tuple[str, ...]) -> dict[str, str]:
    return {method: f"configs/{prefix}_{method}.yaml" for method in methods}


# Released/paper hyper-parameters of the CIFAR-100 KD baselines (CRD/DKD protocol, as in mdistiller). WSLD: temperature
# 4 and weight 2.25, the paper authors' CIFAR-100 setting (yzd-v/cls_KD configs/distillers/cifar100/
# res34_distill_res18_cifar.py); mdistiller has no WSLD.
_CIFAR_KD_SECTIONS = {
    "baseline": {"name": "baseline"},
    "kd": {"name": "kd", "temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9},
    "dkd": {"name": "dkd", "temperature": 4.0, "alpha": 1.0, "beta": 8.0, "warmup": 20.0},
    "wsld": {"name": "wsld", "temperature": 4.0, "alpha": 2.25},
}
# The fmnist-cpu sizes: each run trains 4 epochs on a fixed 20k-image subset; the teacher 3 epochs on all 60k images.
_FMNIST_CPU = ("train.epochs=4", "data.train_subset=20000", "train.progress=false", "data.num_workers=0")
_FMNIST_TEACHER = {
    "teacher_config": "configs/fmnist_teacher.yaml",
    "teacher_overrides": ("train.epochs=3", "data.train_subset=null"),
}
# Figures 4-6 sweep USKD's alpha, beta and mu on ImageNet. The grid is the alpha grid (0.6-1.4 around the
# released 1.0) as steps relative to each released value; the paper's exact points are not in the sources here.
_RELATIVE_STEPS = (0.6, 0.8, 1.0, 1.2, 1.4)
_USKD_FIGURES = {"fig4-alpha": ("alpha", 1.0), "fig5-beta": ("beta", 0.1), "fig6-mu": ("mu", 0.005)}
_IMAGENET_USKD = {
    "resnet18": "configs/imagenet_selfkd_resnet18.yaml",
    "regnetx016": "configs/imagenet_selfkd_regnetx_016.yaml",
}


def _relative_grid(key: str, released: float) -> str:
    return f"method.{key}=" + ",".join(f"{round(step * released, 10):g}" for step in _RELATIVE_STEPS)


PROFILES: dict[str, Profile] = {
    "fmnist-cpu": Profile(
        description="Fashion-MNIST, cifar/smallcnn student, cifar/resnet20 teacher (3 epochs on the full training "
        "set); sized for about an hour on 2 CPU cores: each run trains 4 epochs on a fixed 20k-image subset.",
        configs=_per_method_configs("fmnist", SELF_KD_METHODS + TEACHER_METHODS),
        seeds=(0, 1, 2),
        overrides=_FMNIST_CPU,
        **_FMNIST_TEACHER,
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
    # The rows of configs/paper/table09_rank.yaml and table05_nkd_terms.yaml (their method overrides; a test checks
    # that they agree) on the fmnist-cpu sizes.
    "fmnist-table9-rank": Profile(
        description="Paper Table 9 on Fashion-MNIST: how USKD ranks the non-target classes (weak logit, final "
        "logit, their sum, Eq. 10; and the released code's rank), cifar/smallcnn with the fmnist USKD settings, "
        "4 epochs on a fixed 20k-image subset, 3 paired seeds.",
        configs={
            "baseline": "configs/fmnist_baseline.yaml",
            **{
                f"uskd[rank={rank}]": "configs/fmnist_uskd.yaml"
                for rank in ("weak", "final", "sum", "paper", "released")
            },
        },
        seeds=(0, 1, 2),
        overrides=_FMNIST_CPU,
    ),
    "fmnist-table5-nkd": Profile(
        description="Paper Table 5 on Fashion-MNIST: NKD's target term alone, plus KD's un-normalised non-target "
        "term, plus NKD's normalised one (NKD), cifar/smallcnn student of the fmnist-cpu cifar/resnet20 teacher, "
        "4 epochs on a fixed 20k-image subset, 3 paired seeds.",
        configs={
            "baseline": "configs/fmnist_baseline.yaml",
            **{f"nkd[non_target_loss={term}]": "configs/fmnist_nkd.yaml" for term in ("none", "kd", "normalized")},
        },
        seeds=(0, 1, 2),
        overrides=_FMNIST_CPU,
        **_FMNIST_TEACHER,
    ),
    "fmnist-sweep-alpha": Profile(
        description="A CPU-sized sweep of USKD's alpha (the weight of its target term, paper Fig. 4) on "
        "Fashion-MNIST: cifar/smallcnn, 6 epochs on a fixed 20k-image subset, 5 points from 0.025 to 0.4 around "
        "the fmnist setting 0.1; about 15 minutes per seed on 2 CPU cores.",
        configs=_per_method_configs("fmnist", ("baseline", "uskd")),
        seeds=(0, 1, 2),
        overrides=("train.epochs=6", "data.train_subset=20000", "train.progress=false", "data.num_workers=0"),
        grid=("method.alpha=0.025,0.05,0.1,0.2,0.4",),
    ),
    "cifar100-kd": Profile(
        description="CIFAR-100, paper Table 1 pair ResNet32x4 -> ResNet8x4, CRD/DKD protocol (240 epochs, 3 seeds); "
        "KD, DKD, WSLD and NKD from one teacher trained by configs/cifar100_teacher_resnet32x4.yaml. Needs "
        "CIFAR-100.",
        configs={m: "configs/cifar100_kd_resnet32x4_resnet8x4.yaml" for m in ("baseline", *TEACHER_METHODS)},
        method_sections=_CIFAR_KD_SECTIONS,
        seeds=(0, 1, 2),
        overrides=("train.progress=false",),
        teacher_config="configs/cifar100_teacher_resnet32x4.yaml",
    ),
    "cifar100-table10-temperature": Profile(
        description="Paper Table 10 as a sweep: NKD's temperature 1-4 on CIFAR-100, ResNet34 -> ResNet18 "
        "(the released recipe, 200 epochs; configs/paper/table10_nkd_temperature.yaml has the same rows), one "
        "teacher trained by configs/cifar100_teacher_resnet34.yaml, 3 seeds. Needs CIFAR-100.",
        configs={m: "configs/cifar100_kd_resnet34_resnet18.yaml" for m in ("baseline", "nkd")},
        method_sections={"baseline": {"name": "baseline"}},
        seeds=(0, 1, 2),
        overrides=("train.progress=false",),
        teacher_config="configs/cifar100_teacher_resnet34.yaml",
        grid=("method.temperature=1,2,3,4",),
    ),
    "cifar100-selfkd": Profile(
        description="CIFAR-100, paper Table 2 self-KD with ResNet18 (200 epochs, 3 seeds). Needs CIFAR-100.",
        configs={m: "configs/cifar100_selfkd_resnet18.yaml" for m in SELF_KD_METHODS},
        method_sections={m: {"name": m} for m in SELF_KD_METHODS if m != "uskd"},
        seeds=(0, 1, 2),
        overrides=("train.progress=false",),
    ),
    **{
        f"imagenet-{figure}-{model}": Profile(
            description=f"Paper Fig. {figure[3]}: USKD's {key} on ImageNet {model} ({config}; 100 epochs, 8 GPUs "
            "with torchrun), 5 points from 0.6 to 1.4 times the released value, one seed; the baseline trained once "
            "as the reference line. Needs ImageNet (data.root).",
            configs={"baseline": config, "uskd": config},
            method_sections={"baseline": {"name": "baseline"}},
            seeds=(0,),
            overrides=("train.progress=false",),
            grid=(_relative_grid(key, released),),
        )
        for figure, (key, released) in _USKD_FIGURES.items()
        for model, config in _IMAGENET_USKD.items()
    },
}


def parse_column(column: str) -> tuple[str, list[str]]:
    """``"uskd[rank=weak,alpha=0.2]"`` -> ``("uskd", ["method.rank=weak", "method.alpha=0.2"])``; ``"uskd"`` ->
    ``("uskd", [])``. The keys are the method's own (no dots); the values are parsed as in overrides."""
    found = _COLUMN.fullmatch(column)
    params = [] if found is None or found["params"] is None else split_values(found["params"])
    if found is None or any(not re.fullmatch(r"\w+=.+", param) for param in params) or found["params"] == "":
        raise UnikdError(
            f"method column {column!r}: expected METHOD or METHOD[key=value,...], e.g. uskd or uskd[rank=weak]"
        )
    return found["method"], [f"method.{param}" for param in params]


def split_values(text: str) -> list[str]:
    """Split ``text`` at the commas outside brackets and braces: ``"0.1,[30,60],x"`` -> ``["0.1", "[30,60]", "x"]``."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += (char in "[{(") - (char in "]})")
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return [*parts, current.strip()]


def parse_grid(specs: list[str] | tuple[str, ...]) -> dict[str, list[str]]:
    """``["method.alpha=0.6,0.8", "optim.lr=0.1,0.2"]`` -> ``{"method.alpha": ["0.6", "0.8"], "optim.lr": [...]}``."""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, text = spec.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"\w+(\.\w+)*", key):
            raise UnikdError(f"--grid {spec}: expected KEY=V1,V2,... e.g. method.alpha=0.6,0.8,1.0")
        if key in _BENCH_KEYS:
            raise UnikdError(f"--grid {key}: not a key to sweep: {_BENCH_KEYS[key]}")
        if key in grid:
            raise UnikdError(f"--grid {key}: given twice; put all its values in one --grid {key}=V1,V2,...")
        values = split_values(text)
        if any(not value for value in values):
            raise UnikdError(f"--grid {spec}: an empty value; expected KEY=V1,V2,... e.g. {key}=0.6,0.8,1.0")
        repeated = sorted({value for value in values if values.count(value) > 1})
        if repeated:
            raise UnikdError(f"--grid {spec}: {', '.join(repeated)} given twice")
        grid[key] = values
    return grid


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_")


def _override_key(override: str) -> str:
    return override.partition("=")[0].strip()


@dataclass(frozen=True)
class _Run:
    """One (row, seed) of the bench: the table row it belongs to and everything ``run_training`` needs."""

    row: str  # the column plus the grid point that applies to it: "uskd method.alpha=0.6"
    column: str
    point: dict[str, str]
    seed: int
    config: str
    overrides: list[str]
    method_section: dict | None
    output_dir: Path


def _columns(profile: Profile, profile_name: str, methods: list[str] | None) -> list[str]:
    """The columns to run, baseline first: the profile's, or ``methods`` (its columns and variants of its methods)."""
    columns = list(dict.fromkeys(methods or profile.methods))
    unknown = [c for c in columns if c not in profile.configs and parse_column(c)[0] not in profile.configs]
    if unknown:
        raise UnikdError(
            f"--methods: {unknown} not in profile {profile_name} ({', '.join(profile.methods)}); a variant of one "
            "of its methods is METHOD[key=value,...], e.g. uskd[rank=weak]"
        )
    if "baseline" not in columns:
        columns.insert(0, "baseline")  # every delta is to the baseline of the same seed
    return columns


def _plan(
    profile: Profile,
    columns: list[str],
    grid: dict[str, list[str]],
    seeds: list[int],
    overrides: list[str],
    out_dir: Path,
) -> list[_Run]:
    """Every (row, seed) run in training order (seed by seed, so that a partial bench has whole seeds), checked for
    overrides that the columns or the grid would silently contradict."""
    user_keys = {_override_key(override): override for override in overrides}
    for key in grid:
        if key in user_keys:
            raise UnikdError(f"{user_keys[key]}: {key} is also a --grid key; give it in one place")
    runs, folders = [], {}
    for seed in seeds:
        for column in columns:
            method, variant = parse_column(column)
            variant_keys = [_override_key(override) for override in variant]
            for key in variant_keys:
                if key in grid:
                    raise UnikdError(f"--grid {key}: column {column} sets {key} itself")
                if key in user_keys:
                    raise UnikdError(f"{user_keys[key]}: column {column} sets {key} itself; drop one of them")
            # A method.* key is the method's: the baseline has none, so it is trained once per seed as the reference.
            keys = [key for key in grid if not (method == "baseline" and key.startswith("method."))]
            for values in itertools.product(*(grid[key] for key in keys)):
                point = dict(zip(keys, values))
                row = " ".join([column, *(f"{key}={value}" for key, value in point.items())])
                run_overrides = [*profile.overrides, f"train.seed={seed}"]
                if method in TEACHER_METHODS:
                    run_overrides.append(f"model.teacher_checkpoint={out_dir / 'teacher' / 'best.pt'}")
                    run_overrides.append(f"train.teacher_cache={out_dir / 'teacher_cache'}")  # before the user's
                run_overrides += [*variant, *(f"{key}={value}" for key, value in point.items()), *overrides]
                output_dir = out_dir / "runs" / f"{_slug(row)}-s{seed}"
                if output_dir in folders:
                    raise UnikdError(
                        f"rows {folders[output_dir]!r} and {row!r} would share the run folder {output_dir}"
                    )
                folders[output_dir] = row
                config = profile.configs.get(column, profile.configs.get(method))
                section = profile.method_sections.get(column, profile.method_sections.get(method))
                runs.append(_Run(row, column, point, seed, config, run_overrides, section, output_dir))
    return runs


def config_path(relative: str) -> Path:
    """A config shipped in the repository's ``configs/``: looked up from the working directory, then the source tree."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (base / relative).is_file():
            return base / relative
    raise UnikdError(f"config {relative} not found; run from the unikd repository root (it holds configs/)")


def run_config(
    config: str,
    overrides: list[str],
    output_dir: Path,
    method_section: dict | None,
    *,
    from_dict: Callable[..., Any],
    check_files: bool = True,
) -> Any:
    """The config of one bench run: the shipped ``config`` (``config_path``) with its ``method`` section replaced by
    ``method_section`` (if given), then ``overrides`` and ``output_dir``, built by the schema's ``from_dict``
    (``unikd.config.config_from_dict``, ``unikd.detection.config.detection_config_from_dict``)."""
    import yaml

    raw = yaml.safe_load(config_path(config).read_text()) or {}
    if method_section is not None:
        raw["method"] = dict(method_section)
    return from_dict(raw, [*overrides, f"output_dir={output_dir}"], check_files=check_files)


def reuse_or_train(
    cfg: Any, output_dir: Path, *, load_config: Callable[..., Any], train: Callable[..., dict]
) -> tuple[dict, bool]:
    """(the result of the run of ``cfg`` in ``output_dir``, whether it trained now): its ``final.json`` when it
    finished with the same config (``load_config`` reads the stored ``config.yaml``), else ``train(cfg, resume=...)``.

    An interrupted run, or a finished one asked for more (epochs, steps), resumes; any other config change is refused
    by the trainer's resume check with the list of differing keys.
    """
    from unikd.config import config_changes, config_to_dict

    final, stored = output_dir / "final.json", output_dir / "config.yaml"
    if final.is_file() and stored.is_file():
        changes = config_changes(config_to_dict(load_config(stored, check_files=False)), config_to_dict(cfg))
        same = not set(changes) - set(_SAME_RESULT_KEYS)
        if same:
            return json.loads(final.read_text()), False
    started = (output_dir / "last.pt").is_file() or (output_dir / "best.pt").is_file()
    return train(cfg, resume=started), True


def _build_config(
    config: str, overrides: list[str], output_dir: Path, method_section: dict | None, *, check_files: bool = True
):
    from unikd.config import config_from_dict

    return run_config(
        config, overrides, output_dir, method_section, from_dict=config_from_dict, check_files=check_files
    )


def run_training(config: str, overrides: list[str], output_dir: Path, method_section: dict | None = None) -> dict:
    """Train one run, unless ``output_dir`` holds it finished with the same config (then return its ``final.json``).

    An interrupted run, or a finished one asked for more epochs, resumes; a different config is refused by the
    trainer's resume check with the list of differing keys (``reuse_or_train``). A run trained now records the
    machine's load average (``load_average``).
    """
    from unikd.config import load_config
    from unikd.train import train

    cfg = _build_config(config, overrides, output_dir, method_section)
    result, trained = reuse_or_train(cfg, output_dir, load_config=load_config, train=train)
    if trained:
        result["load_average"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return result


def _check_configs(runs: list[_Run], teacher: tuple[str, list[str], Path] | None) -> str:
    """Build every run's config (files unchecked: the teacher's checkpoint is made by the bench) before any trains;
    return the first run's ``train.device``. Warnings wait for the runs themselves, which build their configs again."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _check_each_config(runs, teacher)


def _check_each_config(runs: list[_Run], teacher: tuple[str, list[str], Path] | None) -> str:
    if teacher is not None:
        try:
            _build_config(*teacher, None, check_files=False)
        except UnikdError as error:
            raise UnikdError(f"teacher ({teacher[0]}): {error}") from None
    for run in runs:
        try:
            cfg = _build_config(run.config, run.overrides, run.output_dir, run.method_section, check_files=False)
        except UnikdError as error:
            raise UnikdError(f"{run.row}, seed {run.seed} ({run.config}): {error}") from None
        method = parse_column(run.column)[0]
        if cfg.method.name != method:
            raise UnikdError(f"column {run.column}: {run.config} trains method {cfg.method.name!r}, not {method!r}")
    return cfg.train.device


def _train_runs(
    runs: list[_Run], teacher_run: tuple[str, list[str], Path] | None, device: str, log
) -> tuple[dict | None, list[dict], bool]:
    """Train the teacher (if any), then every run in order: (teacher result, run results, whether this is rank 0).

    Under torchrun one process group serves every run: the trainer joins a group that exists and leaves it alone,
    whereas a group it created itself is destroyed after its run, and a second one cannot be set up in the same
    processes.
    """
    import torch.distributed as dist

    from unikd._distributed import init_distributed

    info, _, owns_group = init_distributed(device)
    try:
        teacher = None
        if teacher_run is not None:
            log(f"[bench] teacher: {teacher_run[0]} -> {teacher_run[2]}")
            teacher = run_training(*teacher_run)
            log(f"[bench] teacher top-1 {teacher['best_top1']:.2f}")
        results = []
        for run in runs:
            log(f"[bench] {run.row} seed {run.seed} -> {run.output_dir}")
            result = run_training(run.config, run.overrides, run.output_dir, run.method_section)
            log(f"[bench] {run.row} seed {run.seed}: last top-1 {result['last_top1']:.2f}")
            result["teacher_cache"] = teacher_cache_use(run.output_dir)
            results.append({"method": run.row, "column": run.column, "grid": run.point, "seed": run.seed, **result})
    finally:
        if owns_group:
            dist.destroy_process_group()
    return teacher, results, info.is_main


def run_bench(
    profile_name: str,
    out_dir: str | Path,
    *,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    overrides: list[str] = (),
    grid: list[str] | None = None,
    log=print,
) -> dict:
    """Run (or resume) every (column, grid point, seed) of the profile, then write the results; returns the summary.

    ``grid``: ``--grid`` specs (``["method.alpha=0.6,0.8"]``); None runs the profile's own grid (most have none).
    """
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 speaks for all, as the trainer does
        log = _quiet
    profile = get_profile(profile_name)
    columns = _columns(profile, profile_name, methods)
    grid_values = parse_grid(profile.grid if grid is None else grid)
    seeds = list(dict.fromkeys(profile.seeds if seeds is None else seeds))
    if not seeds:
        raise UnikdError("--seeds: no seed given")
    out_dir = Path(out_dir)
    overrides = list(overrides)
    runs = _plan(profile, columns, grid_values, seeds, overrides, out_dir)
    swept = [column for column in columns if any(run.point for run in runs if run.column == column)]
    if grid_values and not swept:
        raise UnikdError(f"--grid {', '.join(grid_values)}: no column to sweep (the baseline has no method.* keys)")
    needs_teacher = any(parse_column(column)[0] in TEACHER_METHODS for column in columns)
    if needs_teacher and profile.teacher_config is None:
        raise UnikdError(f"profile {profile_name} has no teacher for {', '.join(TEACHER_METHODS)}")
    teacher_run = None
    if needs_teacher:
        teacher_run = (profile.teacher_config, [*profile.overrides, *profile.teacher_overrides, *overrides],
                       out_dir / "teacher")  # fmt: skip
    device = _check_configs(runs, teacher_run)
    log(f"[bench] {len(runs)} runs: {len(runs) // len(seeds)} rows x {len(seeds)} seeds -> {out_dir / 'runs'}")
    teacher, results_runs, is_main = _train_runs(runs, teacher_run, device, log)

    rows = list(dict.fromkeys(run.row for run in runs))
    baseline_of = {run.row: _baseline_row(run.point) for run in runs}
    summary = summarize(results_runs, rows, baseline_of)
    machine = machine_note([run.get("load_average") for run in results_runs])
    results = {
        "profile": profile_name,
        "description": profile.description,
        "machine": machine,
        "columns": columns,
        "grid": grid_values,
        "summary": summary,
        "runs": results_runs,
    }
    if teacher is not None:
        results["teacher_top1"] = teacher["best_top1"]
    note = " ".join(part for part in (_grid_note(grid_values, swept), teacher_pass_note(results_runs)) if part)
    files = ["results.json", "results.md", "curves.png", "sweep.png" if grid_values else "bars.png"]
    results["files"] = files
    if is_main:  # under torchrun every rank ran the same runs; one writes
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (out_dir / "results.md").write_text(markdown_table(summary, profile_name, seeds, machine, note) + "\n")
        plot_results(results_runs, summary, out_dir, grid_values)
    return results


def teacher_cache_use(run_dir: Path) -> dict | None:
    """The teacher-cache batches of a run, from its ``metrics.jsonl``: ``{"hits", "misses", "verified"}`` summed over
    its epochs (a resumed run: both parts); None when the run used no cache."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    totals, used = {"hits": 0, "misses": 0, "verified": 0}, False
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("split") != "teacher_cache":
            continue
        used = used or bool(record.get("used"))
        for key in totals:
            totals[key] += int(record.get(key, 0))
    return totals if used else None


def teacher_pass_note(runs: list[dict]) -> str:
    """Who paid the teacher's forward pass, per seed: the runs that computed teacher logits (cache misses) and the
    ones that only read them, e.g. 'Teacher pass (OUT/teacher_cache): seed 0 paid by kd (300 batches); dkd, nkd read
    it.'"""
    parts = []
    for seed in dict.fromkeys(run["seed"] for run in runs):
        cached = [run for run in runs if run["seed"] == seed and run.get("teacher_cache")]
        if not cached:
            continue
        paid = [f"{run['method']} ({run['teacher_cache']['misses']} batches)" for run in cached
                if run["teacher_cache"]["misses"]]  # fmt: skip
        read = [run["method"] for run in cached if not run["teacher_cache"]["misses"]]
        text = f"seed {seed} paid by {', '.join(paid)}" if paid else f"seed {seed} read from an earlier bench's cache"
        parts.append(text + (f"; {', '.join(read)} read it" if paid and read else ""))
    return f"Teacher pass (teacher-logit cache): {'; '.join(parts)}." if parts else ""


def _quiet(message: str) -> None:
    pass


def _baseline_row(point: dict[str, str]) -> str:
    """The baseline row a grid point is compared with: the one trained with the same non-method grid values."""
    return " ".join(["baseline", *(f"{k}={v}" for k, v in point.items() if not k.startswith("method."))])


def _grid_note(grid: dict[str, list[str]], swept: list[str]) -> str:
    if not grid:
        return ""
    keys = "; ".join(f"{key} in {', '.join(values)}" for key, values in grid.items())
    once = all(key.startswith("method.") for key in grid)
    baseline = (
        "the baseline has no method.* key and is trained once per seed as the reference"
        if once
        else "the baseline is trained at every value of the grid's non-method keys and each row is compared with "
        "the baseline of the same values"
    )
    return f"Grid: {keys}, for {', '.join(swept)}; {baseline}."


def get_profile(name: str) -> Profile:
    return lookup_profile(name, PROFILES, label="profile")


def lookup_profile(name: str, profiles: dict[str, T], *, label: str) -> T:
    """``profiles[name]``, or a ``UnikdError`` that starts with ``label`` and lists the profiles (with a
    did-you-mean)."""
    if name not in profiles:
        import difflib

        close = difflib.get_close_matches(name, list(profiles), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnikdError(f"{label}: {name!r} is not one of {', '.join(profiles)}{hint}")
    return profiles[name]


def mean_std(values: list[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (0 for one value) of ``values``."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def plus_minus(value: tuple[float, float], *, signed: bool = False) -> str:
    """``(mean, std)`` as a table cell: ``71.23 +- 0.45`` (``signed``, for a difference: ``+1.23 +- 0.45``)."""
    return f"{value[0]:{'+' if signed else ''}.2f} +- {value[1]:.2f}"


def summarize(runs: list[dict], methods: list[str], baseline_of: dict[str, str] | None = None) -> list[dict]:
    """One row per method (table row): last-epoch top-1 mean/std, the paired delta to its baseline (``baseline_of``:
    row -> baseline row, default "baseline"), best epoch, time, memory; plus the row's column and grid point."""
    by_method = {m: sorted((r for r in runs if r["method"] == m), key=lambda r: r["seed"]) for m in methods}
    baseline_of = baseline_of or {}
    rows = []
    for method, method_runs in by_method.items():
        if not method_runs:
            continue
        baseline_runs = by_method[baseline_of.get(method, "baseline")]
        baseline_by_seed = {r["seed"]: r for r in baseline_runs}
        baseline_time = statistics.fmean(e["epoch_time_s"] for r in baseline_runs for e in r["history"])
        last = [r["last_top1"] for r in method_runs]
        best = [r["best_top1"] for r in method_runs]
        deltas = [r["last_top1"] - baseline_by_seed[r["seed"]]["last_top1"] for r in method_runs]
        epoch_time = statistics.fmean(e["epoch_time_s"] for r in method_runs for e in r["history"])
        on_cuda = all(r.get("device") == "cuda" for r in method_runs)
        rows.append(
            {
                "method": method,
                "column": method_runs[0].get("column", method),
                "grid": method_runs[0].get("grid", {}),
                "seeds": [r["seed"] for r in method_runs],
                "last_top1": mean_std(last),
                "best_top1": mean_std(best),
                "best_epoch": [r["best_epoch"] for r in method_runs],
                "delta_to_baseline": mean_std(deltas),
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


def markdown_table(summary: list[dict], profile_name: str, seeds: list[int], machine: str = "", note: str = "") -> str:
    """The ``results.md`` table, one line per row of ``summary``; ``note`` (the grid's semantics) ends the header."""
    with_memory = any(row["peak_mem_mb"] is not None for row in summary)
    lines = [
        f"Profile `{profile_name}`, seeds {seeds}. Top-1 in %, mean +- std over seeds; delta: per-seed difference to "
        "the baseline of the same seed (paired), mean +- std. Best epoch per seed (0-based). "
        + (machine or machine_note([]))
        + (f" {note}" if note else ""),
        "",
        "| method | last top-1 | best top-1 | delta to baseline (paired) | best epoch | epoch time s | time ratio |"
        + (" peak CUDA mem MB |" if with_memory else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if with_memory else ""),
    ]
    for row in summary:
        memory = f" {row['peak_mem_mb']:.0f} |" if row["peak_mem_mb"] is not None else " - |"
        lines.append(
            f"| {row['method']} | {plus_minus(row['last_top1'])} | {plus_minus(row['best_top1'])} | "
            f"{plus_minus(row['delta_to_baseline'], signed=True)} | {', '.join(map(str, row['best_epoch']))} | "
            f"{row['epoch_time_s']:.1f} | {row['time_ratio']:.2f} |" + (memory if with_memory else "")
        )
    return "\n".join(lines)


def plot_results(
    runs: list[dict], summary: list[dict], out_dir: Path, grid: dict[str, list[str]] | None = None
) -> None:
    """``curves.png``: mean validation top-1 per epoch (band: min-max over seeds); ``bars.png``: last top-1 +- std,
    or with a grid ``sweep.png`` (``sweep_chart``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        (row["method"], [[e["top1"] for e in r["history"]] for r in runs if r["method"] == row["method"]], None)
        for row in summary
    ]
    figure = curves_chart(lines, "epoch", "validation top-1 (%)")
    figure.savefig(out_dir / "curves.png", dpi=100)
    plt.close(figure)

    figure = (
        sweep_chart(summary, grid)
        if grid
        else bar_chart(
            [(row["method"], *row["last_top1"], len(row["seeds"])) for row in summary], "last-epoch top-1 (%)"
        )
    )
    figure.savefig(out_dir / ("sweep.png" if grid else "bars.png"), dpi=100)
    plt.close(figure)


def curves_chart(lines: list[tuple[str, list[list[float]], list[float] | None]], xlabel: str, ylabel: str):
    """The ``curves.png`` figure: one line per ``(label, curves, x)``, the mean over the curves (one per seed) at each
    point, with a band from their min to their max; curves are cut to the shortest; ``x``: the points' positions
    (None: 1, 2, ...)."""
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for label, curves, x in lines:
        length = min(len(curve) for curve in curves)
        xs = list(range(1, length + 1)) if x is None else list(x[:length])
        columns = [[curve[index] for curve in curves] for index in range(length)]
        axis.plot(xs, [statistics.fmean(column) for column in columns], marker="o", label=label)
        axis.fill_between(xs, [min(column) for column in columns], [max(column) for column in columns], alpha=0.15)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.legend(fontsize=8 if len(lines) <= 8 else 6)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def _grid_positions(values: list[str]) -> tuple[list[float], bool]:
    """x positions of a key's grid values: the numbers themselves, or 0, 1, ... for words; and whether numeric."""
    import yaml

    parsed = [yaml.safe_load(value) for value in values]
    if all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in parsed):
        return [float(value) for value in parsed], True
    return [float(index) for index in range(len(values))], False


def sweep_chart(summary: list[dict], grid: dict[str, list[str]]):
    """The ``sweep.png`` figure: last-epoch top-1 against the first grid key's values, one line per column (and per
    value of the other grid keys), +- std error bars when every row has several seeds; a row that does not vary with
    that key (the baseline of a method.* sweep) is a horizontal reference line with a +- std band."""
    import matplotlib.pyplot as plt

    x_key = next(iter(grid))
    positions, numeric = _grid_positions(grid[x_key])
    position = dict(zip(grid[x_key], positions))
    several = all(len(row["seeds"]) > 1 for row in summary)
    figure, axis = plt.subplots(figsize=(7, 4.5))
    lines: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for row in summary:
        mean, std = row["last_top1"]
        if x_key not in row["grid"]:
            axis.axhline(mean, color="0.4", linestyle=":", label=f"{row['method']} (not swept)")
            if several:
                axis.axhspan(mean - std, mean + std, color="0.5", alpha=0.12)
            continue
        others = " ".join(f"{key}={value}" for key, value in row["grid"].items() if key != x_key)
        lines.setdefault((row["column"], others), []).append((position[row["grid"][x_key]], mean, std))
    for (column, others), points in lines.items():
        xs, means, stds = zip(*sorted(points))
        style = "--" if column == "baseline" else "-"
        label = f"{column} {others}".strip()
        axis.errorbar(xs, means, yerr=stds if several else None, marker="o", capsize=3, linestyle=style, label=label)
    if numeric and min(positions) > 0 and max(positions) / min(positions) >= 10:
        axis.set_xscale("log")  # a grid spread over decades (0.025 ... 0.4) reads evenly on a log axis
    axis.set_xticks(positions, grid[x_key])
    axis.minorticks_off()
    seeds = len(summary[0]["seeds"]) if summary else 0
    spread = "mean +- std over seeds" if several else f"{seeds} seed{'s' if seeds != 1 else ''}, no spread shown"
    axis.set_xlabel(x_key)
    axis.set_ylabel(f"last-epoch top-1 (%), {spread}")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def bar_chart(bars: list[tuple[str, float, float, int]], metric: str):
    """A ``bars.png`` figure: one bar per ``(label, mean, std, number of seeds)``, ``metric`` (e.g. "last-epoch top-1
    (%)") on an axis from 0 (a cut axis exaggerates differences), with +- std error bars only when every bar has
    several seeds (one seed has no spread to show). Both benches draw their bars with it."""
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    names, means = [bar[0] for bar in bars], [bar[1] for bar in bars]
    several = bool(bars) and all(bar[3] > 1 for bar in bars)
    errors = [bar[2] for bar in bars] if several else None
    drawn = axis.bar(names, means, yerr=errors, capsize=4 if several else 0, color="tab:blue", alpha=0.8)
    axis.bar_label(drawn, fmt="%.2f", fontsize=8)
    axis.set_ylim(0, min(100.0, max(means, default=0.0) * 1.1 + 1.0))
    seeds = bars[0][3] if bars else 0
    spread = "mean +- std over seeds" if several else f"{seeds} seed{'s' if seeds != 1 else ''}, no spread shown"
    axis.set_ylabel(f"{metric}, {spread}")
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return figure
