"""The ``unikd`` command (also ``python -m unikd``).

    unikd train CONFIG [key=value ...] [--resume]
    unikd eval CHECKPOINT [key=value ...] [--data ROOT] [--out FILE]
    unikd eval --model NAME WEIGHTS --data ROOT [key=value ...] [--format LAYOUT] [--out FILE]
    unikd export CHECKPOINT OUT
    unikd config CONFIG [key=value ...]
    unikd softlabels CHECKPOINT [key=value ...] --out DIR [--data ROOT] [--num-images N]
    unikd bench PROFILE [key=value ...] --out DIR [--methods M ...] [--seeds S ...] [--grid KEY=V1,V2,...]
    unikd detect {train,eval,export,config,mosaics,bench} ...   (unikd.detection.cli)

Each subcommand is one ``_<name>`` function taking the parsed arguments plus one block in ``build_parser`` (an
``add_parser``, or one of the builders below). Exit status: 0 on success; 2 with ``unikd: error: <message>`` on one
line and no traceback for a user error (``UnikdError``, a file that is missing or may not be read or written); 130
on Ctrl-C, 143 on SIGTERM. Anything else is a bug and keeps its traceback.

The pieces another command group builds on (``unikd.detection.cli``): ``add_train_command``, ``add_eval_command``,
``add_export_command``, ``add_config_command`` and ``add_bench_command`` (the subcommands every task has, their
arguments and help in one place), ``data_overrides`` (``--data ROOT`` as ``data.root=ROOT``),
``checkpoint_to_export``, and ``run_command`` (the exit codes above, warnings on one line).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from unikd._errors import UnikdError

EXPORT_SUFFIXES = (".pt", ".pth", ".safetensors")
_OVERRIDES_HELP = "config overrides, e.g. train.epochs=5 optim.lr=0.05 schedule.milestones=[30,60] model.teacher=null"


__all__ = [
    "EXPORT_SUFFIXES",
    "add_bench_command",
    "add_config_command",
    "add_eval_command",
    "add_export_command",
    "add_train_command",
    "build_parser",
    "checkpoint_to_export",
    "data_overrides",
    "fail",
    "main",
    "parse_args",
    "run_command",
    "show_warning",
]


def _train(args: argparse.Namespace) -> None:
    from unikd.config import load_config
    from unikd.train import train  # torch and the engine load only for commands that need them

    cfg = load_config(args.config, args.overrides)
    metrics = train(cfg, resume=args.resume)
    print(f"unikd train: finished, outputs in {cfg.output_dir}")
    for key in ("best_top1", "best_epoch", "last_top1", "last_top5", "teacher_top1"):  # the rest: final.json
        value = metrics.get(key)
        if value is not None:
            print(f"  {key:<12} {value:.4f}" if isinstance(value, float) else f"  {key:<12} {value}")


def _eval(args: argparse.Namespace) -> None:
    from unikd.train import evaluate_checkpoint, evaluate_weights

    overrides = data_overrides(args)
    if args.model is None:
        if args.format is not None:
            raise UnikdError("--format: only with --model NAME (a unikd checkpoint says what it holds)")
        metrics = evaluate_checkpoint(args.checkpoint, overrides)
    else:
        from unikd.models import FORMATS

        layout = args.format or "auto"
        if layout not in FORMATS:
            raise UnikdError(f"--format: {layout!r} is not one of {', '.join(sorted(FORMATS))}")
        metrics = evaluate_weights(args.model, args.checkpoint, overrides, layout=layout)
    print(
        f"unikd eval: {metrics['model_name']} from {args.checkpoint}, {metrics['split']} split of "
        f"{metrics['dataset']} ({metrics['images']} images)"
    )
    if "weights" in metrics:
        print(f"  read {metrics['weights']}")
        print(f"  transform: {metrics['transform']}")
    print(f"top-1 {metrics['top1']:.2f}  top-5 {metrics['top5']:.2f}  loss {metrics['loss']:.4f}")
    if args.out is not None:
        from unikd._rundir import write_json

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, {**metrics, "file": str(args.checkpoint)})
        print(f"wrote {out}")


def _export(args: argparse.Namespace) -> None:
    from unikd.models import export_state_dict

    checkpoint = checkpoint_to_export(args.checkpoint, args.out)
    metadata = {key: checkpoint[key] for key in ("model_name", "num_classes", "in_chans") if key in checkpoint}
    export_state_dict(checkpoint["model"], args.out, metadata=metadata)
    print(f"wrote {checkpoint['model_name']} ({len(checkpoint['model'])} tensors) to {args.out}")


def _config(args: argparse.Namespace) -> None:
    from unikd.config import dump_config, load_config

    print(dump_config(load_config(args.config, args.overrides)), end="")


def _softlabels(args: argparse.Namespace) -> None:
    from unikd.softlabels import explanation, soft_labels_from_checkpoint

    overrides = data_overrides(args)
    report = soft_labels_from_checkpoint(args.checkpoint, args.out, num_images=args.num_images, overrides=overrides)
    for entry in report:
        others = ", ".join(f"{item['name']} {item['value']:.3f}" for item in entry["non_target"])
        print(f"{entry['target_name']}: soft target {entry['target_value']:.3f}; top non-targets: {others}")
    print(explanation(report[0]["num_classes"], target_soft_label=report[0]["target_soft_label"]))
    print(f"wrote {args.out}/soft_labels.json and {args.out}/soft_labels.png")


def _bench(args: argparse.Namespace) -> None:
    from os import environ

    from unikd.bench import run_bench

    results = run_bench(
        args.profile, args.out, methods=args.methods, seeds=args.seeds, overrides=args.overrides, grid=args.grid
    )
    if environ.get("RANK", "0") == "0":  # under torchrun, rank 0 wrote the files
        print((Path(args.out) / "results.md").read_text(), end="")
        print(f"unikd bench: {results['profile']} done; {', '.join(results['files'])} in {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unikd", description="Knowledge distillation for image classification (NKD, USKD and baselines)."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    add_train_command(
        commands, _train, help="train a student with a method", description="Train a student.",
        config_help="YAML config, e.g. configs/fmnist_uskd.yaml", overrides_help=_OVERRIDES_HELP,
    )  # fmt: skip

    evaluate = add_eval_command(
        commands,
        _eval,
        help="evaluate a checkpoint or any weights file",
        description="Top-1/top-5 of a unikd checkpoint on its validation set, or with --model of any weights file "
        "(unikd, timm, torchvision, CRD/mdistiller, mmpretrain/cls_KD layouts, detected) on a dataset.",
        checkpoint_help="a unikd training checkpoint (.pt), or with --model any weights file",
        overrides_help="config overrides, e.g. data.root=DIR data.val_subset=1000",
    )
    evaluate.add_argument(
        "--model",
        metavar="NAME",
        help="the model the weights file holds, e.g. cifar/resnet32x4, mdistiller/ResNet50, mmpretrain/resnet18; "
        "the dataset: --data ROOT (ImageNet-layout and CIFAR folders are recognised) or data.name=...",
    )
    evaluate.add_argument(
        "--format", metavar="LAYOUT", help="with --model: the file's layout, native, mdistiller or mmpretrain "
        "(default: auto, detected)",
    )  # fmt: skip
    evaluate.add_argument("--out", metavar="FILE", help="also write the numbers as JSON to FILE")

    add_export_command(
        commands, _export, help="write the student's weights",
        description="Write the student's state_dict (without training-only parts such as USKD's weak head).",
        checkpoint_help="a unikd training checkpoint (.pt)",
    )  # fmt: skip
    add_config_command(
        commands, _config, description="Validate a config and print it with every default.", config_help="YAML config",
        overrides_help=_OVERRIDES_HELP,
    )  # fmt: skip

    softlabels = commands.add_parser(
        "softlabels",
        help="show the soft labels a USKD student taught itself",
        description="The USKD soft target value and top non-target classes (paper Fig. 3) of validation images, "
        "as soft_labels.png and soft_labels.json.",
    )
    softlabels.add_argument("checkpoint", metavar="CHECKPOINT", help="a unikd training checkpoint of a USKD run")
    softlabels.add_argument("--out", required=True, metavar="DIR", help="output folder")
    softlabels.add_argument("--num-images", type=int, default=8, metavar="N", help="images to show (default: 8)")
    _add_data_option(softlabels)
    softlabels.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the checkpoint's config")
    softlabels.set_defaults(func=_softlabels)

    from unikd.bench import PROFILES  # no torch: the profiles are plain data

    bench = add_bench_command(
        commands,
        _bench,
        help="train methods side by side over paired seeds, or sweep a key",
        description="Train the methods of a profile over N paired seeds (resumable) and write results.json, "
        "results.md, curves.png and bars.png (with --grid: sweep.png, top-1 against the swept values). Profiles: "
        f"{', '.join(PROFILES)}.",
        profile_example="fmnist-cpu",
        methods_help="a subset of the profile's methods, or variants of them: 'uskd[rank=weak]' (quote the brackets)",
        overrides_help="overrides applied to every run",
    )
    bench.add_argument(
        "--grid",
        action="append",
        metavar="KEY=V1,V2,...",
        help="sweep a config key over values (repeat for the product), e.g. method.alpha=0.6,0.8,1.0; method.* keys "
        "skip the baseline (trained once per seed); replaces a sweep profile's own grid",
    )

    from unikd.detection.cli import add_commands as add_detection_commands

    add_detection_commands(commands)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The parsed command line; argparse's usage error (``SystemExit(2)``) for a bad one.

    ``key=value`` overrides may come before or after a command's options (``unikd eval --model NAME WEIGHTS --data
    ROOT data.val_subset=1000``): argparse stops filling a ``nargs="*"`` positional at the first option, so the
    overrides it leaves over are added back here, in order.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in arg or arg.startswith("-") for arg in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) and return the exit status."""
    return run_command(parse_args(argv))


def run_command(args: argparse.Namespace) -> int:
    """Call the parsed command's handler (``args.func``) and return the exit status of the module docstring: a user
    error becomes one ``unikd: error:`` line, a warning one ``unikd: warning:`` line."""
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            args.func(args)
    except UnikdError as error:
        return fail(str(error))
    except FileNotFoundError as error:  # a path the user gave that is not there
        return fail(f"file not found: {error.filename}" if error.filename else str(error))
    except (PermissionError, IsADirectoryError, NotADirectoryError) as error:  # a path the user gave, unusable
        return fail(f"{error.strerror}: {error.filename}" if error.filename else str(error))
    except KeyboardInterrupt:
        print("unikd: interrupted", file=sys.stderr)
        return 130
    return 0


def fail(message: str) -> int:
    """Print ``message`` as one ``unikd: error:`` line on stderr; returns the exit status 2."""
    print(f"unikd: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for the command line: a warning here is advice to the user (e.g. an ignored config
    key), one line without a source location."""
    print(f"unikd: warning: {message}", file=sys.stderr)


# ---- the subcommands every task has ------------------------------------------------------------------------------


def add_train_command(
    commands: argparse._SubParsersAction,
    handler: Callable[[argparse.Namespace], None],
    *,
    help: str,
    description: str,
    config_help: str,
    overrides_help: str,
) -> argparse.ArgumentParser:
    """``train CONFIG [key=value ...] [--resume]``, run by ``handler``."""
    train = commands.add_parser("train", help=help, description=description)
    train.add_argument("config", metavar="CONFIG", help=config_help)
    train.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    train.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    train.set_defaults(func=handler)
    return train


def add_eval_command(
    commands: argparse._SubParsersAction,
    handler: Callable[[argparse.Namespace], None],
    *,
    help: str,
    description: str,
    checkpoint_help: str,
    overrides_help: str,
) -> argparse.ArgumentParser:
    """``eval CHECKPOINT [key=value ...] [--data ROOT]``, run by ``handler``; the caller may add options."""
    evaluate = commands.add_parser("eval", help=help, description=description)
    evaluate.add_argument("checkpoint", metavar="CHECKPOINT", help=checkpoint_help)
    evaluate.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    _add_data_option(evaluate)
    evaluate.set_defaults(func=handler)
    return evaluate


def add_export_command(
    commands: argparse._SubParsersAction,
    handler: Callable[[argparse.Namespace], None],
    *,
    help: str,
    description: str,
    checkpoint_help: str,
) -> argparse.ArgumentParser:
    """``export CHECKPOINT OUT``, run by ``handler`` (which reads the file with ``checkpoint_to_export``)."""
    export = commands.add_parser("export", help=help, description=description)
    export.add_argument("checkpoint", metavar="CHECKPOINT", help=checkpoint_help)
    export.add_argument("out", metavar="OUT", help=f"output file; the format follows the suffix: {EXPORT_SUFFIXES}")
    export.set_defaults(func=handler)
    return export


def add_config_command(
    commands: argparse._SubParsersAction,
    handler: Callable[[argparse.Namespace], None],
    *,
    description: str,
    config_help: str,
    overrides_help: str,
) -> argparse.ArgumentParser:
    """``config CONFIG [key=value ...]``, run by ``handler``."""
    config = commands.add_parser("config", help="print the resolved config", description=description)
    config.add_argument("config", metavar="CONFIG", help=config_help)
    config.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    config.set_defaults(func=handler)
    return config


def add_bench_command(
    commands: argparse._SubParsersAction,
    handler: Callable[[argparse.Namespace], None],
    *,
    help: str,
    description: str,
    profile_example: str,
    methods_help: str,
    overrides_help: str,
) -> argparse.ArgumentParser:
    """``bench PROFILE --out DIR [--methods M ...] [--seeds S ...] [key=value ...]``, run by ``handler``; the caller
    may add options."""
    bench = commands.add_parser("bench", help=help, description=description)
    bench.add_argument("profile", metavar="PROFILE", help=f"benchmark profile, e.g. {profile_example}")
    bench.add_argument("--out", required=True, metavar="DIR", help="output folder (a rerun continues it)")
    bench.add_argument("--methods", nargs="+", metavar="METHOD", help=methods_help)
    bench.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="seeds (default: the profile's)")
    bench.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    bench.set_defaults(func=handler)
    return bench


def data_overrides(args: argparse.Namespace) -> list[str]:
    """The command's ``key=value`` overrides, with ``--data ROOT`` as ``data.root=ROOT`` last."""
    return [*args.overrides, *([f"data.root={args.data}"] if args.data else [])]


def checkpoint_to_export(checkpoint: str, out: str) -> dict:
    """The unikd training checkpoint ``checkpoint`` (``MODEL_ENTRIES`` checked), once ``out`` has a suffix
    ``export_state_dict`` writes."""
    from unikd._checkpoint import load_checkpoint

    if not out.endswith(EXPORT_SUFFIXES):
        raise UnikdError(f"OUT: {out} must end with one of {', '.join(EXPORT_SUFFIXES)}")
    return load_checkpoint(checkpoint)


def _add_data_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", metavar="ROOT", help="the dataset folder (same as data.root=ROOT)")


def _version() -> str:
    from unikd import __version__

    return __version__
