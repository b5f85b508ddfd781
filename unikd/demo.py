"""``make demo``: baseline and USKD side by side on Fashion-MNIST, and the soft labels USKD taught itself.

    python -m unikd.demo [--out demo_out] [--epochs 4]

Trains the small CNN twice from the same seed (same initialisation, same data order): once with plain
cross-entropy, once with USKD. Prints top-1 and epoch time per method, writes the accuracy curves to
``OUT/curves.png``, then shows, for three test images, the soft labels the USKD student gives itself (paper Fig. 3):
the soft target value and the top-3 non-target classes by name. One seed and a few epochs cannot show USKD's gain
(the two differ by about the seed-to-seed noise, measured in docs/BENCHMARKS.md); ``unikd bench fmnist-cpu``
compares methods over paired seeds. A second run with the same ``--out`` and ``--epochs`` shows the finished runs
again without retraining, and says so.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unikd.bench import PROFILES, run_bench

# Std of the paired USKD - baseline difference in the fmnist-cpu bench (3 seeds, 4 epochs; docs/BENCHMARKS.md).
PAIRED_NOISE_PT = 0.88
# Three test images of classes that resemble others (paper Fig. 3: a shirt leans towards T-shirt, pullover, coat).
SHOWCASE_CLASSES = ("Shirt", "Pullover", "Sneaker")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per method (default: 4)")
    args = parser.parse_args(argv)

    out = Path(args.out)
    runs = [out / "runs" / f"{method}-s0" for method in PROFILES["fmnist-demo"].methods]
    if all(_finished_epochs(run) == args.epochs for run in runs):
        print(
            f"unikd demo: {out / 'runs'} holds the finished runs of an earlier demo ({args.epochs} epochs); showing "
            f"them without retraining. To train again: rm -rf {out}, or pass --out NEWDIR"
        )
    else:
        print(f"unikd demo: training baseline and USKD on Fashion-MNIST ({args.epochs} epochs each, seed 0) -> {out}")
    results = run_bench("fmnist-demo", out, overrides=[f"train.epochs={args.epochs}"])
    print()
    print("| method | top-1 (last epoch) | best top-1 | epoch time s (wall clock) |")
    print("|---|---|---|---|")
    for row in results["summary"]:
        print(
            f"| {row['method']} | {row['last_top1'][0]:.2f} | {row['best_top1'][0]:.2f} | {row['epoch_time_s']:.1f} |"
        )
    print(results["machine"])
    delta = results["summary"][1]["delta_to_baseline"][0]
    where = "within" if abs(delta) <= 2 * PAIRED_NOISE_PT else "outside"
    print(
        f"\nUSKD - baseline: {delta:+.2f} pt after {args.epochs} epochs, one seed. The paired 3-seed benchmark of such "
        f"short runs (docs/BENCHMARKS.md) measured a spread of +-{PAIRED_NOISE_PT} pt for this difference; this one is "
        f"{where} twice that. One seed is not evidence either way, so this demo claims no gain: "
        "`unikd bench fmnist-cpu` compares methods over paired seeds."
    )
    print(f"Accuracy curves: {out / 'curves.png'}")
    show_soft_labels(out / "runs" / "uskd-s0" / "last.pt", out / "soft_labels")
    return 0


def _finished_epochs(run: Path) -> int | None:
    """``train.epochs`` of the finished run in ``run``, or None when there is none."""
    import yaml

    if not (run / "final.json").is_file() or not (run / "config.yaml").is_file():
        return None
    return (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("train", {}).get("epochs")


def show_soft_labels(checkpoint: Path, out_dir: Path) -> None:
    """Print and save the USKD soft labels of the first test image of each showcase class, and how to read them."""
    from unikd.softlabels import explanation, soft_labels_from_checkpoint

    report = soft_labels_from_checkpoint(checkpoint, out_dir, class_names=SHOWCASE_CLASSES)
    print("\nSoft labels the USKD student taught itself (paper Fig. 3), for three test images:")
    for entry in report:
        others = ", ".join(f"{item['name']} {item['value']:.3f}" for item in entry["non_target"])
        print(
            f"  {entry['target_name']:<9} soft target {entry['target_value']:.3f} "
            f"(student p={entry['student_target_prob']:.3f})  top non-targets: {others}"
        )
    print(f"  {explanation(report[0]['num_classes'])}")
    print(f"Picture and JSON: {out_dir / 'soft_labels.png'}, {out_dir / 'soft_labels.json'}")


if __name__ == "__main__":
    sys.exit(main())
