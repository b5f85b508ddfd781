"""The detection benchmark end to end at toy size: mosaics, a pretrained backbone (classification engine), a teacher,
paired students, the interleaved step-time measurement, the table and plots; a rerun reuses finished runs."""

from __future__ import annotations

import json

import pytest
from test_detection_support import TINY, fashion_mnist_idx  # noqa: F401 (fixtures)

from unikd._errors import UnikdError
from unikd.detection.bench import PROFILES, DetectionProfile, Variant, run_detection_bench

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def toy_classifier(fashion_mnist_root) -> tuple[str, ...]:
    return (
        f"data.root={fashion_mnist_root}",
        "model.student=timm/resnet18",
        "model.student_kwargs={channels: [8, 16, 32, 64], stem_width: 8}",
        *("train.epochs=1", "train.batch_size=32", "data.train_subset=64", "data.val_subset=32"),
        *("data.num_workers=0", "train.progress=false", "train.tensorboard=false"),
    )


def toy_profile(fashion_mnist_root) -> DetectionProfile:
    classifier = toy_classifier(fashion_mnist_root)
    return DetectionProfile(
        description="toy",
        mosaics={"fashion_mnist_root": fashion_mnist_root, "num_train": 12, "num_val": 4, "canvas": 64},
        backbones={"small": ("configs/fmnist_baseline.yaml", classifier)},
        student_config="configs/detection/mosaics_student.yaml",
        variants={"baseline": Variant({"name": "baseline"}, "small"), "nkd": Variant({"name": "nkd"}, "small")},
        seeds=(0, 1),
        overrides=(*TINY, "schedule.length=2", "schedule.milestones=[1]", "train.eval_every=1"),
        teacher_config="configs/detection/mosaics_teacher.yaml",
        teacher_backbone="small",
        overhead_steps=1,
    )


@pytest.mark.slow
def test_a_toy_bench_writes_paired_results_overhead_and_plots_and_reruns_from_cache(tmp_path, fashion_mnist_idx):  # noqa: F811
    profile = toy_profile(fashion_mnist_idx)
    out = tmp_path / "bench"
    log = []
    results = run_detection_bench("toy", out, profile=profile, log=log.append)
    assert [row["variant"] for row in results["summary"]] == ["baseline", "nkd"]
    baseline, nkd = results["summary"]
    assert baseline["delta_bbox_AP"] == (0.0, 0.0) and baseline["seeds"] == nkd["seeds"] == [0, 1]
    for run in results["runs"]:
        assert len(run["history"]) == 2  # evaluations at steps 1 and 2
    assert nkd["deltas"] == [
        next(r for r in results["runs"] if r["variant"] == "nkd" and r["seed"] == seed)["last"]["bbox_AP"]
        - next(r for r in results["runs"] if r["variant"] == "baseline" and r["seed"] == seed)["last"]["bbox_AP"]
        for seed in (0, 1)
    ]
    assert results["overhead"]["baseline"]["ratio"] == 1.0 and results["overhead"]["nkd"]["step_s"] > 0
    assert "loss_nkd" in (out / "runs" / "nkd-s1" / "metrics.jsonl").read_text()
    table = (out / "results.md").read_text()
    assert "| variant | box AP | AP50 | AR | delta box AP (paired) | train time s | step ms | step ratio |" in table
    assert table.count("\n| nkd | ") == 1 and "Teacher box AP" in table
    assert (out / "curves.png").stat().st_size > 0 and (out / "bars.png").stat().st_size > 0
    assert json.loads((out / "results.json").read_text())["summary"] == json.loads(json.dumps(results["summary"]))

    stamp = (out / "runs" / "nkd-s0" / "final.json").stat().st_mtime_ns
    again = run_detection_bench("toy", out, profile=profile, methods=["nkd"], seeds=[0], log=log.append)
    assert (out / "runs" / "nkd-s0" / "final.json").stat().st_mtime_ns == stamp  # finished: not trained again
    assert [row["variant"] for row in again["summary"]] == ["baseline", "nkd"]  # the reference always comes along
    with pytest.raises(UnikdError, match=r"--resume: the config differs .* optim.lr 0.01 -> 0.02"):
        run_detection_bench("toy", out, profile=profile, overrides=["optim.lr=0.02"], log=log.append)


@pytest.mark.slow
def test_a_toy_table_7_bench_compares_mask_rcnn_on_plain_and_uskd_pretrained_backbones(tmp_path, fashion_mnist_idx):  # noqa: F811
    shipped = PROFILES["mosaics-uskd-backbone"]
    profile = DetectionProfile(
        description="toy Table 7",
        mosaics={"fashion_mnist_root": fashion_mnist_idx, "num_train": 12, "num_val": 4, "canvas": 64},
        backbones={
            name: (config, toy_classifier(fashion_mnist_idx)) for name, (config, _) in shipped.backbones.items()
        },
        student_config=shipped.student_config,
        variants=shipped.variants,
        seeds=(0,),
        overrides=(*TINY, "schedule.length=2", "schedule.milestones=[1]", "train.eval_every=2"),
    )
    results = run_detection_bench("toy-table7", tmp_path, profile=profile, log=lambda message: None)
    assert [row["variant"] for row in results["summary"]] == ["plain", "uskd"]
    assert {"segm_AP", "bbox_AR"} <= set(results["summary"][1]) and results["overhead"] is None
    uskd_backbone = (tmp_path / "backbones" / "uskd" / "metrics.jsonl").read_text()
    assert (
        "loss_uskd" in uskd_backbone
        and "loss_uskd" not in (tmp_path / "backbones" / "plain" / "metrics.jsonl").read_text()
    )
    assert "| uskd | " in (tmp_path / "results.md").read_text() and "mask AP" in (tmp_path / "results.md").read_text()


def test_the_shipped_profiles_and_a_wrong_name():
    cpu = PROFILES["mosaics-cpu"]
    assert list(cpu.variants) == ["baseline", "kd", "dkd", "nkd"] and cpu.seeds == (0, 1, 2)
    assert cpu.teacher_config == "configs/detection/mosaics_teacher.yaml" and cpu.overhead_steps > 0
    table7 = PROFILES["mosaics-uskd-backbone"]
    assert [variant.backbone for variant in table7.variants.values()] == ["plain", "uskd"]
    assert table7.backbones["uskd"][0] == "configs/fmnist_uskd.yaml"
    with pytest.raises(UnikdError) as error:
        run_detection_bench("mosaic-cpu", "unused")
    assert str(error.value) == (
        "PROFILE: 'mosaic-cpu' is not one of mosaics-cpu, mosaics-smoke, mosaics-uskd-backbone (did you mean "
        "'mosaics-cpu'?)"
    )
