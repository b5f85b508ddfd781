"""Detection run configuration: typed dataclasses, YAML files, ``key=value`` overrides, validated up front.

    cfg = load_detection_config("configs/detection/mosaics_nkd.yaml", ["train.batch_size=4"])
    print(dump_detection_config(cfg))

The same machinery as ``unikd.config`` (``read_config_file``, ``build_config``, ``parse_method_section``,
``option``: safe YAML, typed sections, overrides, did-you-mean messages), other sections: ``task`` (always
``detection``: a detection config says so on its first line, which is how ``unikd detect`` tells a classification
config apart), ``data`` (COCO-format images + instances JSON), ``model`` (``student`` and ``teacher`` detectors),
``method`` (the distillation term on the R-CNN box classifier, flat like the classification ``method``), ``optim``,
``schedule`` (MMDetection's step schedules, in epochs or iterations), ``train`` and ``output_dir``. Errors are
one-line ``ConfigError``s that start with the key path.
"""

from __future__ import annotations

import inspect
import itertools
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from unikd._errors import ConfigError
from unikd.config import (
    MODEL_PREFIXES,
    MethodConfig,
    OptimConfig,
    build_config,
    config_to_dict,
    dump_config,
    not_one_of,
    option,
    parse_method_section,
    read_config_file,
    save_config,
    unknown_key,
)
from unikd.detection.distill import DISTILLATION_METHODS, method_defaults

TASK = "detection"
_SECTIONS = "task, data, model, ..."  # named in the error for a config that is not a mapping
DETECTOR_ARCHS = ("faster_rcnn", "mask_rcnn")
# Arguments of torchvision's FasterRCNN/MaskRCNN that the factory sets itself (from the keys of DetectorConfig), or
# that take modules, which a YAML file cannot give.
_FACTORY_SET_KWARGS = (
    "backbone",
    "num_classes",
    "min_size",
    "max_size",
    "image_mean",
    "image_std",
    "rpn_anchor_generator",
    "box_head",
    "box_predictor",
    "mask_head",
    "mask_predictor",
    "mask_roi_pool",
    "box_roi_pool",
    "rpn_head",
    "kwargs",
)

__all__ = [
    "TASK",
    "DetectionConfig",
    "DetectionDataConfig",
    "DetectionModelConfig",
    "DetectionOptimConfig",
    "DetectionScheduleConfig",
    "DetectionTrainConfig",
    "DetectorConfig",
    "TeacherConfig",
    "detection_config_from_dict",
    "detection_config_to_dict",
    "dump_detection_config",
    "load_detection_config",
    "resolve_path",
    "save_detection_config",
]


@dataclass
class DetectionDataConfig:
    root: str = "data/coco"  # the folder the four paths below are relative to (absolute paths are kept)
    train_images: str = "train2017"
    train_annotations: str = "annotations/instances_train2017.json"
    val_images: str = "val2017"
    val_annotations: str = "annotations/instances_val2017.json"
    # Shorter image side after resizing (torchvision's GeneralizedRCNNTransform); several values: one is drawn per
    # training batch (multi-scale training), evaluation uses the last. Longer side capped at max_size.
    min_size: list[int] = field(default_factory=lambda: [800], metadata={"minimum": 1})
    max_size: int = option(1333, minimum=1)
    hflip: float = option(0.5, minimum=0)  # probability of a horizontal flip (boxes and masks flip with the image)
    image_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # RGB, images scaled to [0, 1]
    image_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225], metadata={"positive": True})
    # Boxes that are empty or have no area inside their image: drop them (counted in a warning) or stop with an error.
    invalid_boxes: str = option("drop", choices=("drop", "error"))
    train_subset: int | None = option(None, minimum=1)  # a fixed random subset of k images (quick runs, tests)
    val_subset: int | None = option(None, minimum=1)
    num_workers: int = option(2, minimum=0)
    pin_memory: bool = True  # only effective with CUDA


@dataclass
class DetectorConfig:
    arch: str = option("faster_rcnn", choices=DETECTOR_ARCHS)
    backbone: str = "tv/resnet50"  # a ResNet of unikd.models: tv/resnet18/34/50/101, timm/resnet*, ...
    backbone_kwargs: dict = field(default_factory=dict)  # to unikd.models.create_model (e.g. timm's channels=...)
    backbone_weights: str | None = None  # any weights file unikd.models reads; None: random initialisation
    trainable_backbone_layers: int | None = option(None, minimum=0)  # 0-5; None: 3 with weights, else 5
    freeze_bn: bool | None = None  # FrozenBatchNorm2d in the backbone; None: with backbone_weights
    fpn_channels: int = option(256, minimum=1)
    representation_size: int = option(1024, minimum=1)  # width of the box head's two fully connected layers
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512], metadata={"minimum": 1})
    detector_kwargs: dict = field(default_factory=dict)  # more arguments of torchvision's FasterRCNN / MaskRCNN


@dataclass
class TeacherConfig(DetectorConfig):
    # arch / backbone None: as recorded in the checkpoint (a unikd detection checkpoint records its whole detector;
    # a plain state_dict file needs them, and the other keys, to describe the teacher).
    arch: str | None = None
    backbone: str | None = None
    checkpoint: str | None = None  # the trained teacher: a unikd detection checkpoint or a state_dict file


@dataclass
class DetectionModelConfig:
    student: DetectorConfig = field(default_factory=DetectorConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)  # used by the distillation methods only


@dataclass
class DetectionOptimConfig(OptimConfig):
    # MMDetection's Faster/Mask R-CNN recipe: SGD lr 0.02 for 16 images, momentum 0.9, weight decay 1e-4 everywhere.
    lr: float = option(0.02, positive=True)
    weight_decay: float = option(1e-4, minimum=0)
    no_decay_norm_bias: bool = False


@dataclass
class DetectionScheduleConfig:
    unit: str = option("epoch", choices=("epoch", "iter"))  # the unit of length, milestones and train.eval_every
    length: int = option(12, minimum=1)  # training length (MMDetection 1x: 12 epochs; 2x: 24)
    milestones: list[int] = field(default_factory=lambda: [8, 11], metadata={"minimum": 1})  # lr *= gamma at each
    gamma: float = option(0.1, positive=True)
    warmup_iters: int = option(500, minimum=0)  # linear warm-up, in iterations whatever the unit (MMDetection's)
    warmup_ratio: float = option(0.001, minimum=0)  # warm-up starts at lr * warmup_ratio


@dataclass
class DetectionTrainConfig:
    batch_size: int = option(16, minimum=1)  # global batch (images), split across DDP ranks
    eval_batch_size: int = option(8, minimum=1)
    amp: str = option("none", choices=("none", "bf16", "fp16"))
    seed: int = 0
    deterministic: bool = False
    device: str = option("auto", choices=("auto", "cpu", "cuda"))
    max_steps_per_epoch: int | None = option(None, minimum=1)  # cap for quick runs and tests
    log_every: int = option(50, minimum=1)  # steps
    eval_every: int = option(1, minimum=1)  # in schedule.unit: evaluate, then write last.pt (and best.pt)
    tensorboard: bool = True
    progress: bool = True
    nan_check: bool = True


@dataclass
class DetectionConfig:
    task: str = option(TASK, choices=(TASK,))
    data: DetectionDataConfig = field(default_factory=DetectionDataConfig)
    model: DetectionModelConfig = field(default_factory=DetectionModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: DetectionOptimConfig = field(default_factory=DetectionOptimConfig)
    schedule: DetectionScheduleConfig = field(default_factory=DetectionScheduleConfig)
    train: DetectionTrainConfig = field(default_factory=DetectionTrainConfig)
    output_dir: str = "runs/detection/exp"


def load_detection_config(
    path: str | os.PathLike | None, overrides: Iterable[str] = (), *, check_files: bool = True
) -> DetectionConfig:
    """Read a detection YAML config (``None``: the defaults), apply overrides, validate, return a ``DetectionConfig``.

    ``check_files`` also checks that the data files and the weights files named in the config exist (off to re-read
    a saved config whose files may have moved). Raises ``ConfigError`` with a one-line message.
    """
    raw: dict = {"task": TASK}
    if path is not None:
        raw = read_config_file(path, sections=_SECTIONS)
        if "task" not in raw:
            raise ConfigError(
                f"{path}: not a detection config (no 'task: detection' line); classification configs run with "
                "'unikd train', detection configs start with 'task: detection'"
            )
    return detection_config_from_dict(raw, overrides, check_files=check_files)


def detection_config_from_dict(
    raw: dict, overrides: Iterable[str] = (), *, check_files: bool = True
) -> DetectionConfig:
    """Build a validated ``DetectionConfig`` from a plain dict (parsed YAML, or ``checkpoint["config"]``)."""
    cfg = build_config(DetectionConfig, raw, overrides, sections=_SECTIONS, method=_method_config)
    _check_data(cfg, check_files=check_files)
    _check_model(cfg, check_files=check_files)
    _check_schedule(cfg)
    return cfg


# The plain-dict (YAML) form, ``method`` flat (``detection_config_from_dict`` inverts it), as YAML text, as a file:
# unikd.config's, which serve any schema.
detection_config_to_dict = config_to_dict
dump_detection_config = dump_config
save_detection_config = save_config


def resolve_path(data_cfg: DetectionDataConfig, relative: str) -> Path:
    """``data.root / relative`` (an absolute ``relative`` is returned as it is)."""
    return Path(data_cfg.root) / relative


# ---- validation -------------------------------------------------------------------------------------------------


def _method_config(raw: dict) -> MethodConfig:
    name, params = parse_method_section(
        raw,
        methods=DISTILLATION_METHODS,
        default=MethodConfig.name,
        defaults_of=method_defaults,
        types_of=lambda name: {key: type(value) for key, value in method_defaults(name).items()},
    )
    if params.get("rois", "all") not in ("all", "foreground"):
        raise ConfigError(not_one_of("method.rois", params["rois"], ("all", "foreground")))
    return MethodConfig(name=name, params=params)


def _check_data(cfg: DetectionConfig, *, check_files: bool) -> None:
    data = cfg.data
    if not data.min_size:
        raise ConfigError("data.min_size: give at least one size, e.g. [800]")
    for key in ("image_mean", "image_std"):
        if len(getattr(data, key)) != 3:
            raise ConfigError(f"data.{key}: expected 3 values (R, G, B), got {getattr(data, key)}")
    if data.hflip > 1:
        raise ConfigError(f"data.hflip: a probability must be <= 1, got {data.hflip}")
    if not check_files:
        return
    for key, is_file in (
        ("train_annotations", True),
        ("val_annotations", True),
        ("train_images", False),
        ("val_images", False),
    ):
        path = resolve_path(data, getattr(data, key))
        if not (path.is_file() if is_file else path.is_dir()):
            kind = "file" if is_file else "folder"
            raise ConfigError(
                f"data.{key}: {kind} not found: {path} (data.root={data.root}; make mosaics with 'unikd detect "
                "mosaics --out DIR' or point data.root at a COCO-format dataset)"
            )


def _check_model(cfg: DetectionConfig, *, check_files: bool) -> None:
    needs_teacher = DISTILLATION_METHODS[cfg.method.name].needs_teacher
    for role in ("student", "teacher"):
        detector = getattr(cfg.model, role)
        key = f"model.{role}"
        if detector.arch is not None and detector.arch not in DETECTOR_ARCHS:
            raise ConfigError(not_one_of(f"{key}.arch", detector.arch, DETECTOR_ARCHS))
        if detector.backbone is not None and not detector.backbone.startswith(MODEL_PREFIXES):
            raise ConfigError(
                f"{key}.backbone: '{detector.backbone}' must start with {', '.join(MODEL_PREFIXES)} "
                f"(e.g. 'tv/{detector.backbone}')"
            )
        if detector.trainable_backbone_layers is not None and detector.trainable_backbone_layers > 5:
            raise ConfigError(f"{key}.trainable_backbone_layers: must be 0-5, got {detector.trainable_backbone_layers}")
        if len(detector.anchor_sizes) != 5:
            raise ConfigError(
                f"{key}.anchor_sizes: one size per FPN level (4 stages + the pooled level), 5 values, "
                f"got {detector.anchor_sizes}"
            )
        _check_detector_kwargs(detector, key)
        weights = detector.backbone_weights
        if check_files and role == "student" and weights is not None and not os.path.isfile(weights):
            raise ConfigError(f"{key}.backbone_weights: file not found: {detector.backbone_weights}")
    teacher = cfg.model.teacher
    if needs_teacher:
        if teacher.checkpoint is None:
            raise ConfigError(
                f"model.teacher.checkpoint: method '{cfg.method.name}' needs the trained teacher detector "
                "(set model.teacher.checkpoint=PATH, e.g. a best.pt of 'unikd detect train')"
            )
        if check_files and not os.path.isfile(teacher.checkpoint):
            raise ConfigError(f"model.teacher.checkpoint: file not found: {teacher.checkpoint}")
    elif teacher.checkpoint is not None:
        warnings.warn(
            f"model.teacher: method '{cfg.method.name}' does not use a teacher; ignoring it", UserWarning, stacklevel=3
        )


def _check_detector_kwargs(detector: DetectorConfig, key: str) -> None:
    """``detector_kwargs`` must be arguments of torchvision's constructor that the factory does not set itself."""
    from torchvision.models.detection import FasterRCNN, MaskRCNN  # lazy: torchvision is heavy to import

    constructor = MaskRCNN if detector.arch == "mask_rcnn" else FasterRCNN
    valid = [name for name in inspect.signature(constructor.__init__).parameters if name != "self"]
    valid = [name for name in valid if name not in _FACTORY_SET_KWARGS]
    for name in detector.detector_kwargs:
        if name not in valid:
            message = unknown_key(f"{key}.detector_kwargs.{name}", str(name), valid, f"{key}.detector_kwargs")
            raise ConfigError(
                message.replace("unknown key", f"not an argument of torchvision's {constructor.__name__}")
            )


def _check_schedule(cfg: DetectionConfig) -> None:
    schedule = cfg.schedule
    milestones = schedule.milestones
    if any(later <= earlier for earlier, later in itertools.pairwise(milestones)):
        raise ConfigError(f"schedule.milestones: must be increasing, got {milestones}")
    if milestones and milestones[-1] >= schedule.length:
        raise ConfigError(
            f"schedule.milestones: {milestones[-1]} is not before the end of training (schedule.length="
            f"{schedule.length} {schedule.unit}s)"
        )
