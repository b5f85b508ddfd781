"""What USKD teaches: the soft labels a trained student gives itself (paper Fig. 3), as JSON and a PNG grid.

    method = create_method("uskd", num_classes, feature_dim=feature_dim(student))
    method.load_state_dict(ckpt["method"])
    report = soft_label_report(student, method, images, targets, class_names)
    save_soft_label_report(report, images, "out/")   # out/soft_labels.json, out/soft_labels.png

The soft target value is ``S_t^2 + 1 - mean(S_t^2)`` over the batch (Eq. 6, as the released code), so it depends on
the batch (the report is computed on the whole batch given, in eval mode) and exceeds 1 for an image the student is
surer of than of the batch on average. The non-target values follow Zipf's law: the class ranked r among all C
classes gets 1 / r, renormalised over the C - 1 non-target classes; the values depend only on the target's own
rank (first, for a trained student), so what differs between images is which class holds which rank
(``zipf_values``, ``EXPLANATION``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unikd.losses import uskd_soft_labels
from unikd.models import forward_with_feature

EXPLANATION = (
    "soft target = S_t^2 + 1 - batch mean of S_t^2 (Eq. 6): above 1 when the student is surer of this image than of "
    "the batch on average. Non-targets follow Zipf's law: the class ranked r of all {classes} gets 1/r, renormalised "
    "over the {others} non-targets ({values} for the top {shown} when the target ranks first); the values depend only "
    "on the target's rank: what differs per image is which class holds which rank."
)


def zipf_values(num_classes: int, target_rank: int = 1) -> list[float]:
    """The Zipf soft labels of the C - 1 non-target classes in rank order, when the target holds ``target_rank``
    among all C classes: ``1 / r`` for every other rank r, renormalised to sum to 1."""
    weights = [1.0 / rank for rank in range(1, num_classes + 1) if rank != target_rank]
    return [weight / sum(weights) for weight in weights]


def explanation(num_classes: int, shown: int = 3) -> str:
    """``EXPLANATION`` filled in for ``num_classes`` classes and the top ``shown`` non-targets."""
    values = ", ".join(f"{value:.3f}" for value in zipf_values(num_classes)[:shown])
    return EXPLANATION.format(classes=num_classes, others=num_classes - 1, values=values, shown=shown)


def soft_label_report(
    student: nn.Module,
    method: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    class_names: Sequence[str],
    *,
    layer: str | int = "mid",
    top_k: int = 3,
) -> list[dict[str, Any]]:
    """USKD soft labels of each image: its target value and its ``top_k`` non-target classes.

    Args:
        student: the trained student.
        method: its USKD method (``weak_head`` and ``rank`` are used).
        images: (N, ...) one batch, on the student's device.
        targets: (N,) class indices.
        class_names: C names, indexed by class.
        layer: the student layer the weak head reads (as in training).
        top_k: how many non-target classes to list.

    Returns:
        One dict per image: ``index``, ``num_classes``, ``target``, ``target_name``, ``target_value`` (Eq. 6),
        ``prediction``, ``prediction_name``, ``student_target_prob`` (S_t), and ``non_target``: a list of ``top_k``
        ``{"class", "name", "value"}`` sorted by value, from the Zipf distribution over the non-target classes
        (Eq. 9-10; it sums to 1 over them).
    """
    if targets.dim() != 1:
        raise ValueError(f"targets: expected class indices of shape (N,), got shape {tuple(targets.shape)}")
    if not hasattr(method, "weak_head"):
        raise ValueError(f"method: soft labels need the USKD method (with its weak head), got {type(method).__name__}")
    num_classes = method.weak_head.out_features
    if len(class_names) != num_classes:
        raise ValueError(f"class_names: expected {num_classes} names (one per class), got {len(class_names)}")
    if not 1 <= top_k < num_classes:
        raise ValueError(f"top_k: must be in [1, {num_classes - 1}], got {top_k}")

    modes = {module: module.training for module in (student, method)}
    student.eval()
    method.eval()
    try:
        with torch.no_grad():
            logits, feature = forward_with_feature(student, images, layer=layer)
            soft = uskd_soft_labels(logits, method.weak_head(feature), targets, rank=method.rank)
            student_probs = logits.float().softmax(dim=1)
    finally:
        for module, training in modes.items():
            module.train(training)

    top_values, top_classes = soft.non_target.topk(top_k, dim=1)
    report = []
    for i, target in enumerate(targets.tolist()):
        prediction = int(logits[i].argmax())
        report.append(
            {
                "index": i,
                "num_classes": num_classes,
                "target": target,
                "target_name": class_names[target],
                "target_value": float(soft.target_values[i, 0]),
                "student_target_prob": float(student_probs[i, target]),
                "prediction": prediction,
                "prediction_name": class_names[prediction],
                "non_target": [
                    {"class": int(c), "name": class_names[int(c)], "value": float(v)}
                    for c, v in zip(top_classes[i].tolist(), top_values[i].tolist())
                ],
            }
        )
    return report


def save_soft_label_report(
    report: list[dict[str, Any]], images: torch.Tensor, out_dir: str | Path, num_classes: int | None = None
) -> list[Path]:
    """Write ``soft_labels.json`` and ``soft_labels.png`` (one row per image: the image, then a bar chart of its
    target value and top non-target values, with a note on how to read them when ``num_classes`` is given) into
    ``out_dir``; return the two paths.

    ``images``: (N, C, H, W) as given to :func:`soft_label_report`; each is min-max rescaled for display, so any
    normalisation is fine.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / "soft_labels.json", out_dir / "soft_labels.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n")

    note_lines = 3 if num_classes else 0
    figure, axes = plt.subplots(len(report), 2, figsize=(7, 2.2 * len(report) + 0.25 * note_lines), squeeze=False)
    for (image_axis, bar_axis), entry in zip(axes, report):
        image = images[entry["index"]].detach().float().cpu()
        image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12)
        if image.shape[0] == 1:
            image_axis.imshow(image[0].numpy(), cmap="gray")
        else:
            image_axis.imshow(image[:3].permute(1, 2, 0).numpy())
        image_axis.set_title(f"{entry['target_name']} (pred. {entry['prediction_name']})", fontsize=9)
        image_axis.axis("off")

        names = [f"{entry['target_name']} (target)"] + [item["name"] for item in entry["non_target"]]
        values = [entry["target_value"]] + [item["value"] for item in entry["non_target"]]
        bars = bar_axis.barh(names[::-1], values[::-1], color=["tab:gray"] * (len(values) - 1) + ["tab:blue"])
        bar_axis.bar_label(bars, fmt="%.3f", fontsize=8)
        bar_axis.set_xlim(0, max(1.0, max(values)) * 1.25)
        bar_axis.tick_params(labelsize=8)
    axes[0, 1].set_title("USKD soft target value / non-target distribution", fontsize=9)
    if num_classes:
        import textwrap

        figure.text(0.01, 0.005, textwrap.fill(explanation(num_classes), 120), fontsize=7, va="bottom")
    figure.tight_layout(rect=(0, 0.22 * note_lines / figure.get_figheight(), 1, 1))
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
    return [json_path, png_path]


def soft_labels_from_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    class_names: Sequence[str] | None = None,
    num_images: int = 8,
    batch_size: int = 512,
    overrides: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Soft labels of a USKD training checkpoint on its validation set, written to ``out_dir`` (JSON and PNG).

    The student and its weak head are rebuilt from the checkpoint; the report is computed on the first
    ``batch_size`` validation images (the soft target uses the batch mean) and keeps the first image of each class
    in ``class_names``, or else the first ``num_images`` images. ``overrides`` adjust the checkpoint's config, e.g.
    ``data.root=DIR``.
    """
    from unikd._checkpoint import load_checkpoint
    from unikd._errors import UnikdError
    from unikd.config import config_for_checkpoint
    from unikd.data import build_datasets
    from unikd.methods import create_method
    from unikd.models import feature_dim
    from unikd.train import student_from_checkpoint

    if num_images < 1:
        raise UnikdError(f"--num-images: must be at least 1, got {num_images}")
    state = load_checkpoint(checkpoint, required=("model_name", "num_classes", "model", "config", "method"))
    cfg = config_for_checkpoint(state["config"], overrides)
    if cfg.method.name != "uskd":
        stored = state["config"].get("method", {}).get("name") if isinstance(state["config"], dict) else None
        raise UnikdError(f"{checkpoint}: soft labels need a USKD run, this one was trained with {stored!r}")
    bundle = build_datasets(cfg.data)
    student = student_from_checkpoint(state, cfg, bundle, checkpoint)
    method = create_method(
        "uskd", state["num_classes"], feature_dim(student, cfg.model.feature_layer), **cfg.method.params
    )
    method.load_state_dict(state["method"])

    count = min(batch_size, len(bundle.val))
    images = torch.stack([bundle.val[i][0] for i in range(count)])
    targets = torch.tensor([int(bundle.val[i][1]) for i in range(count)])
    report = soft_label_report(student, method, images, targets, bundle.class_names, layer=cfg.model.feature_layer)
    if class_names is None:
        chosen = report[:num_images]
    else:
        unknown = [name for name in class_names if name not in bundle.class_names]
        if unknown:
            raise UnikdError(f"class names {unknown} are not classes of {cfg.data.name}: {list(bundle.class_names)}")
        chosen = [next(e for e in report if e["target_name"] == name) for name in class_names]
    save_soft_label_report(chosen, images, out_dir, num_classes=bundle.num_classes)
    return chosen
