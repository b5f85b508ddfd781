"""USKD soft-label report (paper Fig. 3): JSON content consistent with ``uskd_soft_labels``, PNG written."""

from __future__ import annotations

import json
import re

import pytest
import torch

from unikd._checkpoint import load_checkpoint
from unikd.config import load_config
from unikd.data import build_datasets
from unikd.losses import uskd_soft_labels
from unikd.methods import create_method
from unikd.models import create_model, export_state_dict, feature_dim, forward_with_feature, load_state_dict_file
from unikd.softlabels import (
    explanation,
    save_soft_label_report,
    soft_label_report,
    soft_labels_from_checkpoint,
    zipf_values,
)
from unikd.train import train

CLASS_NAMES = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    student = create_model("cifar/smallcnn", num_classes=10, in_chans=1)
    method = create_method("uskd", 10, feature_dim=feature_dim(student), rank="released")
    images = torch.randn(6, 1, 28, 28)
    targets = torch.tensor([6, 0, 2, 4, 9, 6])
    return student, method, images, targets


def test_report_matches_uskd_soft_labels_on_the_whole_batch(setup):
    student, method, images, targets = setup
    student.train()
    report = soft_label_report(student, method, images, targets, CLASS_NAMES, top_k=3)
    assert student.training and method.training  # modes restored

    student.eval()
    with torch.no_grad():
        logits, feature = forward_with_feature(student, images)
        soft = uskd_soft_labels(logits, method.weak_head(feature), targets, rank="released")
    student.train()

    assert [entry["index"] for entry in report] == list(range(6))
    for i, entry in enumerate(report):
        target = int(targets[i])
        assert (entry["target"], entry["target_name"]) == (target, CLASS_NAMES[target])
        assert entry["target_value"] == pytest.approx(float(soft.target_values[i, 0]), abs=1e-6)
        assert entry["student_target_prob"] == pytest.approx(float(logits[i].softmax(0)[target]), abs=1e-6)
        assert entry["prediction_name"] == CLASS_NAMES[int(logits[i].argmax())]
        values, classes = soft.non_target[i].topk(3)
        assert [item["class"] for item in entry["non_target"]] == classes.tolist()
        assert [item["name"] for item in entry["non_target"]] == [CLASS_NAMES[c] for c in classes.tolist()]
        assert [item["value"] for item in entry["non_target"]] == pytest.approx(values.tolist(), abs=1e-6)
        assert target not in classes.tolist()
    # Eq. 7 with hard labels: S_t^2 + 1 - mean(S_t^2) averages to exactly 1 over the batch it was computed on.
    assert sum(entry["target_value"] for entry in report) / len(report) == pytest.approx(1.0, abs=1e-6)


def test_save_writes_json_and_a_png_grid(setup, tmp_path):
    student, method, images, targets = setup
    report = soft_label_report(student, method, images[:3], targets[:3], CLASS_NAMES, top_k=2)
    json_path, png_path = save_soft_label_report(report, images[:3], tmp_path / "fig3")
    assert json_path == tmp_path / "fig3" / "soft_labels.json"
    assert json.loads(json_path.read_text()) == report
    png = png_path.read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_bad_inputs_are_named(setup):
    student, method, images, targets = setup
    with pytest.raises(ValueError, match=re.escape("class_names: expected 10 names (one per class), got 3")):
        soft_label_report(student, method, images, targets, CLASS_NAMES[:3])
    with pytest.raises(ValueError, match=re.escape("method: soft labels need the USKD method, got Baseline")):
        soft_label_report(student, create_method("baseline", 10), images, targets, CLASS_NAMES)
    with pytest.raises(ValueError, match=re.escape("top_k: must be in [1, 9], got 10")):
        soft_label_report(student, method, images, targets, CLASS_NAMES, top_k=10)
    with pytest.raises(ValueError, match=re.escape("targets: expected class indices of shape (N,), got shape (6, 10)")):
        soft_label_report(student, method, images, torch.eye(10)[targets], CLASS_NAMES)


def test_non_target_values_depend_only_on_the_target_rank_and_the_explanation_says_so(setup):
    student, method, images, targets = setup
    first = zipf_values(10)
    assert len(first) == 9 and sum(first) == pytest.approx(1.0)
    assert first[:2] == pytest.approx([0.5 / (sum(1 / r for r in range(1, 11)) - 1), (1 / 3) / 1.928968], rel=1e-5)
    possible = [zipf_values(10, rank)[:3] for rank in range(1, 11)]
    report = soft_label_report(student, method, images, targets, CLASS_NAMES, top_k=3)
    for entry in report:  # hard labels: Zipf's values for wherever the target ranked; only the classes differ
        values = [item["value"] for item in entry["non_target"]]
        assert any(values == pytest.approx(candidate, abs=1e-6) for candidate in possible), values
        assert entry["num_classes"] == 10
    assert explanation(10) == (
        "soft target = S_t^2 + 1 - batch mean of S_t^2 (Eq. 6): above 1 when the student is surer of this image than "
        "of the batch on average. Non-targets follow Zipf's law: the class ranked r of all 10 gets 1/r, renormalised "
        "over the 9 non-targets (0.259, 0.173, 0.130 for the top 3 when the target ranks first); the values depend "
        "only on the target's rank: what differs per image is which class holds which rank."
    )


def test_the_picture_carries_the_explanation(setup, tmp_path, monkeypatch):
    import matplotlib.figure

    student, method, images, targets = setup
    report = soft_label_report(student, method, images[:2], targets[:2], CLASS_NAMES, top_k=2)
    texts = []
    real_text = matplotlib.figure.Figure.text
    monkeypatch.setattr(
        matplotlib.figure.Figure, "text", lambda self, *a, **k: texts.append(a[2]) or real_text(self, *a, **k)
    )
    save_soft_label_report(report, images[:2], tmp_path, num_classes=10)
    assert len(texts) == 1 and " ".join(texts[0].split()) == explanation(10)


def test_report_follows_the_methods_soft_target_rule_grouping_and_weak_head_norm(setup):
    student, _, images, targets = setup
    method = create_method(
        "uskd", 10, feature_dim=feature_dim(student), weak_norm="layernorm", target_soft_label="max",
        batch_mean_group=3,
    )  # fmt: skip
    with torch.no_grad():
        method.weak_head_norm.weight.uniform_(0.5, 1.5)  # not the identity: the per-location norm must be used
    report = soft_label_report(student, method, images, targets, CLASS_NAMES, top_k=3)
    student.eval()
    with torch.no_grad():
        logits, feature_map = forward_with_feature(student, images, pool=False)
        soft = uskd_soft_labels(
            logits, method.weak_logits(feature_map), targets, target_soft_label="max", batch_mean_group=3
        )
    student.train()
    assert [entry["target_value"] for entry in report] == pytest.approx(soft.target_values[:, 0].tolist(), abs=1e-6)
    assert [e["non_target"][0]["class"] for e in report] == soft.non_target.argmax(1).tolist()
    assert report[0]["target_soft_label"] == "max" and explanation(10, target_soft_label="max").startswith(
        "soft target = S_t / batch max of S_t (Table 8)."
    )


def test_a_soft_target_from_another_model_needs_its_logits_and_a_run_without_weak_head_has_nothing_to_rank(setup):
    student, _, images, targets = setup
    method = create_method("uskd", 10, feature_dim=feature_dim(student), target_soft_label="teacher")
    teacher_logits = torch.randn(6, 10)
    report = soft_label_report(student, method, images, targets, CLASS_NAMES, teacher_logits=teacher_logits)
    expected = teacher_logits.softmax(1).gather(1, targets[:, None])[:, 0]
    assert [entry["target_value"] for entry in report] == pytest.approx(expected.tolist(), abs=1e-6)
    with pytest.raises(ValueError, match=re.escape("teacher_logits: target_soft_label='teacher' reads the target")):
        soft_label_report(student, method, images, targets, CLASS_NAMES)
    no_weak_head = create_method("uskd", 10, beta=0.0, mu=0.0)
    with pytest.raises(ValueError, match=re.escape("method: this USKD has no weak head (beta = 0 and mu = 0)")):
        soft_label_report(student, no_weak_head, images, targets, CLASS_NAMES)
    final_rank = create_method("uskd", 10, rank="final", mu=0.0)  # no weak head, and none needed
    assert len(soft_label_report(student, final_rank, images, targets, CLASS_NAMES)) == 6


@pytest.mark.parametrize("source", ["ema", "teacher"])
def test_soft_labels_of_a_run_take_the_target_probability_of_its_ema_copy_or_teacher(tmp_path, source):
    teacher_file = tmp_path / "teacher.safetensors"
    torch.manual_seed(5)
    export_state_dict(create_model("cifar/smallcnn", 10, width=4), teacher_file)
    teacher = [
        "model.teacher=cifar/smallcnn",
        "model.teacher_kwargs={width: 4}",
        f"model.teacher_checkpoint={teacher_file}",
    ]
    data = ["data.name=fake", "data.img_size=8", "data.train_subset=16", "data.val_subset=8", "data.num_workers=0"]
    overrides = [
        *data,
        *("model.student_kwargs={width: 4}", "method.name=uskd", f"method.target_soft_label={source}"),
        *("train.batch_size=8", "train.epochs=1", "train.progress=false", "train.tensorboard=false"),
        *(teacher if source == "teacher" else []),
        f"output_dir={tmp_path / 'run'}",
    ]
    train(load_config(None, overrides))
    given = teacher if source == "teacher" else []  # the teacher is not part of what a checkpoint is evaluated with
    report = soft_labels_from_checkpoint(tmp_path / "run" / "last.pt", tmp_path / "out", num_images=8,
                                         overrides=["data.val_subset=8", *given])  # fmt: skip
    model = create_model("cifar/smallcnn", 10, width=4)
    if source == "ema":
        model.load_state_dict(load_checkpoint(tmp_path / "run" / "last.pt")["ema"])
    else:
        model.load_state_dict(load_state_dict_file(teacher_file))
    bundle = build_datasets(load_config(None, data).data, with_train=False)
    images = torch.stack([bundle.val[i][0] for i in range(8)])
    targets = torch.tensor([bundle.val[i][1] for i in range(8)])
    with torch.no_grad():
        expected = model.eval()(images).softmax(1).gather(1, targets[:, None])[:, 0]
    assert [entry["target_value"] for entry in report] == pytest.approx(expected.tolist(), abs=1e-6)
    assert report[0]["target_soft_label"] == source and (tmp_path / "out" / "soft_labels.png").is_file()
