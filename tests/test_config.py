"""Config schema: defaults, YAML + overrides, round trips, and every validation rule with its exact message."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Literal

import pytest
import torch
import yaml

from unikd import ConfigError, UnikdError
from unikd.config import (
    MODEL_PREFIXES,
    SAFE_TO_CHANGE_ON_RESUME,
    WEIGHT_FORMATS,
    Config,
    MethodConfig,
    ModelConfig,
    check_teacher_num_classes,
    config_changes,
    config_for_checkpoint,
    config_for_weights,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    save_config,
)
from unikd.methods import (
    HYPERPARAMETER_BOUNDS,
    METHODS,
    Bounds,
    Method,
    create_method,
    hyperparameter_types,
    method_defaults,
)
from unikd.models import FORMATS, NAMESPACES, export_state_dict

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
TEACHER = ["method.name=kd", "model.teacher=cifar/resnet20"]


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def _error(path: str | Path | None, overrides: list[str] = (), **kwargs) -> str:
    with pytest.raises(ConfigError) as error:
        load_config(path, overrides, **kwargs)
    return str(error.value)


def test_defaults():
    cfg = load_config(None)
    resolved = dataclasses.replace(Config().data, eval_interpolation="bilinear")  # "auto" for a CNN student
    assert dataclasses.replace(cfg, method=MethodConfig()) == dataclasses.replace(Config(), data=resolved)
    assert (cfg.data.name, cfg.data.root, cfg.model.student, cfg.method.name) == (
        "fashion_mnist",
        None,
        "cifar/smallcnn",
        "baseline",
    )
    assert (cfg.optim.name, cfg.optim.lr, cfg.schedule.name, cfg.train.epochs, cfg.output_dir) == (
        "sgd",
        0.1,
        "cosine",
        10,
        "runs/exp",
    )


def test_config_error_is_a_user_error_and_a_value_error():
    assert issubclass(ConfigError, UnikdError) and issubclass(ConfigError, ValueError)


def test_yaml_then_overrides(tmp_path):
    path = _yaml(
        tmp_path,
        "data: {name: cifar100, root: /data/c100}\n"
        "optim: {lr: 1, weight_decay: 5e-4}\n"  # YAML 1.1 reads 5e-4 as a string; a float field accepts it
        "train: {epochs: 240, batch_size: 64}\n"
        "output_dir: runs/a\n",
    )
    cfg = load_config(
        path,
        ["train.epochs=3", "schedule.milestones=[1,2]", "data.root=null", "model.student_kwargs.width=8"],
    )
    assert (cfg.data.name, cfg.data.root, cfg.train.epochs, cfg.train.batch_size) == ("cifar100", None, 3, 64)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float) and cfg.optim.weight_decay == 5e-4
    assert cfg.schedule.milestones == [1, 2] and cfg.model.student_kwargs == {"width": 8}
    assert cfg.output_dir == "runs/a"


def test_overrides_win_in_order_and_values_parse_as_yaml():
    cfg = load_config(None, ["train.seed=1", "train.seed=2", "output_dir=runs/x=y", "model.feature_layer=2"])
    assert cfg.train.seed == 2 and cfg.output_dir == "runs/x=y" and cfg.model.feature_layer == 2


def test_method_section_is_flat_and_resolved_with_every_default(tmp_path):
    cfg = load_config(_yaml(tmp_path, "method: {name: uskd, alpha: 0.1}\n"), ["method.mu=1"])
    assert cfg.method == MethodConfig("uskd", {**method_defaults("uskd"), "alpha": 0.1, "mu": 1.0})
    assert config_to_dict(cfg)["method"] == {"name": "uskd", **cfg.method.params}


def test_dump_and_save_round_trip(tmp_path):
    cfg = load_config(
        None, ["method.name=dkd", "model.teacher=cifar/resnet20", "model.teacher_checkpoint=t.pt"], check_files=False
    )
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert (tmp_path / "run" / "config.yaml").read_text() == dump_config(cfg)
    assert load_config(tmp_path / "run" / "config.yaml", check_files=False) == cfg
    assert config_from_dict(config_to_dict(cfg), check_files=False) == cfg
    assert list(yaml.safe_load(dump_config(cfg))) == [
        "data",
        "model",
        "method",
        "optim",
        "schedule",
        "train",
        "output_dir",
    ]


def test_empty_file_is_the_defaults(tmp_path):
    assert load_config(_yaml(tmp_path, "")) == load_config(None)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_shipped_configs_are_valid(path, tmp_path):
    teacher = tmp_path / "teacher.pt"
    teacher.touch()
    cfg = load_config(
        path, [f"model.teacher_checkpoint={teacher}"] if "teacher_checkpoint:" in path.read_text() else []
    )
    if path.name.startswith("fmnist_"):
        assert cfg.output_dir == f"runs/{path.stem}" and cfg.data.name == "fashion_mnist"


def test_every_method_loads_with_its_defaults():
    for name, cls in METHODS.items():
        overrides = [f"method.name={name}"]
        if cls.needs_teacher:
            overrides += ["model.teacher=timm/resnet18", "model.teacher_kwargs.pretrained=true"]
        assert load_config(None, overrides).method.params == method_defaults(name)


# ---- validation messages ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.epoch=3"], "train.epoch: unknown key (did you mean 'train.epochs'?)"),
        (["optimizer.lr=3"], "optimizer: unknown key (did you mean 'optim'?)"),
        (["data.nmae=x"], "data.nmae: unknown key (did you mean 'data.name'?)"),
        (
            ["train.zzz=1"],
            "train.zzz: unknown key (valid keys: amp, batch_size, channels_last, compile, deterministic, device, "
            "ema_decay, ema_warmup, epochs, eval_batch_size, eval_every, log_every, max_steps_per_epoch, nan_check, "
            "progress, seed, teacher_cache, teacher_cache_dtype, teacher_cache_verify, tensorboard)",
        ),
        (["train.epochs=ten"], "train.epochs: expected int, got 'ten'"),
        (["train.epochs=2.5"], "train.epochs: expected int, got 2.5"),
        (["train.epochs=null"], "train.epochs: expected int, got null"),
        (["train.amp=true"], "train.amp: expected str, got True"),
        (["train.compile=1"], "train.compile: expected bool, got 1"),
        (["optim.lr=fast"], "optim.lr: expected float, got 'fast'"),
        (["optim.clip_grad_norm=x"], "optim.clip_grad_norm: expected float or null, got 'x'"),
        (["model.feature_layer=[1]"], "model.feature_layer: expected str or int, got [1]"),
        (["model.student_kwargs=3"], "model.student_kwargs: expected a mapping, got 3"),
        (["schedule.milestones=30"], "schedule.milestones: expected a list of int, got 30"),
        (["schedule.milestones=[30,x]"], "schedule.milestones[1]: expected int, got 'x'"),
        (["train=5"], "train: expected a mapping, got 5"),
        (["output_dir=null"], "output_dir: expected str, got null"),
        (["optim.name=sgdd"], "optim.name: 'sgdd' is not one of adamw, sgd (did you mean 'sgd'?)"),
        (
            ["data.name=cifar"],
            "data.name: 'cifar' is not one of cifar10, cifar100, fake, fashion_mnist, imagefolder, mnist "
            "(did you mean 'cifar10'?)",
        ),
        (["schedule.name=poly"], "schedule.name: 'poly' is not one of constant, cosine, multistep, step"),
        (["train.amp=fp8"], "train.amp: 'fp8' is not one of bf16, fp16, none"),
        (["train.device=gpu"], "train.device: 'gpu' is not one of auto, cpu, cuda (did you mean 'cuda'?)"),
        (
            ["data.augment=rand"],
            "data.augment: 'rand' is not one of default, none, randaugment (did you mean 'randaugment'?)",
        ),
        (
            ["method.name=usk"],
            "method.name: 'usk' is not one of baseline, dkd, kd, ls, nkd, tfkd, uskd, wsld, zipf_ls "
            "(did you mean 'uskd'?)",
        ),
        (["method.name=3"], "method.name: expected str, got 3"),
        (["method=uskd"], "method: expected a mapping, got 'uskd'"),
        (
            ["method.name=uskd", "method.alph=1"],
            "method.alph: unknown key for method 'uskd' (did you mean 'method.alpha'?)",
        ),
        (["method.smoothing=0.1"], "method.smoothing: unknown key for method 'baseline' (valid keys: name)"),
        (["method.name=uskd", "method.mu=x"], "method.mu: expected float, got 'x'"),
        (["method.name=uskd", "method.rank=3"], "method.rank: expected str, got 3"),
        (["train.epochs=0"], "train.epochs: must be >= 1, got 0"),
        (["data.mixup=-0.2"], "data.mixup: must be >= 0, got -0.2"),
        (["data.num_classes=1"], "data.num_classes: must be >= 2, got 1"),
        (["data.train_subset=0"], "data.train_subset: must be >= 1, got 0"),
        (["optim.lr=0"], "optim.lr: must be > 0, got 0.0"),
        (["optim.clip_grad_norm=-1"], "optim.clip_grad_norm: must be > 0, got -1.0"),
        (["schedule.milestones=[0,5]"], "schedule.milestones: must be >= 1, got 0"),
        (["schedule.milestones=[6,3]"], "schedule.milestones: must be increasing, got [6, 3]"),
        (["schedule.warmup_epochs=20"], "schedule.warmup_epochs: 20 is more than train.epochs (10)"),
        (
            ["model.student=resnet18"],
            "model.student: 'resnet18' must start with cifar/, timm/, tv/, mdistiller/, mmpretrain/ (e.g. "
            "'cifar/resnet18')",
        ),
        (
            ["model.student_kwargs.num_classes=10"],
            "model.student_kwargs.num_classes: set from the dataset, remove it (data.num_classes checks it)",
        ),
        (
            ["model.teacher_kwargs.in_chans=1"],
            "model.teacher_kwargs.in_chans: set from the dataset, remove it (data.num_classes checks it)",
        ),
        (
            ["method.name=kd"],
            "model.teacher: method 'kd' needs a teacher (e.g. model.teacher=cifar/resnet32x4 "
            "model.teacher_checkpoint=PATH)",
        ),
        (
            ["method.name=nkd", "model.teacher_checkpoint=t.pt"],
            "model.teacher: method 'nkd' needs a teacher (e.g. model.teacher=cifar/resnet32x4 "
            "model.teacher_checkpoint=PATH)",
        ),
        (
            TEACHER,
            "model.teacher_checkpoint: method 'kd' needs the teacher's trained weights (set "
            "model.teacher_checkpoint=PATH, or model.teacher_kwargs.pretrained=true for a timm model)",
        ),
        ([*TEACHER, "model.teacher_checkpoint=missing.pt"], "model.teacher_checkpoint: file not found: missing.pt"),
        (["model.student_checkpoint=missing.pth"], "model.student_checkpoint: file not found: missing.pth"),
        (
            ["model.teacher_format=crd"],
            "model.teacher_format: 'crd' is not one of auto, mdistiller, mmpretrain, native",
        ),
        (
            ["model.student_format=mdistiler"],
            "model.student_format: 'mdistiler' is not one of auto, mdistiller, mmpretrain, native (did you mean "
            "'mdistiller'?)",
        ),
        (["model.teacher_mode=frozen"], "model.teacher_mode: 'frozen' is not one of eval, train"),
        (
            ["data.eval_interpolation=nearest"],
            "data.eval_interpolation: 'nearest' is not one of auto, bicubic, bilinear",
        ),
        (["data.eval_crop_pct=1.2"], "data.eval_crop_pct: must be <= 1, got 1.2"),
        (["data.eval_crop_pct=0"], "data.eval_crop_pct: must be > 0, got 0.0"),
        # Table 8's soft target from a trained model needs that model; the message names the option that asks for it.
        (
            ["method.name=uskd", "method.target_soft_label=teacher"],
            "model.teacher: method 'uskd' with method.target_soft_label=teacher needs a teacher (e.g. "
            "model.teacher=cifar/resnet32x4 model.teacher_checkpoint=PATH)",
        ),
        (
            ["method.name=uskd", "method.target_soft_label=teacher", "model.teacher=cifar/resnet20"],
            "model.teacher_checkpoint: method 'uskd' with method.target_soft_label=teacher needs the teacher's "
            "trained weights (set model.teacher_checkpoint=PATH, or model.teacher_kwargs.pretrained=true for a timm "
            "model)",
        ),
        (
            ["method.name=uskd", "method.target_soft_label=ema", "train.ema_decay=1"],
            "train.ema_decay: must be < 1 (1 would keep the student's initial weights), got 1.0",
        ),
        (["train.ema_decay=-0.1"], "train.ema_decay: must be >= 0, got -0.1"),
        (
            ["method.name=uskd", "method.batch_mean_group=-1"],
            "method.batch_mean_group: must be >= 0 for method 'uskd', got -1",
        ),
        (["method.name=uskd", "method.batch_mean_group=1.5"], "method.batch_mean_group: expected int, got 1.5"),
    ],
)
def test_validation_messages(overrides, message):
    assert _error(None, overrides) == message


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs", "override 'train.epochs': expected key=value, e.g. train.epochs=5"),
        ("=3", "override '=3': expected key=value, e.g. train.epochs=5"),
        ("train..epochs=3", "override 'train..epochs=3': empty name in key 'train..epochs'"),
        (
            "data.root=[1",
            "data.root: cannot parse value '[1' at line 1, column 3: expected ',' or ']', but got '<stream end>'",
        ),
        ("output_dir.x=1", "output_dir.x: cannot set a key inside output_dir, which is 'runs/exp'"),
    ],
)
def test_override_syntax_errors(override, message, tmp_path):
    assert _error(_yaml(tmp_path, "output_dir: runs/exp\n"), [override]) == message


def test_file_errors(tmp_path):
    assert _error(tmp_path / "nope.yaml") == f"config file not found: {tmp_path / 'nope.yaml'}"
    path = _yaml(tmp_path, "train:\n  epochs: 3\n bad: 1\n")
    assert (
        _error(path)
        == f"{path}: invalid YAML at line 3, column 2: expected <block end>, but found '<block mapping start>'"
    )
    assert (
        _error(_yaml(tmp_path, "- 1\n- 2\n"))
        == f"{path}: expected a mapping of sections (data, model, ...), got [1, 2]"
    )
    with pytest.raises(ConfigError, match=r"^expected a mapping of sections \(data, model, \.\.\.\), got 3$"):
        config_from_dict(3)


def test_teacher_checkpoint_is_checked_only_when_asked():
    overrides = [*TEACHER, "model.teacher_checkpoint=missing.pt"]
    assert load_config(None, overrides, check_files=False).model.teacher_checkpoint == "missing.pt"


def test_pretrained_teacher_needs_no_checkpoint():
    cfg = load_config(None, [*TEACHER[:1], "model.teacher=timm/resnet18", "model.teacher_kwargs.pretrained=true"])
    assert cfg.model.teacher_checkpoint is None


def test_teacher_for_a_method_without_one_is_ignored_with_a_warning():
    with pytest.warns(UserWarning, match=r"^model\.teacher: method 'uskd' does not use a teacher; ignoring it$"):
        load_config(None, ["method.name=uskd", "model.teacher=cifar/resnet20"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(None, ["method.name=uskd"])


def test_every_model_namespace_and_weights_format_of_unikd_models_is_accepted():
    assert {f"{namespace}/" for namespace in NAMESPACES} == set(MODEL_PREFIXES)
    assert WEIGHT_FORMATS == FORMATS
    # The names the field types (mdistiller's, mmpretrain's), any case, as student and as teacher.
    overrides = ["model.student=mdistiller/resnet8X4", "data.name=cifar100", "method.name=kd"]
    cfg = load_config(None, [*overrides, "model.teacher=mmpretrain/resnet18_8xb16_cifar100", "model.teacher_format="
                             "mmpretrain", "model.teacher_checkpoint=t.pth"], check_files=False)  # fmt: skip
    assert (cfg.model.student, cfg.model.teacher_format) == ("mdistiller/resnet8X4", "mmpretrain")
    # An alias of a torchvision model takes RGB only, as the model it names.
    message = (
        "model.student: torchvision models take 3-channel images and fashion_mnist has 1; set data.channels=3 to "
        "repeat its grayscale channel"
    )
    assert _error(None, ["model.student=mmpretrain/shufflenet-v2-1x_16xb64_in1k"]) == message


def test_a_soft_target_from_the_ema_copy_needs_no_teacher():
    cfg = load_config(None, ["method.name=uskd", "method.target_soft_label=ema"])
    assert (cfg.model.teacher, cfg.train.ema_decay, cfg.train.ema_warmup) == (None, 0.9998, True)
    warning = r"^model\.teacher: method 'uskd' does not use a teacher \(its soft targets come from an EMA copy"
    with pytest.warns(UserWarning, match=warning):
        load_config(None, ["method.name=uskd", "method.target_soft_label=ema", "model.teacher=cifar/resnet20"])


def test_eval_interpolation_auto_follows_the_students_reference_recipe():
    def resolved(*overrides: str) -> str:
        return load_config(None, ["data.name=imagefolder", *overrides]).data.eval_interpolation

    assert resolved("model.student=timm/resnet18") == "bilinear"  # mmpretrain's CNN configs, torchvision's
    assert resolved("model.student=timm/deit_tiny_patch16_224") == "bicubic"  # their DeiT / Swin configs
    assert resolved("model.student=mmpretrain/swin-tiny_16xb64_in1k") == "bicubic"  # an alias: the model it names
    assert resolved("model.student=tv/vit_b_16") == "bicubic"
    assert resolved("model.student=timm/deit_tiny_patch16_224", "data.eval_interpolation=bilinear") == "bilinear"
    # The resolved value is what config.yaml records, so a run's files say which resize it evaluated with.
    assert "eval_interpolation: bicubic" in dump_config(load_config(None, ["model.student=timm/swin_tiny_patch4_"
                                                                           "window7_224"]))  # fmt: skip


def test_a_detection_config_given_to_the_classification_commands_says_which_command_to_use(tmp_path):
    path = _yaml(tmp_path, "task: detection\ndata:\n  root: data/coco\n")
    assert _error(path, []) == (
        f"{path}: a detection config (task: detection); run it with unikd detect train (check it with unikd detect "
        "config)"
    )
    assert _error(_yaml(tmp_path, "task: segmentation\n"), []).startswith("task: unknown key (valid keys: ")


def test_config_for_weights_infers_the_dataset_from_its_folder(tmp_path):
    for folder, name in (("val/cat", "imagefolder"), ("cifar-100-python", "cifar100"), ("cifar-10-batches-py",
                                                                                       "cifar10")):  # fmt: skip
        root = tmp_path / name
        (root / folder).mkdir(parents=True)
        cfg = config_for_weights("cifar/resnet8", [f"data.root={root}"], layout="mdistiller")
        assert (cfg.data.name, cfg.model.student, cfg.model.student_format) == (name, "cifar/resnet8", "mdistiller")
    assert config_for_weights("cifar/resnet8", ["data.name=mnist"]).data.name == "mnist"  # given, not inferred
    (tmp_path / "idx").mkdir()
    with pytest.raises(ConfigError) as error:
        config_for_weights("cifar/resnet8", [f"data.root={tmp_path / 'idx'}"])
    assert str(error.value) == (
        f"data.name: cannot tell which dataset {tmp_path / 'idx'} holds (no train/ or val/ folder of an ImageNet "
        "layout, no cifar-10-batches-py/ or cifar-100-python/); pass data.name=... (e.g. data.name=fashion_mnist)"
    )
    with pytest.raises(ConfigError, match=r"^data\.name: which dataset\? pass --data ROOT"):
        config_for_weights("cifar/resnet8")
    with pytest.raises(ConfigError, match=f"^data\\.root: no such folder: {tmp_path / 'nowhere'}$"):
        config_for_weights("cifar/resnet8", [f"data.root={tmp_path / 'nowhere'}"])


# ---- num_classes across data and teacher ------------------------------------------------------------------------


def test_teacher_checkpoint_num_classes_must_match(tmp_path):
    checkpoint = tmp_path / "teacher.pt"
    torch.save({"format": "unikd-checkpoint", "num_classes": 10, "model": {}}, checkpoint)
    model_cfg = ModelConfig(teacher="cifar/resnet20", teacher_checkpoint=str(checkpoint))
    check_teacher_num_classes(model_cfg, 10)
    with pytest.raises(ConfigError) as error:
        check_teacher_num_classes(model_cfg, 100)
    assert str(error.value) == (
        f"model.teacher_checkpoint: the teacher in {checkpoint} predicts 10 classes but the dataset has 100"
    )


def test_the_class_count_a_safetensors_export_records_is_read_from_its_header(tmp_path):
    from unikd.models import create_model

    path = tmp_path / "teacher.safetensors"
    export_state_dict(create_model("cifar/resnet8", 100), path, metadata={"model_name": "cifar/resnet8",
                                                                          "num_classes": 100})  # fmt: skip
    with pytest.raises(ConfigError, match=r"predicts 100 classes but the dataset has 10$"):
        check_teacher_num_classes(ModelConfig(teacher="cifar/resnet8", teacher_checkpoint=str(path)), 10)


def test_teacher_num_classes_is_not_guessed_from_plain_weights(tmp_path):
    checkpoint = tmp_path / "teacher.pt"
    torch.save({"fc.weight": torch.zeros(10, 4)}, checkpoint)
    check_teacher_num_classes(ModelConfig(teacher="cifar/resnet20", teacher_checkpoint=str(checkpoint)), 100)
    check_teacher_num_classes(ModelConfig(), 100)  # no teacher


# ---- hyper-parameters are checked up front, for every method --------------------------------------------------


class _Toy(Method):
    """A method as a new file would add it: a Literal choice, a bounded name, an unlisted float, a plain str."""

    name = "toy"

    def __init__(
        self,
        num_classes: int,
        feature_dim: int | None = None,
        *,
        mode: Literal["fast", "exact"] = "fast",
        temperature: float = 1.0,
        spice: float = 0.5,
        label: str = "x",
    ) -> None:
        super().__init__(num_classes, feature_dim)


@pytest.fixture
def toy_method(monkeypatch):
    monkeypatch.setitem(METHODS, "toy", _Toy)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.mode=slow", "method.mode: 'slow' is not one of exact, fast"),
        ("method.mode=exac", "method.mode: 'exac' is not one of exact, fast (did you mean 'exact'?)"),
        ("method.mode=1", "method.mode: expected str, got 1"),
        ("method.temperature=0", "method.temperature: must be > 0 for method 'toy', got 0.0"),
        ("method.temperature=-inf", "method.temperature: must be a finite number, got -inf"),
        ("method.spice=.nan", "method.spice: must be a finite number, got nan"),
        ("method.label=3", "method.label: expected str, got 3"),
    ],
)
def test_a_new_method_gets_choice_and_range_checks_without_code_of_its_own(toy_method, override, message):
    assert _error(None, ["method.name=toy", override]) == message


def test_create_method_checks_the_same_for_library_users(toy_method):
    with pytest.raises(ConfigError, match=r"^method\.mode: 'slow' is not one of exact, fast$"):
        create_method("toy", 10, mode="slow")
    with pytest.raises(ConfigError, match=r"^method\.temperature: must be > 0 for method 'toy', got 0\.0$"):
        create_method("toy", 10, temperature=0.0)
    assert isinstance(create_method("toy", 10, mode="exact", spice=float("-1")), _Toy)


def test_a_new_method_accepts_valid_values_and_a_plain_str(toy_method):
    params = load_config(None, ["method.name=toy", "method.mode=exact", "method.spice=-3", "method.label=y"]).method
    assert params.params == {"mode": "exact", "temperature": 1.0, "spice": -3.0, "label": "y"}
    assert hyperparameter_types("toy") == {"mode": Literal["fast", "exact"], "temperature": float, "spice": float,
                                           "label": str}  # fmt: skip


def test_every_bounds_entry_names_a_hyperparameter_of_some_method():
    names = {f"{m}.{key}" for m in METHODS for key in method_defaults(m)} | {
        k for m in METHODS for k in method_defaults(m)
    }
    assert set(HYPERPARAMETER_BOUNDS) <= names
    assert [str(b) for b in (Bounds(0, low_open=True), Bounds(0), Bounds(0, 1, high_open=True), Bounds(high=2))] == [
        "> 0",
        ">= 0",
        "in [0, 1)",
        "<= 2",
    ]


# ---- resume and evaluation -----------------------------------------------------------------------------------------


def test_config_changes_lists_differing_leaves_by_key_path():
    old = config_to_dict(load_config(None, ["model.student_kwargs={width: 4}"]))
    new = config_to_dict(load_config(None, ["optim.lr=0.2", "method.name=ls", "model.student_kwargs={width: 8}"]))
    assert config_changes(old, new) == {
        "model.student_kwargs.width": (4, 8),
        "method.name": ("baseline", "ls"),
        "optim.lr": (0.1, 0.2),
        "method.smoothing": ("<unset>", 0.1),
    }
    assert config_changes(old, old) == {}


def test_safe_keys_on_resume_are_config_keys():
    leaves = config_changes({}, config_to_dict(load_config(None)))
    assert set(SAFE_TO_CHANGE_ON_RESUME) <= set(leaves)


def test_a_checkpoints_stored_config_sets_only_what_the_student_is_and_its_dataset():
    stored = config_to_dict(load_config(None, ["data.name=cifar10", "data.img_size=40", "method.name=uskd"]))
    stored["data"].update(download=True, num_workers=64, val_subset=3, root="/elsewhere")
    stored["train"].update(device="cuda", eval_batch_size=10**6, amp="fp16")
    stored["model"]["student_kwargs"] = {"width": 8, "pretrained": True}
    cfg = config_for_checkpoint(stored, ["train.device=cpu"])
    assert (cfg.data.name, cfg.data.img_size, cfg.data.root, cfg.method.name) == ("cifar10", 40, "/elsewhere", "uskd")
    assert (cfg.data.download, cfg.data.num_workers, cfg.data.val_subset) == (False, 2, None)
    assert (cfg.train.device, cfg.train.eval_batch_size, cfg.train.amp) == ("cpu", 256, "none")
    assert cfg.model.student_kwargs == {"width": 8}
    teacher_method = config_to_dict(load_config(None, [*TEACHER, "model.teacher_checkpoint=t.pt"], check_files=False))
    assert config_for_checkpoint(teacher_method).method.name == "baseline"  # the teacher is not needed to evaluate
    # USKD taking Table 8's soft target from a teacher: the same, unless the method is to be kept (soft labels): then
    # the overrides must name the teacher.
    overrides = ["method.name=uskd", "method.target_soft_label=teacher", "model.teacher=cifar/resnet20"]
    uskd_teacher = config_to_dict(load_config(None, [*overrides, "model.teacher_checkpoint=t.pt"], check_files=False))
    assert config_for_checkpoint(uskd_teacher).method.name == "baseline"
    with pytest.raises(ConfigError, match=r"^model\.teacher: method 'uskd' with method\.target_soft_label=teacher"):
        config_for_checkpoint(uskd_teacher, keep_method=True)
    kept = config_for_checkpoint(uskd_teacher, [*overrides[2:], "model.teacher_checkpoint=t.pt"], keep_method=True)
    assert kept.method.params["target_soft_label"] == "teacher"
    stored = config_to_dict(load_config(None, ["model.student=timm/deit_tiny_patch16_224", "data.eval_crop_pct=0.9"]))
    assert config_for_checkpoint(stored).data.eval_crop_pct == 0.9  # evaluated as it was trained


def test_duplicate_keys_in_an_override_value_are_refused():
    assert _error(None, ["model.student_kwargs={width: 4, width: 8}"]) == (
        "model.student_kwargs: cannot parse value '{width: 4, width: 8}' at line 1, column 12: duplicate key 'width' "
        "(first at line 1); merge the two, the second would silently replace the first"
    )
