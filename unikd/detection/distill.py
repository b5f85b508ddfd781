"""Distillation on the R-CNN box classifier of a torchvision Faster/Mask R-CNN, and the student's training losses.

    losses = TrainableDetector(student, "nkd", gamma=1.5)(images, targets, teacher)
    # {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", ["loss_mask"], "loss_nkd"}

One training step composes torchvision's own modules (no torchvision code is changed): the student's ``transform``
(normalise, resize, batch), ``backbone`` (ResNet + FPN), ``rpn``, then ``roi_heads.select_training_samples`` draws
the RoIs of the step (proposals plus ground-truth boxes, 25% foreground, each labelled with the class of the box it
overlaps at IoU >= 0.5, or background), and the box branch (``box_roi_pool`` -> ``box_head`` -> ``box_predictor``)
gives their (R, C + 1) class logits. torchvision's ``fastrcnn_loss`` (and ``maskrcnn_loss``) turn them into the
detector's losses exactly as ``model(images, targets)`` would. The distillation term then runs the frozen teacher's
backbone on the same transformed images and its box branch on the same RoIs, and applies a loss of
``unikd.losses`` (unchanged) to the two (R, C + 1) logit matrices:

    loss_<method> = weight * loss_fn(student_logits, teacher_logits, target)      (R RoIs of all images)

**Target.** The "target class" of a RoI is the label torchvision's sampler gave it: the matched ground-truth
category for a foreground RoI, and the background class (column 0, torchvision's convention) for a background RoI.
Background is an ordinary class of the (C + 1)-way softmax, as it is for ``loss_classifier``: for a background RoI,
NKD's target term distils the teacher's background probability and its normalised non-target term the teacher's
distribution over the C object classes (which objects the region resembles); DKD's TCKD/NCKD split the same way.
``rois="foreground"`` restricts the term to foreground RoIs instead. KD uses no target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, maskrcnn_loss

from unikd._errors import ConfigError
from unikd.losses import dkd_loss, kd_loss, nkd_loss, wsld_loss

__all__ = [
    "DISTILLATION_METHODS",
    "DistillationMethod",
    "TrainableDetector",
    "box_class_logits",
    "method_defaults",
    "roi_distillation_loss",
]


@dataclass(frozen=True)
class DistillationMethod:
    """A distillation term on RoI class logits: the loss function of ``unikd.losses`` and its detection defaults.

    ``hyperparameters`` are the loss function's keyword arguments with the defaults used for detection.
    """

    name: str
    loss_fn: Callable[..., torch.Tensor] | None = None
    hyperparameters: dict[str, float] = field(default_factory=dict)
    uses_target: bool = True

    @property
    def needs_teacher(self) -> bool:
        return self.loss_fn is not None


# Detection defaults. DKD: mdistiller's detection/ (Detectron2) setting, T=1, alpha=1, beta=0.25, no warm-up. NKD: the
# paper gives no detection hyper-parameters; its ImageNet setting (T=1, gamma=1.5). KD: T=1, the value DKD uses for
# RoIs (the temperature of the CIFAR setting, 4, flattens a (C + 1)-way RoI distribution dominated by background).
# WSLD: its ImageNet temperature 2. Every term is added with weight 1 to torchvision's unchanged losses.
DISTILLATION_METHODS: dict[str, DistillationMethod] = {
    method.name: method
    for method in (
        DistillationMethod("baseline"),
        DistillationMethod("kd", kd_loss, {"temperature": 1.0}, uses_target=False),
        DistillationMethod("dkd", dkd_loss, {"temperature": 1.0, "alpha": 1.0, "beta": 0.25}),
        DistillationMethod("nkd", nkd_loss, {"temperature": 1.0, "gamma": 1.5}),
        DistillationMethod("wsld", wsld_loss, {"temperature": 2.0}),
    )
}
ROI_CHOICES = ("all", "foreground")


def method_defaults(name: str) -> dict[str, Any]:
    """Every hyper-parameter of detection method ``name`` with its default: ``weight``, ``rois`` and the loss's."""
    if name not in DISTILLATION_METHODS:
        raise ConfigError(f"method.name: {name!r} is not one of {', '.join(sorted(DISTILLATION_METHODS))}")
    method = DISTILLATION_METHODS[name]
    if not method.needs_teacher:
        return {}
    return {"weight": 1.0, "rois": "all", **method.hyperparameters}


def roi_distillation_loss(
    name: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: float = 1.0,
    rois: str = "all",
    **hyperparameters: float,
) -> torch.Tensor:
    """``weight * loss_fn(student_logits, teacher_logits, target)`` over the chosen RoIs (a scalar); the loss's
    ``hyperparameters`` default to the method's detection defaults (``DISTILLATION_METHODS``).

    Args:
        name: a distillation method of ``DISTILLATION_METHODS`` other than ``baseline``.
        student_logits, teacher_logits: (R, C + 1) RoI class logits, column 0 = background.
        target: (R,) the sampler's labels, 0 = background (see the module docstring).
        rois: ``"all"`` RoIs, or ``"foreground"`` only (target > 0); no foreground RoI gives a zero loss.
    """
    method = DISTILLATION_METHODS[name]
    if rois == "foreground":
        keep = target > 0
        if not bool(keep.any()):
            return student_logits.sum() * 0.0
        student_logits, teacher_logits, target = student_logits[keep], teacher_logits[keep], target[keep]
    elif rois != "all":
        raise ConfigError(f"method.rois: {rois!r} is not one of {', '.join(ROI_CHOICES)}")
    arguments = (student_logits, teacher_logits, target) if method.uses_target else (student_logits, teacher_logits)
    return weight * method.loss_fn(*arguments, **{**method.hyperparameters, **hyperparameters})


def box_class_logits(
    roi_heads: RoIHeads,
    features: dict[str, torch.Tensor],
    rois: list[torch.Tensor],
    image_sizes: list[tuple[int, int]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The box branch on given RoIs: ((R, C + 1) class logits, (R, 4 (C + 1)) box regression), R over all images."""
    box_features = roi_heads.box_head(roi_heads.box_roi_pool(features, rois, image_sizes))
    return roi_heads.box_predictor(box_features)


class TrainableDetector(nn.Module):
    """The student detector and its distillation term: what the optimizer and DDP see (the teacher never is).

    ``forward(images, targets, teacher)`` returns the named training losses: torchvision's ``loss_objectness``,
    ``loss_rpn_box_reg``, ``loss_classifier``, ``loss_box_reg`` (and ``loss_mask`` for Mask R-CNN), computed as
    ``student(images, targets)`` computes them, plus ``loss_<method>`` when the method distils. The student must
    be in training mode; the teacher is frozen and in eval mode.
    """

    def __init__(self, student: nn.Module, method: str = "baseline", **params: Any) -> None:
        super().__init__()
        if method not in DISTILLATION_METHODS:
            raise ConfigError(f"method.name: {method!r} is not one of {', '.join(sorted(DISTILLATION_METHODS))}")
        unknown = sorted(set(params) - set(method_defaults(method)))
        if unknown:
            raise ConfigError(f"method: unknown hyper-parameters {unknown} for method '{method}'")
        self.student = student
        self.method = method
        self.params = {**method_defaults(method), **params}

    @property
    def needs_teacher(self) -> bool:
        return DISTILLATION_METHODS[self.method].needs_teacher

    def forward(
        self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]], teacher: nn.Module | None = None
    ) -> dict[str, torch.Tensor]:
        """Args: images, (3, H_i, W_i) floats in [0, 1]; targets, per image ``boxes`` (K_i, 4) xyxy float,
        ``labels`` (K_i,) int64 in 1..C (and ``masks`` (K_i, H_i, W_i) uint8 for Mask R-CNN); teacher, the frozen
        teacher detector when the method distils."""
        if self.needs_teacher and teacher is None:
            raise ValueError(f"method '{self.method}' needs the teacher detector (model.teacher.checkpoint)")
        student = self.student
        image_list, targets = student.transform(images, targets)  # normalised, resized, padded into one batch
        features = student.backbone(image_list.tensors)
        proposals, losses = student.rpn(image_list, features, targets)
        roi_heads = student.roi_heads
        rois, matched_idxs, labels, regression_targets = roi_heads.select_training_samples(proposals, targets)
        class_logits, box_regression = box_class_logits(roi_heads, features, rois, image_list.image_sizes)
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        losses = {**losses, "loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        if roi_heads.has_mask():
            losses["loss_mask"] = _mask_loss(roi_heads, features, rois, matched_idxs, labels, targets, image_list)
        if self.needs_teacher:
            with torch.no_grad():
                teacher_features = teacher.backbone(image_list.tensors)
                teacher_logits, _ = box_class_logits(teacher.roi_heads, teacher_features, rois, image_list.image_sizes)
            losses[f"loss_{self.method}"] = roi_distillation_loss(
                self.method, class_logits, teacher_logits.float(), torch.cat(labels), **self.params
            )
        return losses


def _mask_loss(roi_heads, features, rois, matched_idxs, labels, targets, image_list) -> torch.Tensor:
    """torchvision's mask branch in training: the foreground RoIs only, then ``maskrcnn_loss``."""
    positive = [torch.where(image_labels > 0)[0] for image_labels in labels]
    mask_rois = [image_rois[index] for image_rois, index in zip(rois, positive)]
    mask_features = roi_heads.mask_head(roi_heads.mask_roi_pool(features, mask_rois, image_list.image_sizes))
    mask_logits = roi_heads.mask_predictor(mask_features)
    return maskrcnn_loss(
        mask_logits,
        mask_rois,
        [target["masks"] for target in targets],
        [target["labels"] for target in targets],
        [image_matched[index] for image_matched, index in zip(matched_idxs, positive)],
    )
