"""``unikd detect``: the detection commands, a command group beside the classification ones.

    unikd detect train CONFIG [key=value ...] [--resume]
    unikd detect eval CHECKPOINT [key=value ...] [--data ROOT]
    unikd detect export CHECKPOINT OUT
    unikd detect config CONFIG [key=value ...]
    unikd detect mosaics --out DIR [--fashion-mnist DIR] [--train N] [--val N] [--canvas PX]
        [--items MIN MAX] [--scale MIN MAX] [--seed S]
    unikd detect bench PROFILE --out DIR [--methods M ...] [--seeds S ...] [--threads N] [key=value ...]

``add_commands(subparsers)`` adds the group to the ``unikd`` parser (``unikd.cli.build_parser``); train, eval,
export and config are built by ``unikd.cli``'s ``add_*_command`` as the classification ones are, and each
subcommand sets ``func`` to a ``_<name>(args)`` handler, so ``unikd.cli.run_command`` runs them with its exit codes:
0, 2 with ``unikd: error: <one line>`` for a user error, 130 on Ctrl-C. ``main(argv)`` runs the group on its own
(``python -m unikd.detection.cli detect ...``) the same way. Torch and the engine are imported only by the
handlers that need them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from unikd._errors import UnikdError
from unikd.cli import (
    add_bench_command,
    add_config_command,
    add_eval_command,
    add_export_command,
    add_train_command,
    checkpoint_to_export,
    data_overrides,
    run_command,
)

_OVERRIDES_HELP = "config overrides, e.g. train.batch_size=8 optim.lr=0.01 schedule.length=24 'method={name: nkd}'"

__all__ = ["add_commands", "main"]


def _train(args: argparse.Namespace) -> None:
    from unikd.detection.config import load_detection_config
    from unikd.detection.train import train_detector

    cfg = load_detection_config(args.config, args.overrides)
    result = train_detector(cfg, resume=args.resume)
    print(f"unikd detect train: finished, outputs in {cfg.output_dir}")
    print(_metrics_line(result["last"] or {}))


def _eval(args: argparse.Namespace) -> None:
    from unikd.detection.train import evaluate_detection_checkpoint

    print(_metrics_line(evaluate_detection_checkpoint(args.checkpoint, data_overrides(args))))


def _export(args: argparse.Namespace) -> None:
    from unikd.models import export_state_dict

    checkpoint = checkpoint_to_export(args.checkpoint, args.out)
    if checkpoint.get("task") != "detection":
        raise UnikdError(f"{args.checkpoint} is a classification checkpoint; export it with 'unikd export'")
    export_state_dict(checkpoint["model"], args.out)
    print(f"wrote the {checkpoint['model_name']} detector ({len(checkpoint['model'])} tensors) to {args.out}")


def _config(args: argparse.Namespace) -> None:
    from unikd.detection.config import dump_detection_config, load_detection_config

    print(dump_detection_config(load_detection_config(args.config, args.overrides)), end="")


def _mosaics(args: argparse.Namespace) -> None:
    from unikd.detection.mosaics import FASHION_MNIST_ROOT, make_mosaics

    counts = make_mosaics(
        args.out,
        fashion_mnist_root=args.fashion_mnist or FASHION_MNIST_ROOT,
        num_train=args.train,
        num_val=args.val,
        canvas=args.canvas,
        items=tuple(args.items),
        scale=tuple(args.scale),
        seed=args.seed,
    )
    print(
        f"wrote {args.train} train and {args.val} val mosaics ({counts['train']} and {counts['val']} boxes) to "
        f"{args.out}; train on them with data.root={args.out} (see configs/detection/mosaics_*.yaml)"
    )


def _bench(args: argparse.Namespace) -> None:
    from unikd.detection.bench import run_detection_bench

    results = run_detection_bench(
        args.profile, args.out, methods=args.methods, seeds=args.seeds, overrides=args.overrides, threads=args.threads
    )
    print((Path(args.out) / "results.md").read_text(), end="")
    print(f"unikd detect bench: {results['profile']} done; results.json, results.md and plots in {args.out}")


def add_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``detect`` and its subcommands to the ``unikd`` parser's ``subparsers``; returns the ``detect`` parser."""
    detect = subparsers.add_parser(
        "detect",
        help="object detection: Faster/Mask R-CNN, distillation on RoI logits",
        description="Detection with torchvision's Faster R-CNN and Mask R-CNN on COCO-format data: KD, DKD, NKD and "
        "WSLD on the R-CNN box classifier, USKD-pretrained backbones, COCO evaluation.",
    )
    commands = detect.add_subparsers(title="commands", metavar="COMMAND", required=True)

    add_train_command(
        commands, _train, help="train a detector", description="Train a student detector.",
        config_help="detection YAML config, e.g. configs/detection/mosaics_nkd.yaml", overrides_help=_OVERRIDES_HELP,
    )  # fmt: skip
    add_eval_command(
        commands, _eval, help="evaluate a checkpoint",
        description="COCO AP/AR of a detection checkpoint on its validation set.",
        checkpoint_help="a unikd detection checkpoint (.pt)",
        overrides_help="overrides of the checkpoint's config, e.g. data.root=DIR",
    )  # fmt: skip
    add_export_command(
        commands, _export, help="write the detector's weights",
        description="Write the student detector's state_dict (torchvision's parameter names).",
        checkpoint_help="a unikd detection checkpoint (.pt)",
    )  # fmt: skip
    add_config_command(
        commands, _config, description="Validate a detection config and print it in full.",
        config_help="detection YAML config", overrides_help=_OVERRIDES_HELP,
    )  # fmt: skip

    mosaics = commands.add_parser(
        "mosaics",
        help="make the Fashion-MNIST mosaics detection dataset",
        description="Place Fashion-MNIST items (real pixels, 10 classes) on canvases and write COCO-format "
        "annotations with boxes and masks (deterministic: the same arguments give the same files).",
    )
    mosaics.add_argument("--out", required=True, metavar="DIR", help="output folder")
    mosaics.add_argument(
        "--fashion-mnist",
        metavar="DIR",
        help="the folder of the four Fashion-MNIST idx files (default: /usr/share/datasets/fashion-mnist)",
    )
    mosaics.add_argument("--train", type=int, default=4000, metavar="N", help="training canvases (default: 4000)")
    mosaics.add_argument("--val", type=int, default=500, metavar="N", help="validation canvases (default: 500)")
    mosaics.add_argument("--canvas", type=int, default=128, metavar="PX", help="canvas side in pixels (default: 128)")
    mosaics.add_argument("--items", type=int, nargs=2, default=[2, 5], metavar=("MIN", "MAX"), help="items per canvas")
    mosaics.add_argument(
        "--scale", type=float, nargs=2, default=[1.0, 2.0], metavar=("MIN", "MAX"), help="item scale (28 px = 1)"
    )
    mosaics.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default: 0)")
    mosaics.set_defaults(func=_mosaics)

    from unikd.detection.bench import PROFILES  # no torch: the profiles are plain data

    bench = add_bench_command(
        commands,
        _bench,
        help="train detection methods side by side over paired seeds",
        description="Train the methods of a detection profile over paired seeds (resumable), measure the step-time "
        f"overhead of each distillation term, and write results.json, results.md and plots. Profiles: "
        f"{', '.join(PROFILES)}.",
        profile_example="mosaics-cpu",
        methods_help="a subset of the profile's methods",
        overrides_help="overrides applied to every detection run",
    )
    bench.add_argument(
        "--threads", type=int, metavar="N", help="torch threads (default: torch's; 1 on a machine others share)"
    )
    return detect


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``unikd detect ...`` (``argv`` starts with ``detect``; default ``sys.argv[1:]``); returns the exit status."""
    parser = argparse.ArgumentParser(prog="unikd", description="unikd's detection commands.")
    add_commands(parser.add_subparsers(title="commands", metavar="COMMAND", required=True))
    return run_command(parser.parse_args(argv))


def _metrics_line(metrics: dict) -> str:
    shown = [name for name in ("bbox_AP", "bbox_AP50", "bbox_AP75", "bbox_AR", "segm_AP", "segm_AR") if name in metrics]
    return "  ".join(f"{name} {metrics[name]:.2f}" for name in shown)


if __name__ == "__main__":
    sys.exit(main())
