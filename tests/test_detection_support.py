"""Shared pieces of the detection tests: a tiny Fashion-MNIST in the Debian package's idx layout (conftest's
``write_idx``), tiny mosaics made from it, the overrides of a tiny detector, and a trained tiny teacher.

Import the fixtures into a test module (``from test_detection_support import mosaics_root, TINY``) to use them. Every
fixture is session-scoped: the files are read-only for the tests.

    TINY        overrides: a ResNet-18 of widths 8-64 with a 16-channel FPN on 64-pixel canvases, 2 images a step
    mosaics_root        24 train / 8 val canvases of 64 px, 1-3 items each (masks included)
    teacher_checkpoint  best.pt of a 4-step Faster R-CNN run with TINY on mosaics_root
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_idx

from unikd.detection.config import load_detection_config
from unikd.detection.mosaics import make_mosaics

REPO = Path(__file__).resolve().parents[1]
MOSAICS = {"num_train": 24, "num_val": 8, "canvas": 64, "items": (1, 3), "scale": (0.8, 1.5), "seed": 0}
SPLITS = [
    "data.train_images=train",
    "data.val_images=val",
    "data.train_annotations=annotations/instances_train.json",
    "data.val_annotations=annotations/instances_val.json",
]
TINY = [
    *SPLITS,
    "data.min_size=[64]",
    "data.max_size=64",
    "data.num_workers=0",
    "model.student.backbone=timm/resnet18",
    "model.student.backbone_kwargs={channels: [8, 16, 32, 64], stem_width: 8}",
    "model.student.fpn_channels=16",
    "model.student.representation_size=32",
    "model.student.anchor_sizes=[8, 16, 32, 64, 128]",
    "model.student.detector_kwargs={rpn_pre_nms_top_n_train: 100, rpn_post_nms_top_n_train: 50, "
    "rpn_pre_nms_top_n_test: 50, rpn_post_nms_top_n_test: 30, box_batch_size_per_image: 32}",
    "optim.lr=0.01",
    "schedule.unit=iter",
    "schedule.length=4",
    "schedule.milestones=[3]",
    "schedule.warmup_iters=2",
    "train.batch_size=2",
    "train.eval_batch_size=4",
    "train.eval_every=4",
    "train.log_every=1",
    "train.progress=false",
    "train.tensorboard=false",
]


def tiny_config(root: Path, output_dir: Path, *overrides: str, config: str | None = None):
    """A validated config: ``config`` (default: the built-in defaults) with TINY on the mosaics at ``root``."""
    return load_detection_config(config, [f"data.root={root}", *TINY, f"output_dir={output_dir}", *overrides])


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def fashion_mnist_idx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_idx(tmp_path_factory.mktemp("detection_fmnist"), num_train=200, num_test=100, gz=True)


@pytest.fixture(scope="session")
def mosaics_root(tmp_path_factory: pytest.TempPathFactory, fashion_mnist_idx: Path) -> Path:
    root = tmp_path_factory.mktemp("mosaics")
    make_mosaics(root, fashion_mnist_root=fashion_mnist_idx, **MOSAICS)
    return root


@pytest.fixture(scope="session")
def teacher_checkpoint(tmp_path_factory: pytest.TempPathFactory, mosaics_root: Path) -> Path:
    from unikd.detection.train import train_detector

    run_dir = tmp_path_factory.mktemp("detection_teacher") / "run"
    train_detector(tiny_config(mosaics_root, run_dir))
    return run_dir / "best.pt"


def test_the_tiny_mosaics_hold_boxes_masks_and_every_split(mosaics_root: Path):
    for split, count in (("train", MOSAICS["num_train"]), ("val", MOSAICS["num_val"])):
        dataset = json.loads((mosaics_root / "annotations" / f"instances_{split}.json").read_text())
        assert len(dataset["images"]) == count
        assert len(dataset["annotations"]) >= count  # at least one item per canvas
        assert all("segmentation" in annotation for annotation in dataset["annotations"])
        assert all((mosaics_root / split / image["file_name"]).is_file() for image in dataset["images"])
