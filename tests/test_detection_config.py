"""The detection config: defaults, YAML round trip, and the exact one-line errors of bad keys and values."""

from __future__ import annotations

import pytest
from test_detection_support import SPLITS, fashion_mnist_idx, mosaics_root  # noqa: F401 (fixtures)

from unikd._errors import ConfigError
from unikd.detection.config import (
    detection_config_from_dict,
    detection_config_to_dict,
    dump_detection_config,
    load_detection_config,
)

TEACHER = "model.teacher.checkpoint=teacher.pt"


def test_defaults_are_the_mmdetection_faster_rcnn_1x_recipe():
    cfg = load_detection_config(None, check_files=False)
    assert (cfg.task, cfg.model.student.arch, cfg.model.student.backbone) == ("detection", "faster_rcnn", "tv/resnet50")
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.no_decay_norm_bias) == (
        0.02,
        0.9,
        1e-4,
        False,
    )
    schedule = cfg.schedule
    assert (schedule.unit, schedule.length, schedule.milestones, schedule.warmup_iters, schedule.warmup_ratio) == (
        "epoch",
        12,
        [8, 11],
        500,
        0.001,
    )
    assert (cfg.train.batch_size, cfg.data.min_size, cfg.data.max_size, cfg.data.hflip) == (16, [800], 1333, 0.5)
    assert cfg.method.name == "baseline" and cfg.method.params == {}


def test_a_resolved_config_round_trips_through_yaml_and_checkpoints(tmp_path):
    cfg = load_detection_config(None, ["method.name=nkd", "method.gamma=2", TEACHER], check_files=False)
    assert cfg.method.params == {"weight": 1.0, "rois": "all", "temperature": 1.0, "gamma": 2.0}
    path = tmp_path / "config.yaml"
    path.write_text(dump_detection_config(cfg))
    assert load_detection_config(path, check_files=False) == cfg
    assert detection_config_from_dict(detection_config_to_dict(cfg), check_files=False) == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.batchsize=4"], "train.batchsize: unknown key (did you mean 'train.batch_size'?)"),
        (["method.name=nkdd"], "method.name: 'nkdd' is not one of baseline, dkd, kd, nkd, wsld (did you mean 'nkd'?)"),
        (
            ["method.name=nkd", "method.gama=1", TEACHER],
            "method.gama: unknown key for method 'nkd' (did you mean 'method.gamma'?)",
        ),
        (["method.name=dkd", "method.rois=bg", TEACHER], "method.rois: 'bg' is not one of all, foreground"),
        (
            ["method.name=nkd"],
            "model.teacher.checkpoint: method 'nkd' needs the trained teacher detector (set "
            "model.teacher.checkpoint=PATH, e.g. a best.pt of 'unikd detect train')",
        ),
        (
            ["model.student.detector_kwargs={box_batch_size: 4}"],
            "model.student.detector_kwargs.box_batch_size: not an argument of torchvision's FasterRCNN (did you mean "
            "'model.student.detector_kwargs.box_batch_size_per_image'?)",
        ),
        (
            ["model.student.anchor_sizes=[16, 32]"],
            "model.student.anchor_sizes: one size per FPN level (4 stages + the pooled level), 5 values, got [16, 32]",
        ),
        (["schedule.milestones=[8, 4]"], "schedule.milestones: must be increasing, got [8, 4]"),
        (
            ["schedule.milestones=[8, 12]"],
            "schedule.milestones: 12 is not before the end of training (schedule.length=12 epochs)",
        ),
        (["schedule.unit=epochs"], "schedule.unit: 'epochs' is not one of epoch, iter (did you mean 'epoch'?)"),
        (["model.student.arch=retinanet"], "model.student.arch: 'retinanet' is not one of faster_rcnn, mask_rcnn"),
        (["model.teacher.arch=yolo"], "model.teacher.arch: 'yolo' is not one of faster_rcnn, mask_rcnn"),
        (["data.image_mean=[0.5]"], "data.image_mean: expected 3 values (R, G, B), got [0.5]"),
        (["data.hflip=2"], "data.hflip: a probability must be <= 1, got 2.0"),
        (["data.min_size=[]"], "data.min_size: give at least one size, e.g. [800]"),
        (["task=classification"], "task: 'classification' is not one of detection"),
        (["data.invalid_boxes=keep"], "data.invalid_boxes: 'keep' is not one of drop, error"),
    ],
)
def test_bad_keys_and_values_are_one_line_errors_with_the_key_path(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_detection_config(None, overrides, check_files=False)
    assert str(error.value) == message


def test_backbones_must_name_a_unikd_models_namespace():
    with pytest.raises(
        ConfigError, match=r"^model.student.backbone: 'resnet50' must start with .*\(e.g. 'tv/resnet50'\)$"
    ):
        load_detection_config(None, ["model.student.backbone=resnet50"], check_files=False)


def test_files_are_checked_up_front(tmp_path, mosaics_root):  # noqa: F811
    with pytest.raises(ConfigError) as error:
        load_detection_config(None, [f"data.root={tmp_path}"])
    assert str(error.value) == (
        f"data.train_annotations: file not found: {tmp_path / 'annotations/instances_train2017.json'} "
        f"(data.root={tmp_path}; make mosaics with 'unikd detect mosaics --out DIR' or point data.root at a "
        "COCO-format dataset)"
    )

    data = [f"data.root={mosaics_root}", *SPLITS]
    with pytest.raises(ConfigError) as error:
        load_detection_config(None, [*data, "method.name=kd", TEACHER])
    assert str(error.value) == "model.teacher.checkpoint: file not found: teacher.pt"
    with pytest.raises(ConfigError) as error:
        load_detection_config(None, [*data, "model.student.backbone_weights=w.pt"])
    assert str(error.value) == "model.student.backbone_weights: file not found: w.pt"


def test_a_teacher_for_a_method_without_one_is_ignored_with_a_warning():
    with pytest.warns(UserWarning, match="model.teacher: method 'baseline' does not use a teacher; ignoring it"):
        load_detection_config(None, [TEACHER], check_files=False)


def test_a_yaml_file_without_task_is_taken_for_a_classification_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  student: cifar/resnet8\n")
    with pytest.raises(ConfigError, match="not a detection config \\(no 'task: detection' line\\)"):
        load_detection_config(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b"task: detection\ntrain:\n  batch_size: 2\ntrain:\n  seed: 1\n",
            "invalid YAML at line 4, column 1: duplicate key 'train'",
        ),
        (b"task: detection\noutput_dir: caf\xe9\n", "not UTF-8 text (byte 0xe9 at offset 31); save it as UTF-8"),
        (
            b"- task: detection\n",
            "expected a mapping of sections (task, data, model, ...), got [{'task': 'detection'}]",
        ),
        (b"", "not a detection config (no 'task: detection' line)"),
    ],
    ids=["duplicate-key", "not-utf8", "not-a-mapping", "empty"],
)
def test_a_detection_config_file_is_read_by_the_classification_configs_reader(tmp_path, content, message):
    """unikd.config.read_config_file reads both kinds: a key given twice, a file that is not UTF-8 or not a mapping
    are one-line errors naming the file, and an empty file is a config without its task line."""
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as error:
        load_detection_config(path, check_files=False)
    assert str(error.value).startswith(f"{path}: {message}")
