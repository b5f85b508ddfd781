"""unikd.detection: distillation for object detection on torchvision's Faster R-CNN and Mask R-CNN.

    from unikd.detection import create_detector, TrainableDetector, load_detection_config, train_detector
    cfg = load_detection_config("configs/detection/mosaics_student.yaml", ["method.name=nkd", ...])
    train_detector(cfg)                                   # or: unikd detect train CONFIG [key=value ...]

One module per concept:

    config.py     the detection config (YAML + overrides, validated up front), on unikd.config's machinery
    models.py     create_detector: Faster/Mask R-CNN + FPN on any ResNet of unikd.models; backbone weights; teachers
    distill.py    TrainableDetector: torchvision's losses plus KD/DKD/NKD/WSLD on the RoI class logits
    data.py       COCO-format datasets (CocoDetection + transforms v2), checked up front
    evaluate.py   COCOeval (AP, AP50, AP75, AR, ...), gathered on rank 0 under DDP
    train.py      the trainer: SGD, warm-up + 1x/2x step schedules, AMP, DDP, checkpoints and resume
    mosaics.py    the Fashion-MNIST mosaics dataset generator
    bench.py      side-by-side benchmark profiles on the mosaics
    cli.py        ``unikd detect ...``

Nothing outside this package imports it (the classification code knows nothing of detection). Names are
re-exported lazily so that ``unikd --help`` does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DetectionConfig": "config",
    "load_detection_config": "config",
    "detection_config_from_dict": "config",
    "dump_detection_config": "config",
    "create_detector": "models",
    "create_backbone": "models",
    "load_backbone_weights": "models",
    "load_teacher_detector": "models",
    "DISTILLATION_METHODS": "distill",
    "TrainableDetector": "distill",
    "roi_distillation_loss": "distill",
    "build_detection_data": "data",
    "read_coco_annotations": "data",
    "evaluate_detector": "evaluate",
    "train_detector": "train",
    "evaluate_detection_checkpoint": "train",
    "make_mosaics": "mosaics",
    "run_detection_bench": "bench",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'unikd.detection' has no attribute {name!r}")
    return getattr(importlib.import_module(f"unikd.detection.{_EXPORTS[name]}"), name)
