"""The ``unikd`` command (also ``python -m unikd``).

    unikd train CONFIG [key=value ...] [--resume]
    unikd eval CHECKPOINT [key=value ...] [--data ROOT]
    unikd export CHECKPOINT OUT
    unikd config CONFIG [key=value ...]

Each subcommand is one ``_<name>`` function taking the parsed arguments plus one ``add_parser`` block in
``build_parser``. Exit status: 0 on success; 2 with ``unikd: error: <message>`` on one line and no traceback for a
user error (``UnikdError``, a missing file); 130 on Ctrl-C. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from unikd._errors import UnikdError

EXPORT_SUFFIXES = (".pt", ".pth", ".safetensors")
_OVERRIDES_HELP = "config overrides, e.g. train.epochs=5 optim.lr=0.05 schedule.milestones=[30,60] model.teacher=null"


def _train(args: argparse.Namespace) -> None:
    from unikd.config import load_config
    from unikd.train import train  # torch and the engine load only for commands that need them

    cfg = load_config(args.config, args.overrides)
    metrics = train(cfg, resume=args.resume)
    print(f"unikd train: finished, outputs in {cfg.output_dir}")
    for key, value in metrics.items():
        if isinstance(value, float):
            print(f"  {key:<12} {value:.4f}")
        elif isinstance(value, int | str):  # lists such as the per-epoch history are in final.json
            print(f"  {key:<12} {value}")


def _eval(args: argparse.Namespace) -> None:
    from unikd.train import evaluate_checkpoint

    overrides = [*args.overrides, *([f"data.root={args.data}"] if args.data else [])]
    metrics = evaluate_checkpoint(args.checkpoint, overrides)
    print(f"top-1 {metrics['top1']:.2f}  top-5 {metrics['top5']:.2f}  loss {metrics['loss']:.4f}")


def _export(args: argparse.Namespace) -> None:
    from unikd._checkpoint import load_checkpoint
    from unikd.models import export_state_dict

    if not args.out.endswith(EXPORT_SUFFIXES):
        raise UnikdError(f"OUT: {args.out} must end with one of {', '.join(EXPORT_SUFFIXES)}")
    checkpoint = load_checkpoint(args.checkpoint)
    export_state_dict(checkpoint["model"], args.out)
    print(f"wrote {checkpoint['model_name']} ({len(checkpoint['model'])} tensors) to {args.out}")


def _config(args: argparse.Namespace) -> None:
    from unikd.config import dump_config, load_config

    print(dump_config(load_config(args.config, args.overrides)), end="")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unikd", description="Knowledge distillation for image classification (NKD, USKD and baselines)."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    train = commands.add_parser("train", help="train a student with a method", description="Train a student.")
    train.add_argument("config", metavar="CONFIG", help="YAML config, e.g. configs/fmnist_uskd.yaml")
    train.add_argument("overrides", nargs="*", metavar="key=value", help=_OVERRIDES_HELP)
    train.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    train.set_defaults(func=_train)

    evaluate = commands.add_parser(
        "eval", help="evaluate a checkpoint", description="Top-1/top-5 of a checkpoint on its validation set."
    )
    evaluate.add_argument("checkpoint", metavar="CHECKPOINT", help="a unikd training checkpoint (.pt)")
    evaluate.add_argument(
        "overrides", nargs="*", metavar="key=value", help="overrides of the checkpoint's config, e.g. data.root=DIR"
    )
    evaluate.add_argument("--data", metavar="ROOT", help="the dataset folder (same as data.root=ROOT)")
    evaluate.set_defaults(func=_eval)

    export = commands.add_parser(
        "export",
        help="write the student's weights",
        description="Write the student's state_dict (without training-only parts such as USKD's weak head).",
    )
    export.add_argument("checkpoint", metavar="CHECKPOINT", help="a unikd training checkpoint (.pt)")
    export.add_argument("out", metavar="OUT", help=f"output file; the format follows the suffix: {EXPORT_SUFFIXES}")
    export.set_defaults(func=_export)

    config = commands.add_parser(
        "config", help="print the resolved config", description="Validate a config and print it with every default."
    )
    config.add_argument("config", metavar="CONFIG", help="YAML config")
    config.add_argument("overrides", nargs="*", metavar="key=value", help=_OVERRIDES_HELP)
    config.set_defaults(func=_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) and return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            args.func(args)
    except UnikdError as error:
        return _fail(str(error))
    except FileNotFoundError as error:  # a path the user gave that is not there
        return _fail(f"file not found: {error.filename}" if error.filename else str(error))
    except KeyboardInterrupt:
        print("unikd: interrupted", file=sys.stderr)
        return 130
    return 0


def _fail(message: str) -> int:
    print(f"unikd: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # A warning here is advice to the user (e.g. an ignored config key): one line, no source location.
    print(f"unikd: warning: {message}", file=sys.stderr)


def _version() -> str:
    from unikd import __version__

    return __version__
