"""The paper-protocol configs (``configs/cifar100_*.yaml``, ``configs/imagenet_*.yaml``): each one validates, says
what it targets and how to run it, and builds and trains one step on FakeData at a tiny size.

The training test keeps everything the config chooses (model, method and its hyper-parameters, optimizer, schedule,
augmentation, MixUp/CutMix, clipping) and shrinks only the data: FakeData with the config's number of classes, 2
images a batch, one step, one epoch. Teacher configs get a randomly initialised teacher saved by ``export_state_dict``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import yaml

from unikd.config import load_config
from unikd.models import create_model, export_state_dict
from unikd.train import train

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted([*REPO.glob("configs/cifar100_*.yaml"), *REPO.glob("configs/imagenet_*.yaml")])
NUM_CLASSES = {"cifar100": 100, "imagefolder": 1000}
# Input sizes other than 32. ViTs take theirs in the constructor (patch 16: 2x2 patches; Swin: 16x16 tokens of 4
# pixels, which timm runs with window 7). ShuffleNetV2 ends at 1x1 for 32 pixels, and its batch norms over 2 values
# each then blow the weights up in one step (a tiny-input artifact: at 64 it trains and evaluates fine).
IMG_SIZE = {
    "timm/deit_tiny_patch16_224": 32,
    "timm/deit_small_patch16_224": 32,
    "timm/swin_tiny_patch4_window7_224": 64,
    "tv/shufflenet_v2_x1_0": 64,
}
VIT_PREFIXES = ("timm/deit_", "timm/swin_")


def config_id(path: Path) -> str:
    return path.stem


def test_every_protocol_of_the_benchmarks_issue_has_a_config():
    expected = [
        *(f"cifar100_teacher_{name}" for name in ("resnet32x4", "vgg13", "resnet50")),
        *(f"cifar100_kd_{pair}" for pair in ("vgg13_vgg8", "resnet32x4_resnet8x4", "vgg13_mobilenetv2")),
        "cifar100_kd_resnet50_mobilenetv2",
        "cifar100_selfkd_resnet18",
        "imagenet_kd_resnet34_resnet18",
        "imagenet_kd_resnet50_mobilenetv1",
        *(f"imagenet_selfkd_{name}" for name in ("resnet18", "resnet50", "resnet101", "regnetx_016")),
        *(f"imagenet_selfkd_{name}" for name in ("mobilenetv1", "mobilenetv2", "shufflenetv2")),
        *(f"imagenet_selfkd_{name}" for name in ("deit_tiny", "deit_small", "swin_tiny")),
    ]
    assert sorted(path.stem for path in CONFIGS) == sorted(expected)


def comment_block(path: Path) -> str:
    return path.read_text().split("\ndata:")[0]


@pytest.mark.parametrize("path", CONFIGS, ids=config_id)
def test_config_validates_and_documents_its_target_and_command(path: Path):
    cfg = load_config(path, check_files=False)
    assert cfg.data.name in NUM_CLASSES
    header = comment_block(path)
    assert re.search(r"paper's Table \d", header), "the comment block names the paper table it targets"
    assert re.search(r"^# Target", header, re.MULTILINE), "the comment block names the number it targets"
    assert f"unikd train configs/{path.name}" in header, "the comment block says how to run it"
    assert cfg.output_dir.startswith(f"runs/{path.stem}")


@pytest.mark.filterwarnings("ignore:model.teacher. method 'baseline' does not use a teacher")
@pytest.mark.parametrize("path", CONFIGS, ids=config_id)
def test_method_sections_shown_in_the_comments_are_valid(path: Path):
    sections = re.findall(r"'(method=\{.*?\})'", comment_block(path))
    if "teacher" not in path.stem:
        assert sections, "a protocol config shows how to run the other methods under it"
    for section in sections:
        cfg = load_config(path, [section], check_files=False)
        assert cfg.method.name == yaml.safe_load(section.removeprefix("method="))["name"]


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem.startswith("cifar100_kd_")], ids=config_id)
def test_cifar_pair_reads_the_teacher_that_its_teacher_config_writes(path: Path):
    cfg = load_config(path, check_files=False)
    teacher_name = cfg.model.teacher.removeprefix("cifar/")
    teacher_cfg = load_config(REPO / f"configs/cifar100_teacher_{teacher_name}.yaml")
    assert teacher_cfg.model.student == cfg.model.teacher
    assert cfg.model.teacher_checkpoint == f"{teacher_cfg.output_dir}/best.pt"
    # One protocol for teacher and student, except the lower rate of MobileNet students.
    assert cfg.optim == dataclasses.replace(teacher_cfg.optim, lr=cfg.optim.lr)
    assert (cfg.schedule, cfg.train) == (teacher_cfg.schedule, teacher_cfg.train)
    assert cfg.optim.lr == (0.01 if "mobilenet" in cfg.model.student else 0.05)


def tiny_overrides(path: Path, tmp_path: Path) -> list[str]:
    """Overrides that shrink the data and the run of config ``path`` to one step on 2 FakeData images."""
    raw = yaml.safe_load(path.read_text())
    student = raw["model"]["student"]
    img_size = IMG_SIZE.get(student, 32)
    overrides = [
        "data.name=fake",
        f"data.num_classes={NUM_CLASSES[raw['data']['name']]}",
        f"data.img_size={img_size}",
        "data.train_subset=2",
        "data.val_subset=2",
        "data.num_workers=0",
        "train.batch_size=2",
        "train.eval_batch_size=2",
        "train.epochs=1",
        "train.max_steps_per_epoch=1",
        "train.device=cpu",
        "train.progress=false",
        "train.tensorboard=false",
        f"output_dir={tmp_path / 'run'}",
    ]
    if student.startswith(VIT_PREFIXES):
        overrides.append(f"model.student_kwargs.img_size={img_size}")
    if raw.get("schedule", {}).get("warmup_epochs", 0) > 1:
        overrides.append("schedule.warmup_epochs=1")  # no longer than the one epoch run here
    teacher = raw["model"].get("teacher")
    if teacher is not None:
        checkpoint = tmp_path / "teacher.safetensors"
        export_state_dict(create_model(teacher, NUM_CLASSES[raw["data"]["name"]]), checkpoint)
        overrides.append(f"model.teacher_checkpoint={checkpoint}")
    return overrides


@pytest.mark.parametrize("path", CONFIGS, ids=config_id)
def test_config_trains_one_step_on_fake_data(path: Path, tmp_path: Path):
    cfg = load_config(path, tiny_overrides(path, tmp_path))
    result = train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (train_record,) = [record for record in records if record["split"] == "train"]
    # The config's own method made the step: its loss term was logged, and every term is finite.
    term = "loss_ce" if cfg.method.name == "baseline" else f"loss_{cfg.method.name}"
    assert term in train_record
    assert all(math.isfinite(value) for key, value in train_record.items() if key.startswith("loss"))
    assert len(result["history"]) == 1
    assert math.isfinite(result["history"][0]["val_loss"])
    assert 0.0 <= result["last_top1"] <= 100.0
