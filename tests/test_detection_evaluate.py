"""COCO evaluation: detections converted to COCO results (category ids, xywh boxes, RLE masks) and COCOeval's numbers.

Evaluation under DDP (2 gloo processes, gathered on rank 0) is tested with DDP training in test_detection_train.py.
"""

from __future__ import annotations

import pytest
import torch
from pycocotools import mask as mask_utils
from test_detection_support import SPLITS, fashion_mnist_idx, mosaics_root  # noqa: F401 (fixtures)
from torch import nn
from torch.utils.data import DataLoader

from unikd.detection.config import load_detection_config
from unikd.detection.data import build_detection_data, collate_detection
from unikd.detection.evaluate import COCO_STAT_NAMES, detections_to_coco, evaluate_detector, summarize_coco

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


class GroundTruthDetector(nn.Module):
    """Returns, for the images of the validation loader in order, their ground truth (optionally shifted boxes)."""

    def __init__(self, data, image_ids: list[int], shift: float = 0.0) -> None:
        super().__init__()
        self.outputs = []
        category_to_label = {category: label for label, category in enumerate(data.label_to_category) if label}
        for image_id in image_ids:
            annotations = data.val_ground_truth.imgToAnns[image_id]
            info = data.val_ground_truth.imgs[image_id]
            boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
            boxes[:, 2:] += boxes[:, :2]
            masks = (
                torch.stack([torch.from_numpy(mask_utils.decode(a["segmentation"])).float() for a in annotations])
                if annotations
                else torch.zeros(0, info["height"], info["width"])
            )
            self.outputs.append(
                {
                    "boxes": boxes + shift,
                    "labels": torch.tensor([category_to_label[a["category_id"]] for a in annotations]),
                    "scores": torch.linspace(0.9, 0.5, len(annotations)),
                    "masks": masks[:, None],
                }
            )
        self.position = 0

    def forward(self, images):
        outputs = self.outputs[self.position : self.position + len(images)]
        self.position += len(images)
        return outputs


def mosaics_data(root):
    return build_detection_data(
        load_detection_config(None, [f"data.root={root}", *SPLITS]).data, masks=True, train=False
    )


def test_the_ground_truth_as_detections_scores_100_and_shifted_boxes_less(mosaics_root):  # noqa: F811
    data = mosaics_data(mosaics_root)
    loader = DataLoader(data.val, batch_size=3, collate_fn=collate_detection)
    perfect = GroundTruthDetector(data, data.val_image_ids)
    metrics = evaluate_detector(
        perfect, loader, data.val_ground_truth, data.label_to_category, torch.device("cpu"), iou_types=("bbox", "segm")
    )
    assert metrics["bbox_AP"] == pytest.approx(100.0) and metrics["bbox_AP50"] == pytest.approx(100.0)
    assert metrics["bbox_AR"] == metrics["bbox_AR100"] == pytest.approx(100.0)
    assert metrics["segm_AP"] == pytest.approx(100.0)
    assert set(metrics) == {f"{kind}_{name}" for kind in ("bbox", "segm") for name in (*COCO_STAT_NAMES, "AR")}
    shifted = GroundTruthDetector(data, data.val_image_ids, shift=4.0)
    worse = evaluate_detector(shifted, loader, data.val_ground_truth, data.label_to_category, torch.device("cpu"))
    assert 0.0 < worse["bbox_AP"] < worse["bbox_AP50"] <= 100.0 and worse["bbox_AP"] < 90.0


def test_no_detection_scores_zero_everywhere(mosaics_root):  # noqa: F811
    data = mosaics_data(mosaics_root)
    metrics = summarize_coco(data.val_ground_truth, {"bbox": []})
    assert metrics == {**{f"bbox_{name}": 0.0 for name in COCO_STAT_NAMES}, "bbox_AR": 0.0}


def test_detections_become_coco_results_with_category_ids_and_xywh_boxes():
    output = {
        "boxes": torch.tensor([[1.0, 2.0, 11.0, 22.0]]),
        "labels": torch.tensor([2]),
        "scores": torch.tensor([0.75]),
        "masks": torch.zeros(1, 1, 30, 40),
    }
    output["masks"][0, 0, 2:22, 1:11] = 0.9
    entries = detections_to_coco(5, output, [0, 3, 7], ("bbox", "segm"))
    assert entries["bbox"] == [{"image_id": 5, "category_id": 7, "bbox": [1.0, 2.0, 10.0, 20.0], "score": 0.75}]
    rle = entries["segm"][0]["segmentation"]
    assert rle["size"] == [30, 40] and mask_utils.area({**rle, "counts": rle["counts"].encode()}) == 200
