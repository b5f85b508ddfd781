"""What USKD teaches: the soft labels a trained student gives itself (paper Fig. 3), as JSON and a PNG grid.

    method = create_method("uskd", num_classes, feature_dim=feature_dim(student))
    method.load_state_dict(ckpt["method"])
    report = soft_label_report(student, method, images, targets, class_names)
    save_soft_label_report(report, images, "out/")   # out/soft_labels.json, out/soft_labels.png

The soft target value uses the batch mean of S_t^2 (Eq. 7, as the released code), so it depends on the batch: the
report is computed on the whole batch given, in eval mode.
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
        One dict per image: ``index``, ``target``, ``target_name``, ``target_value`` (Eq. 7), ``prediction``,
        ``prediction_name``, ``student_target_prob`` (S_t), and ``non_target``: a list of ``top_k``
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


def save_soft_label_report(report: list[dict[str, Any]], images: torch.Tensor, out_dir: str | Path) -> list[Path]:
    """Write ``soft_labels.json`` and ``soft_labels.png`` (one row per image: the image, then a bar chart of its
    target value and top non-target values) into ``out_dir``; return the two paths.

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

    figure, axes = plt.subplots(len(report), 2, figsize=(7, 2.2 * len(report)), squeeze=False)
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
    figure.tight_layout()
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
    from unikd.config import config_from_dict
    from unikd.data import build_datasets
    from unikd.methods import create_method
    from unikd.models import create_model, feature_dim

    state = load_checkpoint(checkpoint)
    cfg = config_from_dict(state["config"], overrides, check_files=False)
    if cfg.method.name != "uskd":
        raise UnikdError(f"{checkpoint}: soft labels need a USKD run, this one was trained with {cfg.method.name!r}")
    bundle = build_datasets(cfg.data)
    student = create_model(
        state["model_name"], state["num_classes"], in_chans=bundle.in_chans, **cfg.model.student_kwargs
    )
    student.load_state_dict(state["model"])
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
    save_soft_label_report(chosen, images, out_dir)
    return chosen
