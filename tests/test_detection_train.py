"""The detection engine and ``unikd detect``: tiny runs on tiny mosaics (CPU, a few steps each), every loss term
logged, Mask R-CNN, resume after a real SIGINT (bit-identical), schedules, errors, eval/export, and DDP with gloo.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_detection_evaluate import GroundTruthDetector, mosaics_data
from test_detection_support import (  # noqa: F401 (fixtures)
    TINY,
    fashion_mnist_idx,
    mosaics_root,
    read_metrics,
    teacher_checkpoint,
    tiny_config,
)
from torch.utils.data import DataLoader, Subset

from unikd._checkpoint import load_checkpoint
from unikd._errors import UnikdError
from unikd._optim import build_scheduler
from unikd.detection import cli
from unikd.detection.config import load_detection_config
from unikd.detection.data import collate_detection
from unikd.detection.distill import TrainableDetector
from unikd.detection.evaluate import evaluate_detector
from unikd.detection.models import create_detector
from unikd.detection.train import _step_schedule, evaluate_detection_checkpoint, train_detector
from unikd.models import load_state_dict_file

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
TORCHVISION_TERMS = ["loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    status = cli.main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def cli_overrides(root: Path, output_dir: Path, *extra: str) -> list[str]:
    return [f"data.root={root}", *TINY, f"output_dir={output_dir}", *extra]


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "detect.yaml"
    path.write_text("task: detection\nmethod:\n  name: baseline\n")
    return path


# ---- end to end -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_eval_export_through_the_cli(capsys, tmp_path, mosaics_root):  # noqa: F811
    run_dir = tmp_path / "run"
    config = write_config(tmp_path)
    status, out, err = run_cli(capsys, "detect", "train", str(config), *cli_overrides(mosaics_root, run_dir))
    assert status == 0, err
    assert out.startswith(f"unikd detect train: finished, outputs in {run_dir}\nbbox_AP ")
    assert {path.name for path in run_dir.iterdir()} >= {"config.yaml", "metrics.jsonl", "last.pt", "best.pt"}
    records = read_metrics(run_dir)
    train_records = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    for record in train_records:
        assert set(TORCHVISION_TERMS) <= set(record) and "loss_mask" not in record
        assert math.isclose(record["loss"], sum(record[name] for name in TORCHVISION_TERMS), rel_tol=1e-5)
    # Linear warm-up over 2 iterations from lr x 0.001, then x0.1 from iteration 3 (schedule.milestones=[3]).
    assert [r["lr"] for r in train_records] == pytest.approx([1e-5, 0.005005, 0.01, 0.001])
    val = [r for r in records if r["split"] == "val"]
    assert len(val) == 1 and val[0]["step"] == 4 and {"bbox_AP", "bbox_AP50", "bbox_AP75", "bbox_AR"} <= set(val[0])
    final = json.loads((run_dir / "final.json").read_text())
    assert final["best_step"] == 4 and final["last"]["bbox_AP"] == val[0]["bbox_AP"]

    status, out, err = run_cli(capsys, "detect", "eval", str(run_dir / "best.pt"))
    assert status == 0, err
    assert out == f"bbox_AP {val[0]['bbox_AP']:.2f}  bbox_AP50 {val[0]['bbox_AP50']:.2f}  " + (
        f"bbox_AP75 {val[0]['bbox_AP75']:.2f}  bbox_AR {val[0]['bbox_AR']:.2f}\n"
    )
    status, out, err = run_cli(capsys, "detect", "export", str(run_dir / "best.pt"), str(tmp_path / "d.safetensors"))
    assert status == 0, err
    cfg = load_detection_config(run_dir / "config.yaml", check_files=False)
    rebuilt = create_detector(
        "faster_rcnn",
        10,
        backbone=cfg.model.student.backbone,
        fpn_channels=16,
        representation_size=32,
        backbone_kwargs=cfg.model.student.backbone_kwargs,
    )
    rebuilt.load_state_dict(load_state_dict_file(tmp_path / "d.safetensors"), strict=True)

    status, _, err = run_cli(capsys, "detect", "train", str(config), *cli_overrides(mosaics_root, run_dir))
    assert status == 2
    assert err == (
        f"unikd: error: output_dir {run_dir} already holds a run ({run_dir / 'last.pt'}); pass --resume to continue "
        "it, or choose another output_dir\n"
    )


@pytest.mark.slow
def test_nkd_adds_its_term_to_torchvisions_and_logs_each(tmp_path, mosaics_root, teacher_checkpoint):  # noqa: F811
    cfg = tiny_config(
        mosaics_root, tmp_path / "nkd", "method.name=nkd", f"model.teacher.checkpoint={teacher_checkpoint}"
    )
    train_detector(cfg)
    train_records = [r for r in read_metrics(tmp_path / "nkd") if r["split"] == "train"]
    for record in train_records:
        terms = [*TORCHVISION_TERMS, "loss_nkd"]
        assert record["loss_nkd"] > 0
        assert math.isclose(record["loss"], sum(record[name] for name in terms), rel_tol=1e-5)


@pytest.mark.slow
def test_mask_rcnn_trains_with_its_mask_loss_and_reports_mask_ap(tmp_path, mosaics_root):  # noqa: F811
    result = train_detector(
        tiny_config(mosaics_root, tmp_path / "mask", "model.student.arch=mask_rcnn", "train.amp=bf16")
    )
    records = read_metrics(tmp_path / "mask")
    assert all(r["loss_mask"] > 0 for r in records if r["split"] == "train")
    assert {"segm_AP", "segm_AR", "bbox_AP"} <= set(result["last"])


# ---- resume -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, mosaics_root, monkeypatch):  # noqa: F811
    overrides = [
        "schedule.length=2",
        "schedule.unit=epoch",
        "schedule.milestones=[1]",
        "train.eval_every=1",
        "train.max_steps_per_epoch=2",
    ]
    reference = tmp_path / "reference"
    train_detector(tiny_config(mosaics_root, reference, *overrides))

    original = TrainableDetector.forward
    calls = {"count": 0}

    def interrupting(self, *args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 3:  # during the first step of epoch 1: the engine finishes it, saves, and stops
            signal.raise_signal(signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TrainableDetector, "forward", interrupting)
    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt, match="continue with --resume"):
        train_detector(tiny_config(mosaics_root, resumed, *overrides))
    assert load_checkpoint(resumed / "last.pt")["step"] == 3
    monkeypatch.setattr(TrainableDetector, "forward", original)
    train_detector(tiny_config(mosaics_root, resumed, *overrides), resume=True)

    expected, got = load_checkpoint(reference / "last.pt"), load_checkpoint(resumed / "last.pt")
    assert got["step"] == expected["step"] == 4
    assert all(torch.equal(got["model"][key], value) for key, value in expected["model"].items())
    steps = [r["step"] for r in read_metrics(resumed) if r["split"] == "train"]
    assert steps == [1, 2, 3, 4]
    resumed_last, reference_last = (
        json.loads((run / "final.json").read_text())["last"] for run in (resumed, reference)
    )
    assert {k: v for k, v in resumed_last.items() if k.startswith("bbox_")} == {
        k: v for k, v in reference_last.items() if k.startswith("bbox_")
    }


@pytest.mark.slow
def test_resume_checks_the_config_and_repairs_a_kill_between_the_two_checkpoint_writes(tmp_path, mosaics_root):  # noqa: F811
    run_dir = tmp_path / "run"
    overrides = ["schedule.length=4", "train.eval_every=2", "schedule.milestones=[3]"]
    train_detector(tiny_config(mosaics_root, run_dir, *overrides))
    with pytest.raises(UnikdError) as error:
        train_detector(tiny_config(mosaics_root, run_dir, *overrides, "optim.lr=0.02"), resume=True)
    assert str(error.value).startswith(
        f"--resume: the config differs from the one {run_dir / 'last.pt'} was trained with: optim.lr 0.01 -> 0.02. "
        "Only output_dir, data.root, "
    )
    # A kill between best.pt and last.pt at a new best at step 4 leaves best.pt at step 4 and last.pt at step 2.
    step_2, step_4 = load_checkpoint(run_dir / "best.pt"), load_checkpoint(run_dir / "last.pt")
    assert (step_2["step"], step_4["step"]) == (2, 4)  # the tiny detector did not improve at step 4
    step_4["metrics"].update(best_step=4, best_bbox_AP=1.0)
    torch.save(step_4, run_dir / "best.pt")
    torch.save(step_2, run_dir / "last.pt")
    result = train_detector(tiny_config(mosaics_root, run_dir, *overrides, "schedule.length=5"), resume=True)
    assert result["last"]["step"] == 5 and load_checkpoint(run_dir / "last.pt")["step"] == 5  # rolled forward to 4
    assert [r["step"] for r in read_metrics(run_dir) if r["split"] == "train"] == [1, 2, 3, 4, 5]


def test_a_locked_run_directory_is_refused(tmp_path, mosaics_root):  # noqa: F811
    from unikd._rundir import lock_run_directory

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with lock_run_directory(run_dir), pytest.raises(UnikdError, match="is in use by another unikd run"):
        train_detector(tiny_config(mosaics_root, run_dir))


def test_a_non_finite_model_state_is_never_saved(tmp_path, mosaics_root, monkeypatch):  # noqa: F811
    original = TrainableDetector.forward

    def overflowing(self, *args, **kwargs):
        self.student.backbone.body.bn1.running_var.fill_(float("inf"))  # the loss stays finite (batch statistics)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TrainableDetector, "forward", overflowing)
    with pytest.raises(UnikdError) as error:
        train_detector(
            tiny_config(
                mosaics_root, tmp_path / "run", "schedule.length=2", "schedule.milestones=[1]", "train.eval_every=2"
            )
        )
    assert str(error.value) == (
        "non-finite model state at step 2: student.backbone.body.bn1.running_var; not saved, no checkpoint was "
        "written yet. Lower optim.lr, lengthen schedule.warmup_iters or set optim.clip_grad_norm"
    )
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_checkpoint_whose_weights_do_not_fit_its_detector_is_one_line(tmp_path, teacher_checkpoint):  # noqa: F811
    checkpoint = load_checkpoint(teacher_checkpoint)
    del checkpoint["model"]["roi_heads.box_predictor.cls_score.bias"]
    torch.save(checkpoint, tmp_path / "edited.pt")
    with pytest.raises(UnikdError) as error:
        evaluate_detection_checkpoint(tmp_path / "edited.pt", ["train.device=cpu"])
    assert str(error.value).startswith(
        f"{tmp_path / 'edited.pt'} (weights for model_name faster_rcnn/timm/resnet18 with 10 classes) does not fit "
        "the model: missing entries (1): roi_heads.box_predictor.cls_score.bias; the file was edited or mixes two "
        "models"
    )


def test_resume_without_a_checkpoint_says_so(tmp_path, mosaics_root):  # noqa: F811
    with pytest.raises(UnikdError) as error:
        train_detector(tiny_config(mosaics_root, tmp_path / "none"), resume=True)
    assert str(error.value) == (
        f"--resume: no checkpoint {tmp_path / 'none' / 'last.pt'} to resume from; run without --resume to start a "
        "new run there"
    )


def test_a_non_finite_loss_stops_the_run_and_names_the_term(tmp_path, mosaics_root, monkeypatch):  # noqa: F811
    original = TrainableDetector.forward

    def broken(self, *args, **kwargs):
        losses = original(self, *args, **kwargs)
        return {**losses, "loss_box_reg": losses["loss_box_reg"] * float("nan")}

    monkeypatch.setattr(TrainableDetector, "forward", broken)
    with pytest.raises(UnikdError, match=r"non-finite loss at step 1 \(epoch 0\): loss_box_reg=nan; no checkpoint"):
        train_detector(tiny_config(mosaics_root, tmp_path / "nan"))


# ---- schedules --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("unit", "unit_steps", "checks"),
    [
        # MMDetection 1x in epochs (100 steps an epoch): warm-up 500 iterations, x0.1 at epochs 8 and 11.
        ("epoch", 100, {0: 0.001, 250: 0.5005, 500: 1.0, 799: 1.0, 800: 0.1, 1099: 0.1, 1100: 0.01}),
        # Detectron2's 1x in iterations: 90k steps, x0.1 at 60k and 80k.
        ("iter", 1, {0: 0.001, 500: 1.0, 59999: 1.0, 60000: 0.1, 80000: 0.01}),
    ],
)
def test_step_schedules_in_epochs_or_iterations(unit, unit_steps, checks):
    milestones = "[8, 11]" if unit == "epoch" else "[60000, 80000]"
    length = 12 if unit == "epoch" else 90000
    cfg = load_detection_config(
        None,
        [f"schedule.unit={unit}", f"schedule.length={length}", f"schedule.milestones={milestones}"],
        check_files=False,
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    scheduler = build_scheduler(optimizer, _step_schedule(cfg, unit_steps), cfg.optim.lr, length, unit_steps)
    for step, factor in checks.items():
        assert scheduler.lr_lambdas[0](step) == pytest.approx(factor), step


# ---- errors through the CLI -------------------------------------------------------------------------------------


def test_a_classification_config_is_refused_by_detect_train(capsys, tmp_path):
    config = tmp_path / "fmnist.yaml"
    config.write_text("data:\n  name: fashion_mnist\n")
    status, _, err = run_cli(capsys, "detect", "train", str(config))
    assert status == 2
    assert err == (
        f"unikd: error: {config}: not a detection config (no 'task: detection' line); classification configs run "
        "with 'unikd train', detection configs start with 'task: detection'\n"
    )


def test_bad_annotations_fail_before_training_with_one_line(capsys, tmp_path, mosaics_root):  # noqa: F811
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [], "categories": [], "annotations": [')
    status, _, err = run_cli(
        capsys,
        "detect",
        "train",
        str(write_config(tmp_path)),
        *cli_overrides(mosaics_root, tmp_path / "run", f"data.val_annotations={broken}"),
    )
    assert status == 2 and err.count("\n") == 1
    assert err.startswith(f"unikd: error: {broken}: not valid JSON (line 1, column 50")


def test_export_refuses_other_suffixes_and_classification_checkpoints(capsys, tmp_path):
    status, _, err = run_cli(capsys, "detect", "export", "x.pt", str(tmp_path / "out.onnx"))
    assert (
        status == 2
        and err == f"unikd: error: OUT: {tmp_path / 'out.onnx'} must end with one of .pt, .pth, .safetensors\n"
    )


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["export"], ["config"], ["mosaics"], ["bench"]])
def test_help_of_every_detect_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["detect", *command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: unikd detect {' '.join(command)}".rstrip())


def test_detect_config_prints_the_resolved_config(capsys, tmp_path, mosaics_root):  # noqa: F811
    status, out, err = run_cli(
        capsys, "detect", "config", str(write_config(tmp_path)), *cli_overrides(mosaics_root, tmp_path)
    )
    assert status == 0, err
    assert out.startswith("task: detection\ndata:\n") and "  representation_size: 32\n" in out
    status, out, err = run_cli(capsys, "detect", "config", str(write_config(tmp_path)), "data.root=/nowhere")
    assert status == 2 and out == ""
    assert err.startswith("unikd: error: data.train_annotations: file not found: /nowhere/annotations/")


def test_detect_mosaics_writes_a_dataset(capsys, tmp_path, fashion_mnist_idx):  # noqa: F811
    status, out, err = run_cli(
        capsys,
        "detect",
        "mosaics",
        "--out",
        str(tmp_path / "m"),
        "--fashion-mnist",
        str(fashion_mnist_idx),
        "--train",
        "3",
        "--val",
        "2",
        "--canvas",
        "64",
        "--scale",
        "0.8",
        "1.2",
    )
    assert status == 0, err
    assert out.startswith("wrote 3 train and 2 val mosaics (")
    assert (tmp_path / "m" / "annotations" / "instances_val.json").is_file()


# ---- DDP --------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, root: str, output_dir: str) -> None:
    """What torchrun does for each process (the rendezvous environment), then the trainer, then an evaluation of
    known detections (the ground truth, shifted) on this rank's share of the images, in the same process group."""
    import torch.distributed as dist

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # the trainer joins it and leaves it to us
    try:
        overrides = ("schedule.length=2", "schedule.milestones=[1]", "train.eval_every=2")
        result = train_detector(tiny_config(Path(root), Path(output_dir), *overrides))
        data = mosaics_data(root)
        shard = list(range(rank, len(data.val), world_size))
        known = evaluate_detector(
            GroundTruthDetector(data, [data.val_image_ids[index] for index in shard], shift=3.0),
            DataLoader(Subset(data.val, shard), batch_size=2, collate_fn=collate_detection),
            data.val_ground_truth,
            data.label_to_category,
            torch.device("cpu"),
            image_ids=data.val_image_ids,
            iou_types=("bbox", "segm"),
        )
        Path(f"{output_dir}.rank{rank}.json").write_text(json.dumps({"trained": result["last"], "known": known}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_on_two_processes_trains_and_gathers_the_evaluation(tmp_path, mosaics_root):  # noqa: F811
    run_dir = tmp_path / "ddp"
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(mosaics_root), str(run_dir)), nprocs=2, join=True)
    on_ranks = [json.loads(Path(f"{run_dir}.rank{rank}.json").read_text()) for rank in range(2)]
    checkpoint = load_checkpoint(run_dir / "last.pt")
    assert checkpoint["step"] == 2 and checkpoint["steps_per_epoch"] == 12  # 24 images, 1 per rank per step
    assert not list(tmp_path.glob("ddp/*rank1*"))
    # Every rank returns rank 0's COCOeval of the detections gathered from both ranks ...
    trained = [{k: v for k, v in r["trained"].items() if k.startswith("bbox_")} for r in on_ranks]
    assert (
        trained[0]
        == trained[1]
        == pytest.approx(
            {k: v for k, v in evaluate_detection_checkpoint(run_dir / "last.pt").items() if k.startswith("bbox_")}
        )
    )
    # ... which is the evaluation of one process over every image.
    data = mosaics_data(mosaics_root)
    single = evaluate_detector(
        GroundTruthDetector(data, data.val_image_ids, shift=3.0),
        DataLoader(data.val, batch_size=2, collate_fn=collate_detection),
        data.val_ground_truth,
        data.label_to_category,
        torch.device("cpu"),
        iou_types=("bbox", "segm"),
    )
    assert on_ranks[0]["known"] == on_ranks[1]["known"] == pytest.approx(single)
    assert 0 < single["bbox_AP"] < 100 and single["segm_AP"] == pytest.approx(100.0)  # masks are not shifted
