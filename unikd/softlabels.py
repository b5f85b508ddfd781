"""What USKD teaches: the soft labels a trained student gives itself (paper Fig. 3), as JSON and a PNG grid.

    method = create_method("uskd", num_classes, feature_dim=feature_dim(student))
    method.load_state_dict(ckpt["method"])
    report = soft_label_report(student, method, images, targets, class_names)
    save_soft_label_report(report, images, "out/")   # out/soft_labels.json, out/soft_labels.png

By default the soft target value is ``S_t^2 + 1 - mean(S_t^2)`` over the batch (Eq. 6, as the released code), so it
depends on the batch (the report is computed on the whole batch given, in eval mode, with the method's
``batch_mean_group``) and exceeds 1 for an image the student is surer of than of the batch on average; a run with
another ``method.target_soft_label`` (Tables 8, 12, 15) shows that rule's value, and "teacher" / "ema" runs the
target probability of the teacher or of the EMA copy of the student saved in the checkpoint. The non-target values
follow Zipf's law: the class ranked r among all C classes gets 1 / r, renormalised over the C - 1 non-target
classes; the values depend only on the target's own rank (first, for a trained student), so what differs between
images is which class holds which rank (``zipf_values``, ``EXPLANATION``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unikd.losses import uskd_soft_labels
from unikd.methods import forward_student

EXPLANATION = (
    "{target}. Non-targets follow Zipf's law: the class ranked r of all {classes} gets 1/r, renormalised over the "
    "{others} non-targets ({values} for the top {shown} when the target ranks first); the values depend only on the "
    "target's rank: what differs per image is which class holds which rank."
)
# The first sentence of EXPLANATION for each method.target_soft_label (unikd.losses.uskd_loss gives the equations).
TARGET_RULES = {
    "squared": "soft target = S_t^2 + 1 - batch mean of S_t^2 (Eq. 6): above 1 when the student is surer of this "
    "image than of the batch on average",
    "unsquared": "soft target = S_t + 1 - batch mean of S_t (Table 12, without the square): above 1 when the student "
    "is surer of this image than of the batch on average",
    "softmax": "soft target = softmax over the batch of S_t, times the batch size (Table 8)",
    "sqrt": "soft target = sqrt(S_t - batch min of S_t) (Table 8)",
    "max": "soft target = S_t / batch max of S_t (Table 8)",
    "mean": "soft target = S_t / batch mean of S_t (Table 8)",
    "teacher": "soft target = the teacher's probability of the target class (Table 8)",
    "ema": "soft target = the target probability of the EMA copy of the student (Table 15, S2)",
}


def zipf_values(num_classes: int, target_rank: int = 1) -> list[float]:
    """The Zipf soft labels of the C - 1 non-target classes in rank order, when the target holds ``target_rank``
    among all C classes: ``1 / r`` for every other rank r, renormalised to sum to 1."""
    weights = [1.0 / rank for rank in range(1, num_classes + 1) if rank != target_rank]
    return [weight / sum(weights) for weight in weights]


def explanation(num_classes: int, shown: int = 3, target_soft_label: str = "squared") -> str:
    """``EXPLANATION`` filled in for ``num_classes`` classes, the top ``shown`` non-targets and the soft target rule."""
    values = ", ".join(f"{value:.3f}" for value in zipf_values(num_classes)[:shown])
    target = TARGET_RULES[target_soft_label]
    return EXPLANATION.format(target=target, classes=num_classes, others=num_classes - 1, values=values, shown=shown)


def soft_label_report(
    student: nn.Module,
    method: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    class_names: Sequence[str],
    *,
    layer: str | int = "mid",
    top_k: int = 3,
    teacher_logits: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """USKD soft labels of each image: its target value and its ``top_k`` non-target classes.

    Args:
        student: the trained student.
        method: its USKD method (its weak head, ``rank``, ``target_soft_label`` and ``batch_mean_group`` are used).
        images: (N, ...) one batch, on the student's device.
        targets: (N,) class indices.
        class_names: C names, indexed by class.
        layer: the student layer the weak head reads (as in training).
        top_k: how many non-target classes to list.
        teacher_logits: (N, C), for a method whose soft target comes from another model
            (``method.teacher_source``: the teacher, or the EMA copy of the student).

    Returns:
        One dict per image: ``index``, ``num_classes``, ``target``, ``target_name``, ``target_value`` (Eq. 6),
        ``prediction``, ``prediction_name``, ``student_target_prob`` (S_t), and ``non_target``: a list of ``top_k``
        ``{"class", "name", "value"}`` sorted by value, from the Zipf distribution over the non-target classes
        (Eq. 9-10; it sums to 1 over them).
    """
    if targets.dim() != 1:
        raise ValueError(f"targets: expected class indices of shape (N,), got shape {tuple(targets.shape)}")
    if getattr(method, "name", None) != "uskd":
        raise ValueError(f"method: soft labels need the USKD method, got {type(method).__name__}")
    if method.student_output is None and method.rank != "final":
        raise ValueError(
            "method: this USKD has no weak head (beta = 0 and mu = 0), so it ranks no non-target classes; "
            "its soft labels have no non-target part to show"
        )
    num_classes = method.num_classes
    if len(class_names) != num_classes:
        raise ValueError(f"class_names: expected {num_classes} names (one per class), got {len(class_names)}")
    if not 1 <= top_k < num_classes:
        raise ValueError(f"top_k: must be in [1, {num_classes - 1}], got {top_k}")

    modes = {module: module.training for module in (student, method)}
    student.eval()
    method.eval()
    try:
        with torch.no_grad():
            out = forward_student(student, images, method.student_output, layer=layer)
            logits = out.logits
            weak_logits = method.weak_logits(out.feature) if method.student_output is not None else None
            soft = uskd_soft_labels(
                logits, weak_logits, targets, teacher_logits if method.teacher_source is not None else None,
                rank=method.rank, target_soft_label=method.target_soft_label,
                batch_mean_group=method.batch_mean_group,
            )  # fmt: skip
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
                "target_soft_label": method.target_soft_label,
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

        text = explanation(num_classes, target_soft_label=report[0].get("target_soft_label", "squared"))
        figure.text(0.01, 0.005, textwrap.fill(text, 120), fontsize=7, va="bottom")
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

    The student and its weak head are rebuilt from the checkpoint (for ``method.target_soft_label=ema`` also the EMA
    copy of the student it saved; for ``teacher`` the teacher, which ``overrides`` must name:
    ``model.teacher=NAME model.teacher_checkpoint=PATH``); the report is computed on the first ``batch_size``
    validation images (the soft target uses batch statistics) and keeps the first image of each class in
    ``class_names``, or else the first ``num_images`` images. ``overrides`` adjust the checkpoint's config, e.g.
    ``data.root=DIR``.
    """
    from unikd._checkpoint import load_checkpoint
    from unikd._errors import UnikdError
    from unikd.config import config_for_checkpoint
    from unikd.methods import METHODS, create_method
    from unikd.models import feature_dim
    from unikd.train import student_for_evaluation

    if num_images < 1:
        raise UnikdError(f"--num-images: must be at least 1, got {num_images}")
    state = load_checkpoint(checkpoint, required=("model_name", "num_classes", "model", "config", "method"))
    stored = state["config"].get("method") if isinstance(state["config"], dict) else None
    stored_name = stored.get("name") if isinstance(stored, dict) else None
    if stored_name != "uskd":
        raise UnikdError(f"{checkpoint}: soft labels need a USKD run, this one was trained with {stored_name!r}")
    cfg = config_for_checkpoint(state["config"], overrides, keep_method=True)
    params = cfg.method.params
    student_output = METHODS["uskd"].student_output_for(params)
    if student_output is None and params["rank"] != "final":
        raise UnikdError(
            f"{checkpoint}: this USKD run had no weak head (method.beta=0, method.mu=0), so it trained no non-target "
            "soft labels to show"
        )
    bundle, student = student_for_evaluation(state, cfg, checkpoint)
    dim = feature_dim(student, cfg.model.feature_layer) if student_output is not None else None
    method = create_method("uskd", state["num_classes"], dim, **params)
    method.load_state_dict(state["method"])

    count = min(batch_size, len(bundle.val))
    images = torch.stack([bundle.val[i][0] for i in range(count)])
    targets = torch.tensor([int(bundle.val[i][1]) for i in range(count)])
    teacher_logits = None
    if method.teacher_source is not None:
        source = _soft_target_model(method.teacher_source, state, cfg, bundle, checkpoint)
        with torch.no_grad():
            teacher_logits = source.eval()(images)
    report = soft_label_report(
        student, method, images, targets, bundle.class_names, layer=cfg.model.feature_layer,
        teacher_logits=teacher_logits,
    )  # fmt: skip
    if class_names is None:
        chosen = report[:num_images]
    else:
        unknown = [name for name in class_names if name not in bundle.class_names]
        if unknown:
            raise UnikdError(f"class names {unknown} are not classes of {cfg.data.name}: {list(bundle.class_names)}")
        chosen = [next(e for e in report if e["target_name"] == name) for name in class_names]
    save_soft_label_report(chosen, images, out_dir, num_classes=bundle.num_classes)
    return chosen


def _soft_target_model(source: str, state: dict, cfg, bundle, checkpoint: str | Path) -> nn.Module:
    """The model whose target probability a ``teacher_source`` run trained on: the EMA copy of the student saved in
    the checkpoint, or the teacher the overrides name."""
    from unikd._errors import UnikdError
    from unikd.train import student_from_checkpoint, teacher_from_config

    if source == "ema":
        if "ema" not in state:
            raise UnikdError(f"{checkpoint}: a target_soft_label=ema run, but the checkpoint holds no EMA weights")
        return student_from_checkpoint({**state, "model": state["ema"]}, cfg, bundle, checkpoint)
    return teacher_from_config(cfg.model, bundle.num_classes, bundle.in_chans)[0]
