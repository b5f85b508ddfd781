"""COCO evaluation of a detector with pycocotools' COCOeval, on one process or gathered from every DDP rank.

    metrics = evaluate_detector(model, loader, data.val_ground_truth, data.label_to_category, device,
                                image_ids=data.val_image_ids, iou_types=("bbox", "segm"))
    metrics["bbox_AP"], metrics["bbox_AP50"], metrics["bbox_AR"]       # percent, as COCO reports them

Each rank runs the detector on its share of the images and converts the detections to COCO results (category ids,
[x, y, w, h] boxes in the original image coordinates, RLE masks); rank 0 gathers them, runs COCOeval on the images
evaluated, and every rank returns the same metrics. The twelve numbers COCOeval's ``summarize`` prints come per IoU
type as ``<type>_AP`` (IoU .50:.95), ``_AP50``, ``_AP75``, ``_APs``/``_APm``/``_APl`` (small/medium/large), ``_AR1``,
``_AR10``, ``_AR100`` and ``_ARs``/``_ARm``/``_ARl``; ``_AR`` is ``_AR100``, the AR of COCO's leaderboard and of the
paper's Table 7. A value of -100 means COCO's -1: no ground truth of that size.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

__all__ = ["COCO_STAT_NAMES", "detections_to_coco", "evaluate_detector", "summarize_coco"]

COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@torch.no_grad()
def evaluate_detector(
    model: nn.Module,
    loader: DataLoader,
    ground_truth,
    label_to_category: list[int],
    device: torch.device,
    *,
    image_ids: list[int] | None = None,
    iou_types: tuple[str, ...] = ("bbox",),
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """COCO metrics (percent) of ``model`` on ``loader`` (batches of images and ``{"image_id"}`` targets).

    Args:
        ground_truth: pycocotools ``COCO`` of the annotation file (original category ids).
        label_to_category: the category id of each contiguous label (index 0: background).
        image_ids: the images scored (all of ``ground_truth`` when None); a subset must list exactly the images the
            loaders of all ranks together cover.
        iou_types: ``"bbox"`` and/or ``"segm"`` (masks of a Mask R-CNN).
    """
    was_training = model.training
    model.eval()
    results: dict[str, list[dict]] = {iou_type: [] for iou_type in iou_types}
    for images, targets in loader:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model([image.to(device, non_blocking=True) for image in images])
        for target, output in zip(targets, outputs):
            for iou_type, entries in detections_to_coco(
                target["image_id"], output, label_to_category, iou_types
            ).items():
                results[iou_type].extend(entries)
    model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(results, gathered, dst=0)
        metrics = [None]
        if dist.get_rank() == 0:
            merged = {iou_type: [entry for part in gathered for entry in part[iou_type]] for iou_type in iou_types}
            metrics = [summarize_coco(ground_truth, merged, image_ids)]
        dist.broadcast_object_list(metrics, src=0)
        return metrics[0]
    return summarize_coco(ground_truth, results, image_ids)


def detections_to_coco(
    image_id: int, output: dict[str, torch.Tensor], label_to_category: list[int], iou_types: tuple[str, ...]
) -> dict[str, list[dict]]:
    """One image's detections (torchvision's ``boxes`` xyxy, ``labels``, ``scores``, ``masks`` (N, 1, H, W)) as
    COCO result entries per IoU type."""
    boxes = output["boxes"].float().cpu()
    scores = output["scores"].float().cpu().tolist()
    categories = [label_to_category[label] for label in output["labels"].cpu().tolist()]
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    entries = {}
    if "bbox" in iou_types:
        entries["bbox"] = [
            {"image_id": image_id, "category_id": category, "bbox": box, "score": score}
            for category, box, score in zip(categories, xywh, scores)
        ]
    if "segm" in iou_types:
        from pycocotools import mask as mask_utils

        binary = (output["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)  # (N, H, W)
        rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0))) if len(binary) else []
        entries["segm"] = [
            {
                "image_id": image_id,
                "category_id": category,
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                "score": score,
            }
            for category, rle, score in zip(categories, rles, scores)
        ]
    return entries


def summarize_coco(ground_truth, results: dict[str, list[dict]], image_ids: list[int] | None = None) -> dict:
    """COCOeval per IoU type: ``{"<type>_<stat>": percent, ..., "<type>_AR": AR100}``; zeros without detections."""
    from pycocotools.cocoeval import COCOeval

    metrics = {}
    for iou_type, entries in results.items():
        if not entries:  # COCO.loadRes cannot take an empty list; no detection scores 0 everywhere
            stats = [0.0] * len(COCO_STAT_NAMES)
        else:
            with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its progress and table
                evaluator = COCOeval(ground_truth, ground_truth.loadRes(entries), iouType=iou_type)
                if image_ids is not None:
                    evaluator.params.imgIds = list(image_ids)
                evaluator.evaluate()
                evaluator.accumulate()
                evaluator.summarize()
            stats = [100.0 * float(value) for value in evaluator.stats]
        metrics.update({f"{iou_type}_{name}": value for name, value in zip(COCO_STAT_NAMES, stats)})
        metrics[f"{iou_type}_AR"] = metrics[f"{iou_type}_AR100"]
    return metrics
