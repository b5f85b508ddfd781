"""The detection protocol configs (``configs/detection/*.yaml``): each validates, says what it targets and how to run
it, holds the paper's protocol, and trains one step on tiny mosaics.

The one-step runs keep everything the config chooses (detector, backbone and its frozen stages, RPN/RoI settings,
method and hyper-parameters, optimizer) and shrink only the data (64-pixel mosaics, 2 images, one iteration) and the
evaluation. Backbone weights files are random ResNets written in torchvision's layout; the Table 13 student distils
from the one-step checkpoint of the Table 13 teacher config.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_detection_support import SPLITS, fashion_mnist_idx, mosaics_root  # noqa: F401 (fixtures)

from unikd.detection.config import load_detection_config
from unikd.detection.train import train_detector
from unikd.models import create_model, export_state_dict

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(REPO.glob("configs/detection/*.yaml"))
TEACHER = "coco_teacher_faster_rcnn_r101_fpn_2x"
ONE_STEP = [
    *SPLITS,
    "data.min_size=[64]",
    "data.max_size=64",
    "data.val_subset=2",
    "data.num_workers=0",
    "schedule.unit=iter",
    "schedule.length=1",
    "schedule.milestones=[]",
    "schedule.warmup_iters=1",
    "train.batch_size=2",
    "train.eval_batch_size=2",
    "train.eval_every=1",
    "train.progress=false",
    "train.tensorboard=false",
]


def comment_block(path: Path) -> str:
    return path.read_text().split("\ntask:")[0]


def test_every_detection_protocol_of_the_issue_has_a_config():
    assert [path.stem for path in CONFIGS] == sorted(
        [
            TEACHER,
            "coco_kd_faster_rcnn_r101_r50_fpn_1x",
            "coco_mask_rcnn_r50_fpn_1x",
            "coco_mask_rcnn_r50_fpn_1x_uskd",
            "mosaics_teacher",
            "mosaics_student",
            "mosaics_mask_rcnn",
        ]
    )


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_config_validates_and_documents_its_target_and_command(path):
    cfg = load_detection_config(path, check_files=False)
    header = comment_block(path)
    assert f"unikd detect train configs/detection/{path.name}" in header, "the comment block says how to run it"
    assert cfg.output_dir == f"runs/detection/{path.stem}"
    if path.stem.startswith("coco_"):
        assert re.search(r"paper's Table (7|13)", header) and re.search(r"^# Target", header, re.MULTILINE)
        assert (cfg.train.batch_size, cfg.optim.lr, cfg.optim.weight_decay) == (16, 0.02, 1e-4)  # 8 GPUs x 2 images
        assert (cfg.data.min_size, cfg.data.max_size, cfg.model.student.trainable_backbone_layers) == ([800], 1333, 3)
        assert (cfg.schedule.warmup_iters, cfg.schedule.warmup_ratio, cfg.schedule.unit) == (500, 0.001, "epoch")
    for section in re.findall(r"'(method=\{.*?\})'", header):  # the other methods the comments show
        teacher = [] if "baseline" in section else ["model.teacher.checkpoint=t.pt"]
        load_detection_config(path, [section, *teacher], check_files=False)


def test_table_13_and_table_7_hold_the_papers_models_and_schedules():
    load = {path.stem: load_detection_config(path, check_files=False) for path in CONFIGS}
    teacher, student = load[TEACHER], load["coco_kd_faster_rcnn_r101_r50_fpn_1x"]
    assert (teacher.model.student.backbone, teacher.schedule.length, teacher.schedule.milestones) == (
        "tv/resnet101",
        24,
        [16, 22],  # MMDetection 2x
    )
    assert (student.model.student.backbone, student.schedule.length, student.schedule.milestones) == (
        "tv/resnet50",
        12,
        [8, 11],  # MMDetection 1x
    )
    assert (student.model.teacher.backbone, student.method.name, student.method.params["gamma"]) == (
        "tv/resnet101",
        "nkd",
        1.5,
    )
    assert student.model.teacher.checkpoint == f"runs/detection/{TEACHER}/best.pt"
    plain, uskd = load["coco_mask_rcnn_r50_fpn_1x"], load["coco_mask_rcnn_r50_fpn_1x_uskd"]
    assert plain.model.student.arch == "mask_rcnn" and plain.schedule.milestones == [8, 11]
    plain.model.student.backbone_weights, plain.output_dir = uskd.model.student.backbone_weights, uskd.output_dir
    assert plain == uskd  # the Table 7 pair differs in the backbone's pretraining only


@pytest.fixture(scope="module")
def backbone_files(tmp_path_factory) -> dict[str, Path]:
    """Random ResNet-50 / ResNet-101 classifiers in torchvision's layout, as the configs' backbone weights."""
    folder = tmp_path_factory.mktemp("backbones")
    return {
        name: export_state_dict(create_model(f"tv/{name}", 1000), folder / f"{name}.safetensors")
        for name in ("resnet50", "resnet101")
    }


@pytest.fixture(scope="module")
def one_step_teacher(tmp_path_factory, mosaics_root, backbone_files) -> Path:  # noqa: F811
    run_dir = tmp_path_factory.mktemp("protocol") / TEACHER
    overrides = [
        f"data.root={mosaics_root}",
        *ONE_STEP,
        f"model.student.backbone_weights={backbone_files['resnet101']}",
    ]
    train_detector(
        load_detection_config(REPO / f"configs/detection/{TEACHER}.yaml", [*overrides, f"output_dir={run_dir}"])
    )
    return run_dir / "best.pt"


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_config_trains_one_step_on_tiny_mosaics(path, tmp_path, mosaics_root, backbone_files, one_step_teacher):  # noqa: F811
    if path.stem == TEACHER:  # trained by the fixture, for the Table 13 student
        assert one_step_teacher.is_file()
        return
    cfg = load_detection_config(path, check_files=False)
    overrides = [f"data.root={mosaics_root}", *ONE_STEP, f"output_dir={tmp_path / 'run'}"]
    if cfg.model.student.backbone_weights is not None:
        backbone = cfg.model.student.backbone.split("/")[1]
        overrides.append(f"model.student.backbone_weights={backbone_files[backbone]}")
    if cfg.method.name != "baseline":
        overrides.append(f"model.teacher.checkpoint={one_step_teacher}")
    result = train_detector(load_detection_config(path, overrides))
    assert result["last"]["step"] == 1 and "bbox_AP" in result["last"]
    if cfg.model.student.arch == "mask_rcnn":
        assert "segm_AP" in result["last"]
