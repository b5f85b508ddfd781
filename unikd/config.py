"""Run configuration: typed dataclasses, YAML files, ``key=value`` overrides, and up-front validation.

    cfg = load_config("configs/fmnist_uskd.yaml", ["train.epochs=2", "optim.lr=0.05"])
    print(dump_config(cfg))

A config has the sections ``data``, ``model``, ``method``, ``optim``, ``schedule``, ``train`` and the key
``output_dir``. Everything is checked before any work starts, and every error is a one-line ``ConfigError`` that
starts with the key path, e.g. ``train.epoch: unknown key (did you mean 'train.epochs'?)``. The ``method`` section is
flat in YAML (``{name: uskd, alpha: 0.1}``) and held as ``MethodConfig(name, params)``; its keys are checked against
``unikd.methods.method_defaults(name)`` and the resolved ``params`` hold every hyper-parameter of the method.

The machinery is schema-agnostic and public, for other configs (``unikd.detection.config``): ``read_config_file``
(safe YAML, one-line errors), ``build_config(schema, raw, overrides, ...)`` (typed sections, overrides, unknown keys
refused), ``parse_method_section`` (the flat method section against a registry), ``option`` (a field's choices and
range), ``config_to_dict`` / ``dump_config`` / ``save_config``, and the messages ``unknown_key`` / ``not_one_of``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import itertools
import json
import math
import os
import re
import types
import typing
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from unikd._errors import ConfigError, UnikdError

DATASETS = ("cifar10", "cifar100", "fashion_mnist", "mnist", "imagefolder", "fake")
# Channels of each dataset's own images (data.channels=3 repeats a grayscale one for RGB models).
NATIVE_CHANNELS = {"cifar10": 3, "cifar100": 3, "fashion_mnist": 1, "mnist": 1, "imagefolder": 3, "fake": 3}
# Class counts known without reading the data (fake: data.num_classes or 10; an ImageFolder's come from its folders).
_KNOWN_CLASSES = {"cifar10": 10, "cifar100": 100, "fashion_mnist": 10, "mnist": 10, "fake": 10}
# The namespaces of unikd.models (NAMESPACES, tested equal): its own three and the names mdistiller and mmpretrain use.
MODEL_PREFIXES = ("cifar/", "timm/", "tv/", "mdistiller/", "mmpretrain/")
# unikd.models.FORMATS (tested equal): how a weights file is laid out, detected ("auto") or named.
WEIGHT_FORMATS = ("auto", "native", "mdistiller", "mmpretrain")
EVAL_INTERPOLATIONS = ("auto", "bilinear", "bicubic")
# Models whose reference recipes resize evaluation images bicubically (mmpretrain's imagenet_bs64_swin_224 pipeline of
# the DeiT / Swin configs, timm's pretrained configs); the others' (mmpretrain's CNN configs, torchvision's
# references) resize bilinearly. Matched against the start of the model's canonical name after its namespace.
_BICUBIC_EVAL_MODELS = ("vit", "deit", "swin")
# Set from the dataset by the trainer; giving them in *_kwargs could only disagree with it.
_DERIVED_MODEL_KWARGS = ("num_classes", "in_chans")
# Names users type for a choice that spelling distance would get wrong (difflib offers 'cpu' for 'gpu').
_SYNONYMS = {"gpu": "cuda", "fp32": "none", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}

# Keys that may differ between a run and its --resume (README, "The trainer"): where the data and the outputs live,
# how fast data loads, how long to train, and what is logged; and the file the student was initialised from, which a
# resume does not read (the student comes from last.pt). Any other difference is refused.
SAFE_TO_CHANGE_ON_RESUME = (
    "output_dir",
    "model.student_checkpoint",
    "data.root",
    "data.download",
    "data.num_workers",
    "data.pin_memory",
    "train.epochs",
    "train.device",
    "train.eval_every",
    "train.eval_batch_size",
    "train.log_every",
    "train.progress",
    "train.teacher_cache",
    "train.teacher_cache_verify",
    "train.tensorboard",
)
# What a checkpoint's stored config may set when the checkpoint is evaluated (unikd eval, softlabels): what the
# student is and the dataset it was trained on, never downloads, workers, batch sizes, devices or subsets.
_STORED_KEYS_FOR_EVAL = {
    "data": ("name", "root", "num_classes", "img_size", "channels", "eval_interpolation", "eval_crop_pct"),
    "model": ("student", "student_kwargs", "feature_layer"),
    "method": None,  # every hyper-parameter (soft labels rebuild USKD's weak head); checked like any config
}
# Model keyword arguments a stored config may not pass when a checkpoint is evaluated: they fetch or read files.
_FETCHING_MODEL_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")
_MAX_SEED = 2**32 - 1  # NumPy's legacy seeding takes 32 bits
_SECTIONS = "data, model, ..."  # named in the error for a config that is not a mapping
T = TypeVar("T")

__all__ = [
    "DATASETS",
    "NATIVE_CHANNELS",
    "SAFE_TO_CHANGE_ON_RESUME",
    "Config",
    "ConfigError",
    "DataConfig",
    "MethodConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "build_config",
    "check_teacher_num_classes",
    "config_changes",
    "config_for_checkpoint",
    "config_for_weights",
    "config_from_dict",
    "config_to_dict",
    "dataset_channels",
    "dump_config",
    "load_config",
    "not_one_of",
    "option",
    "parse_method_section",
    "read_config_file",
    "save_config",
    "unknown_key",
]


def option(
    default: Any,
    *,
    choices: Iterable[Any] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    positive: bool = False,
) -> Any:
    """A dataclass field whose value must be one of ``choices``, in [``minimum``, ``maximum``], or ``> 0``."""
    metadata = {"choices": choices and tuple(choices), "minimum": minimum, "maximum": maximum, "positive": positive}
    return field(default=default, metadata=metadata)


@dataclass
class DataConfig:
    name: str = option("fashion_mnist", choices=DATASETS)
    root: str | None = None  # None: the dataset's default root, see unikd.data.dataset_root
    download: bool = False
    num_classes: int | None = option(None, minimum=2)  # None: from the dataset; a mismatch with it is an error
    img_size: int | None = option(None, minimum=1)  # None: 32 cifar/fake, 28 mnist-like, 224 imagefolder
    augment: str = option("default", choices=("default", "randaugment", "none"))
    mixup: float = option(0.0, minimum=0)  # MixUp alpha, 0 = off
    cutmix: float = option(0.0, minimum=0)  # CutMix alpha, 0 = off
    train_subset: int | None = option(None, minimum=1)  # a fixed random subset of k images (quick runs, demo)
    val_subset: int | None = option(None, minimum=1)
    num_workers: int = option(2, minimum=0)
    pin_memory: bool = True  # only effective with CUDA
    channels: int | None = option(None, choices=(1, 3))  # None: the dataset's own; 3 repeats a grayscale channel
    # imagefolder evaluation: resize the short side to floor(img_size / eval_crop_pct), then centre-crop img_size
    # (224 / 0.875 = 256). "auto" resolves from model.student: bicubic for ViT/DeiT/Swin, else bilinear.
    eval_interpolation: str = option("auto", choices=EVAL_INTERPOLATIONS)
    eval_crop_pct: float = option(0.875, positive=True, maximum=1)


@dataclass
class ModelConfig:
    student: str = "cifar/smallcnn"
    student_kwargs: dict = field(default_factory=dict)  # to create_model; num_classes/in_chans come from the data
    student_checkpoint: str | None = None  # initialise the student from this weights file (fine-tuning)
    student_format: str = option("auto", choices=WEIGHT_FORMATS)  # its layout; auto: detected
    teacher: str | None = None
    teacher_kwargs: dict = field(default_factory=dict)
    teacher_checkpoint: str | None = None
    teacher_format: str = option("auto", choices=WEIGHT_FORMATS)
    # eval: the frozen teacher in eval mode (mdistiller, CRD); train: its BatchNorm normalises with batch statistics
    # and updates its running ones, as in cls_KD's ImageNet runs (still frozen: no gradient, no optimizer).
    teacher_mode: str = option("eval", choices=("eval", "train"))
    feature_layer: str | int = "mid"  # the intermediate feature USKD's weak head reads


@dataclass
class MethodConfig:
    name: str = "baseline"
    params: dict = field(default_factory=dict)  # the method's hyper-parameters, every one resolved


@dataclass
class OptimConfig:
    name: str = option("sgd", choices=("sgd", "adamw"))
    lr: float = option(0.1, positive=True)
    momentum: float = option(0.9, minimum=0)
    nesterov: bool = False
    weight_decay: float = option(5e-4, minimum=0)
    no_decay_norm_bias: bool = True  # no weight decay on norm/bias/1-d params, position embeddings, cls token
    clip_grad_norm: float | None = option(None, positive=True)


@dataclass
class ScheduleConfig:
    name: str = option("cosine", choices=("cosine", "multistep", "step", "constant"))
    warmup_epochs: float = option(0.0, minimum=0)
    warmup_lr_ratio: float = option(0.1, minimum=0)  # warm-up starts at lr * warmup_lr_ratio
    milestones: list[int] = field(default_factory=list, metadata={"minimum": 1})  # multistep, in epochs
    step_size: int = option(30, minimum=1)  # step, in epochs
    gamma: float = option(0.1, positive=True)
    min_lr: float = option(0.0, minimum=0)  # cosine floor


@dataclass
class TrainConfig:
    epochs: int = option(10, minimum=1)
    batch_size: int = option(128, minimum=1)  # global batch, split across DDP ranks
    eval_batch_size: int = option(256, minimum=1)
    amp: str = option("none", choices=("none", "bf16", "fp16"))
    compile: bool = False
    channels_last: bool = False
    seed: int = option(0, minimum=0, maximum=_MAX_SEED)
    deterministic: bool = False
    device: str = option("auto", choices=("auto", "cpu", "cuda"))
    max_steps_per_epoch: int | None = option(None, minimum=1)  # cap for quick runs and tests
    log_every: int = option(50, minimum=1)  # steps
    eval_every: int = option(1, minimum=1)  # epochs
    tensorboard: bool = True
    progress: bool = True  # progress bars (off in tests and CI)
    nan_check: bool = True
    # The EMA copy of the student a method may take its soft targets from (USKD target_soft_label=ema, Table 15's
    # S2): timm's ModelEmaV3. 0.9998 is timm's train.py default (--model-ema-decay); with ema_warmup the decay
    # starts low, 1 - (1 + step)^(-2/3) (timm's warm-up), so that early soft targets follow the student, up to it.
    ema_decay: float = option(0.9998, minimum=0, maximum=1)
    ema_warmup: bool = True
    # The teacher-logit cache (unikd._teacher_cache): a folder where the checkpoint teacher's logits of every
    # augmented training image are stored, so that another run of the same seed (another method, a grid point, a
    # resume) reads them instead of running the teacher. float32 is exact (a warm run is bit-identical to a live
    # teacher); float16 halves the space and rounds each logit (relative error <= 2**-11). teacher_cache_verify: the
    # first N cached batches of each epoch are re-computed by the live teacher and must match.
    teacher_cache: str | None = None
    teacher_cache_dtype: str = option("float32", choices=("float32", "float16"))
    teacher_cache_verify: int = option(0, minimum=0)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs/exp"


def load_config(path: str | os.PathLike | None, overrides: Iterable[str] = (), *, check_files: bool = True) -> Config:
    """Read a YAML config (``None``: the defaults), apply ``key=value`` overrides, validate, return a ``Config``.

    ``check_files`` also checks that ``model.teacher_checkpoint`` exists (off to re-read a saved config whose files
    may have moved, e.g. to evaluate a checkpoint). Raises ``ConfigError`` with a one-line message.
    """
    raw: dict = {}
    if path is not None:
        raw = read_config_file(path, sections=_SECTIONS)
        if raw.get("task") == "detection":
            raise ConfigError(
                f"{path}: a detection config (task: detection); run it with unikd detect train (check it with unikd "
                "detect config)"
            )
    return config_from_dict(raw, overrides, check_files=check_files)


def config_from_dict(raw: dict, overrides: Iterable[str] = (), *, check_files: bool = True) -> Config:
    """Build a validated ``Config`` from a plain dict (a parsed YAML file, or ``ckpt["config"]``) plus overrides."""
    cfg = build_config(Config, raw, overrides, sections=_SECTIONS, method=_method_config)
    _check_model(cfg, check_files=check_files)
    _check_schedule(cfg)
    return cfg


def config_to_dict(cfg: Any) -> dict:
    """The plain-dict form of the config ``cfg`` (the YAML form: the ``method`` section flat); ``config_from_dict``
    (or the schema's own, e.g. ``detection_config_from_dict``) inverts it. Any schema ``build_config`` builds."""
    raw = dataclasses.asdict(cfg)
    method = raw.pop("method")
    raw["method"] = {"name": method["name"], **method["params"]}
    return {key: raw[key] for key in (f.name for f in dataclasses.fields(cfg))}


def dump_config(cfg: Any) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML to ``path`` (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_config(cfg))


# ---- any schema: the machinery the classification and detection configs share ----------------------------------


def read_config_file(path: str | os.PathLike, *, sections: str) -> dict:
    """The mapping the YAML file ``path`` holds (``{}`` for an empty file), read safely (``yaml.SafeLoader``, a key
    given twice in one mapping refused). ``sections`` names the expected top-level keys in the error for a file that
    holds something else (e.g. ``"data, model, ..."``). Every problem is a one-line ``ConfigError`` naming the file:
    missing, unreadable, not UTF-8, invalid YAML (line and column), not a mapping."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); save it as UTF-8"
        ) from None
    try:
        raw = _load_yaml(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML{_yaml_error_location(error)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections ({sections}), got {_describe(raw)}")
    return raw


def build_config(
    schema: type[T], raw: Any, overrides: Iterable[str], *, sections: str, method: Callable[[dict], Any]
) -> T:
    """The dataclass config ``schema`` from the plain dict ``raw`` plus ``key=value`` overrides, every key checked.

    Each section is a dataclass whose fields' types and ``option`` metadata (choices, ranges) are checked, an unknown
    key refused with a did-you-mean; the ``method`` section is flat (``{name: nkd, temperature: 1.0}``) and becomes
    ``method(section)`` (see ``parse_method_section``). ``raw`` is not modified. Checks across sections are the
    caller's, on the returned config. ``sections`` as in ``read_config_file``.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping of sections ({sections}), got {_describe(raw)}")
    raw = _deepcopy_plain(raw)
    for override in overrides:
        _apply_override(raw, override)
    cfg = schema(**_convert_fields(schema, raw, path="", skip=("method",)))
    section = raw.get("method", {})
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(f"method: expected a mapping, got {_describe(section)}")
    cfg.method = method(section)
    return cfg


def parse_method_section(
    raw: dict,
    *,
    methods: Iterable[str],
    default: str,
    defaults_of: Callable[[str], dict],
    types_of: Callable[[str], dict],
) -> tuple[str, dict]:
    """The method's name and every hyper-parameter of the flat ``method`` section ``raw``: the name one of
    ``methods`` (``default`` when absent), each other key one of ``defaults_of(name)`` (the rest keep their
    defaults), each value converted to its type in ``types_of(name)`` (keys without one are kept as given)."""
    name = raw.get("name", default)
    if not isinstance(name, str):
        raise ConfigError(f"method.name: expected str, got {_describe(name)}")
    methods = tuple(methods)
    if name not in methods:
        raise ConfigError(not_one_of("method.name", name, methods))
    defaults, hints = defaults_of(name), types_of(name)
    params = dict(defaults)
    for key, value in raw.items():
        if key == "name":
            continue
        if key not in defaults:
            message = unknown_key(f"method.{key}", str(key), ["name", *defaults], "method")
            raise ConfigError(message.replace("unknown key", f"unknown key for method '{name}'", 1))
        hint = hints.get(key)
        params[key] = value if hint is None else _convert(value, hint, f"method.{key}")
    return name, params


def check_teacher_num_classes(model_cfg: ModelConfig, num_classes: int) -> None:
    """Raise ``ConfigError`` when ``model.teacher_checkpoint`` was trained for another number of classes.

    Reads the ``num_classes`` that a unikd training checkpoint or a unikd ``.safetensors`` export records, through
    the safe reader (nothing in the file is run; a safetensors file's header only); other files do not record it
    (loading the teacher then reports the classifier's shape mismatch). The trainer calls this once the dataset is
    built.
    """
    if model_cfg.teacher_checkpoint is None:
        return
    teacher_classes = _recorded_num_classes(model_cfg.teacher_checkpoint)
    if teacher_classes is not None and teacher_classes != num_classes:
        raise ConfigError(
            f"model.teacher_checkpoint: the teacher in {model_cfg.teacher_checkpoint} predicts {teacher_classes} "
            f"classes but the dataset has {num_classes}"
        )


def _recorded_num_classes(path: str) -> int | None:
    from unikd._serialization import safe_torch_load, serialization_of  # here: importing unikd.config loads no torch

    try:
        if serialization_of(path) == "safetensors":
            from safetensors import safe_open

            with safe_open(path, framework="pt") as file:
                recorded = (file.metadata() or {}).get("num_classes", "")
            return int(recorded) if recorded.isdigit() else None
        checkpoint = safe_torch_load(path)
    except Exception:  # not ours to diagnose: loading the teacher reports unreadable files with their own message
        return None
    recorded = checkpoint.get("num_classes") if isinstance(checkpoint, dict) else None
    return recorded if isinstance(recorded, int) and not isinstance(recorded, bool) else None


def dataset_channels(data_cfg: DataConfig) -> int:
    """The channel count of the images the models see: ``data.channels``, else the dataset's own."""
    return data_cfg.channels or NATIVE_CHANNELS[data_cfg.name]


def config_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """The values that differ between two configs in plain-dict form (``config_to_dict``), by key path:
    ``{"optim.lr": (0.1, 0.2)}``. Nested mappings (``model.student_kwargs``, ``method``) compare key by key; a key
    one side lacks shows as ``"<unset>"``."""
    old_leaves, new_leaves = _leaves(old), _leaves(new)
    keys = list(old_leaves) + [key for key in new_leaves if key not in old_leaves]
    unset = "<unset>"
    changes = {key: (old_leaves.get(key, unset), new_leaves.get(key, unset)) for key in keys}
    return {key: values for key, values in changes.items() if values[0] != values[1]}


def config_for_checkpoint(stored: Any, overrides: Iterable[str] = (), *, keep_method: bool = False) -> Config:
    """The config to evaluate a checkpoint with (``unikd eval``, ``unikd softlabels``).

    It starts from the defaults and takes from the checkpoint's stored config only what the student is and which
    dataset it was trained on (``data.name``, ``root``, ``num_classes``, ``img_size``, ``channels``, the evaluation
    resize; the student, its keyword arguments and feature layer; the method's hyper-parameters unless the method
    takes a trained teacher, which evaluation does not need: ``keep_method`` keeps them anyway, and the overrides must
    then name the teacher), then applies the user's ``overrides``. So a checkpoint from elsewhere cannot make
    evaluation download anything, create folders, fetch weights, or choose workers, batch sizes, the device or a
    validation subset: those are the defaults (no download, the full validation set) unless the command line says
    otherwise.
    """
    from unikd.methods import METHODS

    if not isinstance(stored, dict):
        raise ConfigError(f"the checkpoint's config: expected a mapping, got {type(stored).__name__}")
    raw: dict[str, Any] = {}
    for section, keys in _STORED_KEYS_FOR_EVAL.items():
        values = stored.get(section)
        if isinstance(values, dict):
            raw[section] = _deepcopy_plain(values if keys is None else {k: values[k] for k in keys if k in values})
    method = raw.get("method", {})
    method_cls = METHODS.get(method.get("name")) if isinstance(method.get("name"), str) else None
    if method_cls is None or (not keep_method and method_cls.teacher_source_for(method) == "checkpoint"):
        raw.pop("method", None)  # the teacher is not needed to evaluate its student
    student_kwargs = raw.get("model", {}).get("student_kwargs")
    if isinstance(student_kwargs, dict):
        raw["model"]["student_kwargs"] = {
            key: value for key, value in student_kwargs.items() if key not in _FETCHING_MODEL_KWARGS
        }
    return config_from_dict(raw, overrides, check_files=False)


def config_for_weights(model_name: str, overrides: Iterable[str] = (), *, layout: str = "auto") -> Config:
    """The config to evaluate the weights file of a ``model_name`` model with (``unikd eval --model``).

    The defaults plus ``overrides`` (``data.root=DIR``, ``data.name``, ``model.student_kwargs.*``, ...), with
    ``model.student = model_name`` and ``model.student_format = layout``. Without ``data.name`` the dataset is
    inferred from ``data.root``: ``train/`` or ``val/`` folders are an ImageNet-layout ``imagefolder``,
    ``cifar-10-batches-py/`` is ``cifar10`` and ``cifar-100-python/`` ``cifar100``; anything else (MNIST and
    Fashion-MNIST files look alike) needs ``data.name``.
    """
    raw: dict[str, Any] = {}
    for override in overrides:
        _apply_override(raw, override)
    raw.setdefault("model", {})
    if isinstance(raw["model"], dict):
        raw["model"].update(student=model_name, student_format=layout)
    data = raw.setdefault("data", {})
    if isinstance(data, dict) and data.get("name") is None:
        data["name"] = _infer_dataset(data.get("root"))
    return config_from_dict(raw, check_files=False)


def _infer_dataset(root: Any) -> str:
    if root is None:
        raise ConfigError(
            "data.name: which dataset? pass --data ROOT (an ImageNet-layout or CIFAR folder is recognised) or "
            f"data.name=... (one of {', '.join(DATASETS)})"
        )
    folder = Path(str(root)).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"data.root: no such folder: {root}")
    if (folder / "train").is_dir() or (folder / "val").is_dir():
        return "imagefolder"
    for name, marker in (("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")):
        if (folder / marker).is_dir():
            return name
    raise ConfigError(
        f"data.name: cannot tell which dataset {root} holds (no train/ or val/ folder of an ImageNet layout, no "
        "cifar-10-batches-py/ or cifar-100-python/); pass data.name=... (e.g. data.name=fashion_mnist)"
    )


# ---- validation -------------------------------------------------------------------------------------------------


def _convert_fields(cls: type, raw: Any, path: str, skip: tuple[str, ...] = ()) -> dict:
    """Check ``raw`` (a mapping for dataclass ``cls`` at ``path``) and return the converted constructor kwargs."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping, got {_describe(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        key_path = _join(path, key)
        if key not in fields:
            raise ConfigError(unknown_key(key_path, str(key), list(fields), path))
        if key in skip:
            continue
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = hints[key](**_convert_fields(hints[key], value, key_path))
        else:
            kwargs[key] = _check_value(_convert(value, hints[key], key_path), fields[key].metadata, key_path)
    return kwargs


def _convert(value: Any, hint: Any, path: str) -> Any:
    """Return ``value`` as type ``hint`` (int, float, bool, str, dict, list[int], unions with None, Literal).

    Floats must be finite. A ``Literal`` converts to the type of its choices; which choice is the caller's check.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        kinds = {type(arg) for arg in args}
        return _convert(value, kinds.pop(), path) if len(kinds) == 1 else value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (arg for arg in args if arg is not type(None)):
            try:
                return _convert(value, arg, path)
            except ConfigError:
                continue
    elif origin is list:
        if isinstance(value, list):
            return [_convert(item, args[0], f"{path}[{index}]") for index, item in enumerate(value)]
    elif hint is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads exponents without a dot, e.g. 5e-4, as strings
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{path}: must be a finite number, got {number!r}")
            return number
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is dict:
        if isinstance(value, dict):
            return value
    elif isinstance(value, hint):
        return value
    raise ConfigError(f"{path}: expected {_type_name(hint)}, got {_describe(value)}")


def _check_value(value: Any, metadata: typing.Mapping, path: str) -> Any:
    choices, minimum, positive = metadata.get("choices"), metadata.get("minimum"), metadata.get("positive")
    maximum = metadata.get("maximum")
    if choices and value is not None and value not in choices:
        raise ConfigError(not_one_of(path, value, choices))
    for item in value if isinstance(value, list) else [value]:
        if minimum is not None and item is not None and item < minimum:
            raise ConfigError(f"{path}: must be >= {minimum}, got {item!r}")
        if maximum is not None and item is not None and item > maximum:
            raise ConfigError(f"{path}: must be <= {maximum}, got {item!r}")
        if positive and item is not None and item <= 0:
            raise ConfigError(f"{path}: must be > 0, got {item!r}")
    return value


def _method_config(raw: dict) -> MethodConfig:
    """Check the flat ``method`` section against the registry and return the name plus every resolved param.

    Values convert to the types of the method's ``__init__`` annotations, then ``check_hyperparameters`` checks
    choices (``Literal``) and ranges, so that ``temperature=0`` fails here rather than at the first step.
    """
    from unikd.methods import METHODS, check_hyperparameters, hyperparameter_types, method_defaults  # imports torch

    name, params = parse_method_section(
        raw, methods=METHODS, default=MethodConfig.name, defaults_of=method_defaults, types_of=hyperparameter_types
    )
    check_hyperparameters(name, params)
    return MethodConfig(name=name, params=params)


def _check_model(cfg: Config, *, check_files: bool) -> None:
    from unikd.methods import METHODS

    model = cfg.model
    for key in ("student", "teacher"):
        name = getattr(model, key)
        if name is not None and not name.startswith(MODEL_PREFIXES):
            raise ConfigError(
                f"model.{key}: '{name}' must start with {', '.join(MODEL_PREFIXES)} (e.g. 'cifar/{name}')"
            )
    for key in ("student_kwargs", "teacher_kwargs"):
        for derived in _DERIVED_MODEL_KWARGS:
            if derived in getattr(model, key):
                raise ConfigError(
                    f"model.{key}.{derived}: set from the dataset, remove it (data.num_classes checks it)"
                )
    native = NATIVE_CHANNELS[cfg.data.name]
    if cfg.data.channels not in (None, native, 3):
        raise ConfigError(
            f"data.channels: {cfg.data.name} images have {native} channels; data.channels can only repeat a "
            "grayscale channel (data.channels=3)"
        )
    _check_model_builds(cfg, "student")
    if cfg.data.eval_interpolation == "auto":
        cfg.data.eval_interpolation = _eval_interpolation_of(model.student)
    if check_files and model.student_checkpoint is not None and not os.path.isfile(model.student_checkpoint):
        raise ConfigError(f"model.student_checkpoint: file not found: {model.student_checkpoint}")
    method = cfg.method.name
    source = METHODS[method].teacher_source_for(cfg.method.params)
    if source == "checkpoint":
        described = _describe_method(cfg)
        if model.teacher is None:
            raise ConfigError(
                f"model.teacher: {described} needs a teacher "
                "(e.g. model.teacher=cifar/resnet32x4 model.teacher_checkpoint=PATH)"
            )
        if model.teacher_checkpoint is None and not model.teacher_kwargs.get("pretrained"):
            raise ConfigError(
                f"model.teacher_checkpoint: {described} needs the teacher's trained weights "
                "(set model.teacher_checkpoint=PATH, or model.teacher_kwargs.pretrained=true for a timm model)"
            )
        if check_files and model.teacher_checkpoint is not None and not os.path.isfile(model.teacher_checkpoint):
            raise ConfigError(f"model.teacher_checkpoint: file not found: {model.teacher_checkpoint}")
        _check_model_builds(cfg, "teacher")
        classes = cfg.data.num_classes or _KNOWN_CLASSES.get(cfg.data.name)
        if check_files and classes is not None:  # else the trainer checks it once the dataset is read
            check_teacher_num_classes(model, classes)
    elif model.teacher is not None or model.teacher_checkpoint is not None:
        own = " (its soft targets come from an EMA copy of the student)" if source == "ema" else ""
        warnings.warn(f"model.teacher: method '{method}' does not use a teacher{own}; ignoring it", stacklevel=3)
    if source == "ema" and cfg.train.ema_decay >= 1:
        raise ConfigError(
            f"train.ema_decay: must be < 1 (1 would keep the student's initial weights), got {cfg.train.ema_decay}"
        )


def _describe_method(cfg: Config) -> str:
    """``method 'kd'``, or for a method that takes a teacher only with some hyper-parameters the ones that make it
    do so: ``method 'uskd' with method.target_soft_label=teacher``."""
    from unikd.methods import METHODS, method_defaults

    cls, params = METHODS[cfg.method.name], cfg.method.params
    defaults = method_defaults(cfg.method.name)
    causes = [
        f"method.{key}={value}"
        for key, value in params.items()
        if value != defaults.get(key) and cls.teacher_source_for({**params, key: defaults.get(key)}) != "checkpoint"
    ]
    return f"method '{cfg.method.name}'" + (f" with {', '.join(causes)}" if causes else "")


def _eval_interpolation_of(model_name: str) -> str:
    """``data.eval_interpolation=auto`` for ``model_name``: bicubic for the ViT, DeiT and Swin families."""
    from unikd.models import resolve_model_name

    arch = resolve_model_name(model_name).partition("/")[2].lower()
    return "bicubic" if arch.startswith(_BICUBIC_EVAL_MODELS) else "bilinear"


def _check_model_builds(cfg: Config, role: str) -> None:
    """Build the student or teacher on the meta device (no memory, no weights, no download), so that an unknown model
    name or keyword argument, or a model that cannot take the data's channels, fails now rather than after the data
    is loaded."""
    from unikd.models import resolve_model_name

    name, kwargs = getattr(cfg.model, role), getattr(cfg.model, f"{role}_kwargs")
    channels = dataset_channels(cfg.data)
    canonical = name  # an alias (mmpretrain/shufflenet-v2-1x_16xb64_in1k) is the model it names (tv/...)
    with contextlib.suppress(UnikdError):  # an unknown name: the build below says so
        canonical = resolve_model_name(name)
    if canonical.startswith("tv/") and channels != 3:
        raise ConfigError(
            f"model.{role}: torchvision models take 3-channel images and {cfg.data.name} has {channels}; set "
            "data.channels=3 to repeat its grayscale channel"
        )
    kwargs = {key: value for key, value in kwargs.items() if key != "pretrained"}  # weights are not needed to check
    try:
        problem = _cached_build_problem(name, json.dumps(kwargs, sort_keys=True), channels)
    except TypeError:  # a value JSON cannot hold (a YAML date): check without the cache
        problem = _model_build_problem(name, kwargs, channels)
    if problem is None:
        return
    unexpected = re.search(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'", problem)
    if unexpected:
        raise ConfigError(f"model.{role}_kwargs.{unexpected[2]}: {name} ({unexpected[1]}) takes no such argument")
    raise ConfigError(f"model.{role}: {problem}")


@functools.lru_cache(maxsize=256)
def _cached_build_problem(name: str, kwargs_json: str, in_chans: int) -> str | None:
    return _model_build_problem(name, json.loads(kwargs_json), in_chans)


def _model_build_problem(name: str, kwargs: dict, in_chans: int) -> str | None:
    """None when ``name`` builds with ``kwargs`` and ``in_chans``, else why not (one line)."""
    import torch

    from unikd.models import create_model

    try:
        with torch.device("meta"):
            create_model(name, 10, in_chans=in_chans, **kwargs)
        return None
    except UnikdError as error:  # ModelError: an unknown name, a keyword the constructor does not take
        return str(error)
    except Exception:  # an operation the meta device lacks: build it for real to tell a bad config from that
        pass
    try:
        create_model(name, 10, in_chans=in_chans, **kwargs)
    except Exception as error:
        return f"{name} cannot be built with {kwargs}: {type(error).__name__}: {error}"
    return None


def _check_schedule(cfg: Config) -> None:
    milestones = cfg.schedule.milestones
    if any(later <= earlier for earlier, later in itertools.pairwise(milestones)):
        raise ConfigError(f"schedule.milestones: must be increasing, got {milestones}")
    if cfg.schedule.warmup_epochs > cfg.train.epochs:
        raise ConfigError(
            f"schedule.warmup_epochs: {cfg.schedule.warmup_epochs:g} is more than train.epochs ({cfg.train.epochs})"
        )


# ---- YAML -------------------------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in first_line
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    problem=f"duplicate key {key!r} (first at line {first_line[key]}); merge the two, the second "
                    "would silently replace the first",
                    problem_mark=key_node.start_mark,
                )
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)


# ---- overrides --------------------------------------------------------------------------------------------------


def _apply_override(raw: dict, override: str) -> None:
    """Set ``raw[a][b] = value`` for ``a.b=value``; the value is parsed as YAML (``0.1``, ``[30,60]``, ``null``)."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{override}': expected key=value, e.g. train.epochs=5")
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override '{override}': empty name in key '{key}'")
    try:
        value = _load_yaml(text) if text.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"{key}: cannot parse value '{text}'{_yaml_error_location(error)}") from None
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            parent = ".".join(parts[: depth + 1])
            raise ConfigError(f"{key}: cannot set a key inside {parent}, which is {_describe(child)}")
        node = child
    node[parts[-1]] = value


# ---- messages ---------------------------------------------------------------------------------------------------


def unknown_key(key_path: str, key: str, valid: list[str], parent: str) -> str:
    """The message for the unknown key ``key`` at ``key_path`` (under ``parent``): a did-you-mean when one of
    ``valid`` is close, else the valid keys."""
    close = _closest(key, valid)
    if close:
        return f"{key_path}: unknown key (did you mean '{_join(parent, close)}'?)"
    return f"{key_path}: unknown key (valid keys: {', '.join(sorted(valid))})"


def not_one_of(path: str, value: Any, choices: Iterable[Any]) -> str:
    """The message for ``value`` at ``path`` not being one of ``choices``, with a did-you-mean when one is close."""
    choices = sorted(choices, key=str)
    message = f"{path}: {value!r} is not one of {', '.join(map(str, choices))}"
    close = _closest(str(value), choices)
    return f"{message} (did you mean '{close}'?)" if close else message


def _closest(word: str, choices: list[str]) -> str | None:
    """The likely intended choice: a known synonym, a close spelling, or the only choice ``word`` begins."""
    if _SYNONYMS.get(word.lower()) in choices:
        return _SYNONYMS[word.lower()]
    choices = [str(choice) for choice in choices]
    close = difflib.get_close_matches(word, choices, n=1)
    starting = [choice for choice in choices if word and choice.startswith(word)]
    return close[0] if close else starting[0] if len(starting) == 1 else None


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if arg is type(None) else _type_name(arg) for arg in args)
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    return "a mapping" if hint is dict else hint.__name__


def _describe(value: Any) -> str:
    return "null" if value is None else repr(value)


def _join(parent: str, key: Any) -> str:
    return f"{parent}.{key}" if parent else str(key)


def _yaml_error_location(error: yaml.YAMLError) -> str:
    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where}: {problem}" if problem else where


def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value}
    leaves = {}
    for key, item in value.items():
        leaves |= _leaves(item, _join(prefix, key))
    return leaves


def _deepcopy_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _deepcopy_plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_deepcopy_plain(item) for item in value]
    return value
