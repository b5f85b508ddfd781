"""USKD soft-label report (paper Fig. 3): JSON content consistent with ``uskd_soft_labels``, PNG written."""

from __future__ import annotations

import json
import re

import pytest
import torch

from unikd.losses import uskd_soft_labels
from unikd.methods import create_method
from unikd.models import create_model, feature_dim, forward_with_feature
from unikd.softlabels import save_soft_label_report, soft_label_report

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
    with pytest.raises(ValueError, match=re.escape("method: soft labels need the USKD method (with its weak head)")):
        soft_label_report(student, create_method("baseline", 10), images, targets, CLASS_NAMES)
    with pytest.raises(ValueError, match=re.escape("top_k: must be in [1, 9], got 10")):
        soft_label_report(student, method, images, targets, CLASS_NAMES, top_k=10)
    with pytest.raises(ValueError, match=re.escape("targets: expected class indices of shape (N,), got shape (6, 10)")):
        soft_label_report(student, method, images, torch.eye(10)[targets], CLASS_NAMES)
