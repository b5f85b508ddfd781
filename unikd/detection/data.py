"""COCO-format detection data: annotation files checked up front, torchvision's ``CocoDetection`` + transforms v2.

    data = build_detection_data(cfg.data, masks=True)
    image, target = data.train[0]      # (3, H, W) float in [0, 1]; boxes (K, 4) xyxy, labels (K,) 1..C, masks (K, H, W)

A split is an images folder plus a COCO instances JSON (``images``, ``annotations``, ``categories``). Before any
training, ``read_coco_annotations`` checks the whole file and stops with a one-line ``UnikdError`` that names the
file, the annotation or image id and the fix for: invalid JSON, a missing section, an annotation whose image or
category is not in the file, a bbox that is not 4 finite numbers, a missing segmentation (Mask R-CNN), an image file
that is not there. Boxes that reach outside their image are clipped to it, and boxes with no area inside it are
dropped, with the counts in a warning (``data.invalid_boxes=error`` stops at the first instead).

Categories map to contiguous labels 1..C in the order of their ids (0 is the background); ``label_to_category``
maps back for COCO evaluation. Training uses the non-crowd boxes and, like torchvision's reference scripts and
MMDetection, only images that have one. Training images get a random horizontal flip (transforms v2 flips boxes and
masks with the image); resizing to ``data.min_size``/``max_size`` and normalisation happen in the detector's
``GeneralizedRCNNTransform``, which scales boxes and masks with the image, so evaluation boxes come back in the
original image coordinates, as COCOeval expects.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, VisionDataset, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2

from unikd._errors import DataError, UnikdError
from unikd.detection.config import DetectionDataConfig, resolve_path

__all__ = [
    "CocoAnnotations",
    "DetectionData",
    "build_detection_data",
    "coco_ground_truth",
    "collate_detection",
    "read_coco_annotations",
]

_SECTIONS = ("images", "annotations", "categories")
# Boxes may reach this far (pixels) past the image border without counting as outside: float rounding in tools.
_BORDER_TOLERANCE = 1.0


@dataclass
class CocoAnnotations:
    """A checked COCO instances file: ``dataset`` is its dict with only usable boxes (original coordinates) and
    ``train_dataset`` the training view (non-crowd boxes clipped to their image)."""

    path: Path
    images_dir: Path
    dataset: dict
    train_dataset: dict
    categories: list[dict]  # {"id", "name"}, sorted by id
    dropped: int = 0
    clipped: int = 0


@dataclass
class DetectionData:
    """The training and validation sets of a run and what evaluation needs to score against the ground truth."""

    train: Dataset | None
    val: Dataset
    val_ground_truth: Any  # pycocotools COCO of the validation file
    val_image_ids: list[int]
    categories: list[dict]

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def label_to_category(self) -> list[int]:
        """``label_to_category[label]``: the COCO category id of contiguous label 1..C (index 0: background)."""
        return [0, *(category["id"] for category in self.categories)]


def build_detection_data(data_cfg: DetectionDataConfig, *, masks: bool = False, train: bool = True) -> DetectionData:
    """The training and validation sets of ``data_cfg`` (``masks``: targets carry instance masks; ``train=False``:
    the validation split only, ``DetectionData.train`` is None)."""
    val = _read_split(data_cfg, "val", masks)
    category_to_label = {category["id"]: label for label, category in enumerate(val.categories, start=1)}
    val_ids = _subset(sorted(image["id"] for image in val.dataset["images"]), data_cfg.val_subset)
    val_transforms = v2.Compose(
        [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), _DetectionTarget(val, category_to_label, False)]
    )
    val_ground_truth = coco_ground_truth(val.dataset)
    val_set = _CocoImages(val.images_dir, val_ground_truth, val_ids, val_transforms)
    train_set = None
    if train:
        train_set = _train_set(data_cfg, masks, val)
    return DetectionData(
        train=train_set,
        val=wrap_dataset_for_transforms_v2(val_set, target_keys=("image_id",)),
        val_ground_truth=val_ground_truth,
        val_image_ids=val_ids,
        categories=val.categories,
    )


def _read_split(data_cfg: DetectionDataConfig, split: str, masks: bool) -> CocoAnnotations:
    """The annotations of ``split`` ("train" or "val"): ``data.<split>_annotations`` and ``data.<split>_images``."""
    return read_coco_annotations(
        resolve_path(data_cfg, getattr(data_cfg, f"{split}_annotations")),
        resolve_path(data_cfg, getattr(data_cfg, f"{split}_images")),
        key=f"data.{split}_annotations",
        invalid_boxes=data_cfg.invalid_boxes,
        need_masks=masks,
    )


def _train_set(data_cfg: DetectionDataConfig, masks: bool, val: CocoAnnotations) -> Dataset:
    train = _read_split(data_cfg, "train", masks)
    if train.categories != val.categories:
        raise UnikdError(
            f"data.val_annotations: {val.path} has the categories {_describe_categories(val.categories)}, but "
            f"{train.path} has {_describe_categories(train.categories)}; both splits need the same categories"
        )
    category_to_label = {category["id"]: label for label, category in enumerate(train.categories, start=1)}
    with_boxes = {annotation["image_id"] for annotation in train.train_dataset["annotations"]}
    train_ids = _subset(
        sorted(image["id"] for image in train.dataset["images"] if image["id"] in with_boxes), data_cfg.train_subset
    )
    transforms = v2.Compose(
        [
            v2.ToImage(),
            v2.RandomHorizontalFlip(data_cfg.hflip),
            v2.ToDtype(torch.float32, scale=True),
            _DetectionTarget(train, category_to_label, masks),
        ]
    )
    dataset = _CocoImages(train.images_dir, coco_ground_truth(train.train_dataset), train_ids, transforms)
    target_keys = ("image_id", "boxes", "labels", *(("masks",) if masks else ()))
    return wrap_dataset_for_transforms_v2(dataset, target_keys=target_keys)


def _describe_categories(categories: list[dict]) -> str:
    shown = ", ".join(f"{category['id']}: {category['name']}" for category in categories[:4])
    return f"[{shown}{', ...' if len(categories) > 4 else ''}] ({len(categories)})"


def collate_detection(batch: list[tuple]) -> tuple[list[torch.Tensor], list[dict]]:
    """A batch as torchvision's detectors take it: a list of images and a list of target dicts."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def coco_ground_truth(dataset: dict):
    """A pycocotools ``COCO`` index over an annotation dict (without pycocotools' progress prints)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


# ---- checking an annotation file --------------------------------------------------------------------------------


def read_coco_annotations(
    path: str | os.PathLike,
    images_dir: str | os.PathLike,
    *,
    key: str = "data.train_annotations",
    invalid_boxes: str = "drop",
    need_masks: bool = False,
    check_images: bool = True,
) -> CocoAnnotations:
    """Read and check the COCO instances file ``path`` whose images are in ``images_dir`` (see the module docstring).

    ``key`` is the config key named in errors. Raises ``UnikdError``; warns with the counts of clipped/dropped boxes.
    """
    path, images_dir = Path(path), Path(images_dir)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise UnikdError(f"{key}: file not found: {path}") from None
    except json.JSONDecodeError as error:
        raise UnikdError(
            f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); {key} must be a "
            "COCO instances file"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise UnikdError(f"{key}: cannot read {path}: {error}") from None
    if not isinstance(raw, dict) or any(not isinstance(raw.get(section), list) for section in _SECTIONS):
        missing = [s for s in _SECTIONS if not isinstance(raw, dict) or not isinstance(raw.get(s), list)]
        raise UnikdError(
            f"{path}: no {' / '.join(repr(s) for s in missing)} list; a COCO instances file ({key}) holds the lists "
            "images, annotations and categories"
        )
    categories = _check_categories(raw["categories"], path)
    images = _check_images(raw["images"], path)
    if check_images:
        _check_image_files(images, images_dir, path, key)
    category_ids = {category["id"] for category in categories}
    kept, train_annotations = [], []
    dropped, clipped, first_dropped = 0, 0, None
    for annotation in raw["annotations"]:
        image = _check_annotation(annotation, images, category_ids, path)
        box, outside = _clip_box(annotation["bbox"], image)
        problem = "has no area inside the image" if box is None else "extends outside the image" if outside else None
        if problem and invalid_boxes == "error":
            fix = "drop such boxes" if box is None else "clip such boxes to the image"
            raise UnikdError(
                f"{path}: annotation {annotation['id']} (image {image['id']}, {image['width']}x{image['height']}): "
                f"the box {annotation['bbox']} {problem}; fix it, or set data.invalid_boxes=drop to {fix}"
            )
        if box is None:
            dropped += 1
            first_dropped = annotation["id"] if first_dropped is None else first_dropped
            continue
        clipped += outside
        annotation = {"iscrowd": 0, "area": box[2] * box[3], **annotation}
        if need_masks and not annotation["iscrowd"]:
            _check_segmentation(annotation, image, path)
        kept.append(annotation)
        if not annotation["iscrowd"]:
            train_annotations.append({**annotation, "bbox": box})
    notes = []
    if dropped:
        notes.append(f"dropped {_boxes(dropped)} with no area inside their image (first: annotation {first_dropped})")
    if clipped:
        notes.append(f"clipped {_boxes(clipped)} that reached outside their image")
    if notes:
        warnings.warn(f"{path}: {' and '.join(notes)}", UserWarning, stacklevel=2)
    dataset = {"info": raw.get("info", {}), "images": raw["images"], "categories": categories, "annotations": kept}
    train_dataset = {**dataset, "annotations": train_annotations}
    return CocoAnnotations(path, images_dir, dataset, train_dataset, categories, dropped, clipped)


def _check_categories(categories: list, path: Path) -> list[dict]:
    seen = set()
    for index, category in enumerate(categories):
        if not isinstance(category, dict) or not _is_int(category.get("id")) or "name" not in category:
            raise UnikdError(f"{path}: categories[{index}] must be a mapping with an integer 'id' and a 'name'")
        if category["id"] in seen:
            raise UnikdError(f"{path}: category id {category['id']} appears twice in categories; ids must be unique")
        seen.add(category["id"])
    if not categories:
        raise UnikdError(f"{path}: the categories list is empty; a detection dataset needs at least one category")
    return sorted(({"id": c["id"], "name": c["name"]} for c in categories), key=lambda category: category["id"])


def _check_images(images: list, path: Path) -> dict[int, dict]:
    by_id = {}
    for index, image in enumerate(images):
        if not isinstance(image, dict) or not _is_int(image.get("id")) or not isinstance(image.get("file_name"), str):
            raise UnikdError(f"{path}: images[{index}] must be a mapping with an integer 'id' and a 'file_name'")
        for side in ("width", "height"):
            if not _is_int(image.get(side)) or image[side] < 1:
                raise UnikdError(
                    f"{path}: image {image['id']} ({image['file_name']}): '{side}' must be a positive integer, "
                    f"got {image.get(side)!r}"
                )
        if image["id"] in by_id:
            raise UnikdError(f"{path}: image id {image['id']} appears twice in images; ids must be unique")
        by_id[image["id"]] = image
    return by_id


def _check_image_files(images: dict[int, dict], images_dir: Path, path: Path, key: str) -> None:
    missing = [image for image in images.values() if not (images_dir / image["file_name"]).is_file()]
    if missing:
        images_key = key.replace("annotations", "images")
        raise UnikdError(
            f"{images_key}: image file {images_dir / missing[0]['file_name']} not found (image {missing[0]['id']} "
            f"of {path}; {len(missing)} of {len(images)} images missing); point {images_key} (relative to "
            "data.root) at the folder that holds the images"
        )


def _check_annotation(annotation: Any, images: dict[int, dict], category_ids: set[int], path: Path) -> dict:
    """The annotation's image; raises for a malformed annotation."""
    if not isinstance(annotation, dict) or not _is_int(annotation.get("id")):
        raise UnikdError(f"{path}: every annotation must be a mapping with an integer 'id', got {annotation!r:.80}")
    name = f"{path}: annotation {annotation['id']}"
    image = images.get(annotation.get("image_id"))
    if image is None:
        raise UnikdError(
            f"{name} refers to image_id {annotation.get('image_id')!r}, which is not in the file's images; "
            "fix the annotation or add the image"
        )
    if annotation.get("category_id") not in category_ids:
        shown = ", ".join(map(str, sorted(category_ids)[:12])) + (", ..." if len(category_ids) > 12 else "")
        raise UnikdError(
            f"{name} has category_id {annotation.get('category_id')!r}, which is not in the file's categories "
            f"(ids {shown}); add the category to 'categories' or fix the annotation"
        )
    bbox = annotation.get("bbox")
    if not (
        isinstance(bbox, list)
        and len(bbox) == 4
        and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
    ):
        raise UnikdError(f"{name} (image {image['id']}): bbox must be [x, y, width, height], 4 numbers; got {bbox!r}")
    if annotation.get("iscrowd", 0) not in (0, 1):
        raise UnikdError(f"{name}: iscrowd must be 0 or 1, got {annotation['iscrowd']!r}")
    return image


def _clip_box(bbox: list[float], image: dict) -> tuple[list[float] | None, bool]:
    """(the [x, y, w, h] box clipped to the image, or None when no area is left; whether it reached outside)."""
    x0, y0, width, height = bbox
    x1, y1 = x0 + width, y0 + height
    outside = (
        min(x0, y0, x1, y1) < -_BORDER_TOLERANCE
        or max(x0, x1) > image["width"] + _BORDER_TOLERANCE
        or max(y0, y1) > image["height"] + _BORDER_TOLERANCE
    )
    x0, x1 = max(0.0, min(x0, x1)), min(float(image["width"]), max(x0, x1))
    y0, y1 = max(0.0, min(y0, y1)), min(float(image["height"]), max(y0, y1))
    if width <= 0 or height <= 0 or x1 <= x0 or y1 <= y0:
        return None, outside
    return [x0, y0, x1 - x0, y1 - y0], outside


def _check_segmentation(annotation: dict, image: dict, path: Path) -> None:
    segmentation = annotation.get("segmentation")
    name = f"{path}: annotation {annotation['id']} (image {image['id']})"
    if isinstance(segmentation, dict):
        if "counts" not in segmentation or list(segmentation.get("size", [])) != [image["height"], image["width"]]:
            raise UnikdError(
                f"{name}: an RLE segmentation needs 'counts' and size [height, width] = "
                f"[{image['height']}, {image['width']}], got size {segmentation.get('size')!r}"
            )
        return
    if (
        isinstance(segmentation, list)
        and segmentation
        and all(isinstance(polygon, list) and len(polygon) >= 6 and len(polygon) % 2 == 0 for polygon in segmentation)
    ):
        return
    raise UnikdError(
        f"{name}: Mask R-CNN needs a segmentation (polygons [[x1, y1, x2, y2, x3, y3, ...], ...] or RLE), got "
        f"{segmentation!r:.60}; add the masks or train model.student.arch=faster_rcnn"
    )


def _boxes(count: int) -> str:
    return f"{count} box" if count == 1 else f"{count} boxes"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _subset(image_ids: list[int], size: int | None) -> list[int]:
    """A fixed random subset (seed 0) of ``size`` ids, in id order; all ids when ``size`` is None or larger."""
    if size is None or size >= len(image_ids):
        return image_ids
    chosen = np.random.default_rng(0).permutation(len(image_ids))[:size]
    return [image_ids[index] for index in sorted(chosen)]


# ---- datasets ---------------------------------------------------------------------------------------------------


class _CocoImages(CocoDetection):
    """torchvision's ``CocoDetection`` over an annotation index already read and checked (the JSON is read once)."""

    def __init__(self, images_dir: Path, coco, image_ids: list[int], transforms) -> None:
        VisionDataset.__init__(self, str(images_dir), transforms=transforms)  # CocoDetection's would re-read the file
        self.coco = coco
        self.ids = list(image_ids)


class _DetectionTarget:
    """Last step of the transforms: plain tensors, contiguous labels, an empty target for an image without boxes,
    and a check that the image file has the size its annotation file says."""

    def __init__(self, annotations: CocoAnnotations, category_to_label: dict[int, int], masks: bool) -> None:
        self.path = annotations.path
        self.images_dir = annotations.images_dir
        self.images = {image["id"]: image for image in annotations.dataset["images"]}
        self.category_to_label = category_to_label
        self.masks = masks

    def __call__(self, image: tv_tensors.Image, target: dict) -> tuple[torch.Tensor, dict]:
        info = self.images[target["image_id"]]
        height, width = image.shape[-2:]
        if (height, width) != (info["height"], info["width"]):
            raise DataError(  # DataError keeps its one line when a DataLoader worker re-raises it
                f"{self.images_dir / info['file_name']} is {width}x{height} pixels but {self.path} says "
                f"{info['width']}x{info['height']} (image {info['id']}); fix its width/height in the annotation file"
            )
        out = {"image_id": target["image_id"]}
        if "labels" in target or "boxes" in target or self.masks:
            boxes = target.get("boxes")
            out["boxes"] = torch.zeros(0, 4) if boxes is None else boxes.as_subclass(torch.Tensor).float()
            labels = [self.category_to_label[int(category)] for category in target.get("labels", [])]
            out["labels"] = torch.tensor(labels, dtype=torch.int64)
        if self.masks:
            masks = target.get("masks")
            empty = torch.zeros(0, height, width, dtype=torch.uint8)
            out["masks"] = empty if masks is None else masks.as_subclass(torch.Tensor).to(torch.uint8)
        return image.as_subclass(torch.Tensor), out
