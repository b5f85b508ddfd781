"""Fashion-MNIST mosaics: a small real-pixel detection dataset in COCO format, made deterministically.

    unikd detect mosaics --out data/mosaics                 # 4000 train + 500 val canvases of 128 x 128
    make_mosaics("data/mosaics", num_train=4000, num_val=500)

Each canvas (black, like Fashion-MNIST's background) receives 2-5 Fashion-MNIST items (the real 28 x 28 pixels,
training items for the train split and test items for val), each scaled by a random factor in ``scale`` and placed
at a random position. Items may overlap (box IoU up to ``max_overlap``); a later item covers an earlier one, which
keeps at least ``min_visible`` of its pixels. An item's mask is its visible pixels (value > ``mask_threshold``),
its box the tight box of that mask, and its area the mask's pixel count. The ten Fashion-MNIST classes are the COCO
categories 1-10; fine classes (T-shirt/top, Pullover, Coat, Shirt) make the box classifier the hard part, where
distillation on RoI logits acts. The output folder holds::

    train/000000.png ...   val/000000.png ...         8-bit grey PNGs (loaded as RGB)
    annotations/instances_train.json, instances_val.json   COCO instances: boxes, RLE masks, categories

which a detection config reads with ``data.root=<out> data.train_images=train data.val_images=val
data.train_annotations=annotations/instances_train.json data.val_annotations=annotations/instances_val.json``.
The same arguments give byte-identical files; ``info.params`` of each JSON records them.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from unikd._errors import UnikdError

__all__ = ["FASHION_MNIST_CLASSES", "FASHION_MNIST_ROOT", "make_mosaics", "mosaic_params", "read_idx"]

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # the Debian package dataset-fashion-mnist
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_SPLITS = {"train": "train", "val": "t10k"}  # mosaic split -> Fashion-MNIST file prefix
_PLACEMENT_TRIES = 30


def mosaic_params(
    *,
    num_train: int = 4000,
    num_val: int = 500,
    canvas: int = 128,
    items: tuple[int, int] = (2, 5),
    scale: tuple[float, float] = (1.0, 2.0),
    max_overlap: float = 0.3,
    min_visible: float = 0.6,
    mask_threshold: int = 20,
    seed: int = 0,
) -> dict:
    """The generator's parameters as recorded in ``info.params`` (defaults: the CPU benchmark's dataset)."""
    if num_train < 1 or num_val < 1:
        raise UnikdError(f"mosaics: --train and --val must be >= 1, got {num_train} and {num_val}")
    if not 1 <= items[0] <= items[1]:
        raise UnikdError(f"mosaics: --items MIN MAX needs 1 <= MIN <= MAX, got {list(items)}")
    if not 0 < scale[0] <= scale[1] or round(28 * scale[1]) > canvas:
        raise UnikdError(f"mosaics: --scale {list(scale)} must be increasing, > 0, and fit the {canvas}-pixel canvas")
    return {
        "num_train": num_train,
        "num_val": num_val,
        "canvas": canvas,
        "items": list(items),
        "scale": list(scale),
        "max_overlap": max_overlap,
        "min_visible": min_visible,
        "mask_threshold": mask_threshold,
        "seed": seed,
    }


def make_mosaics(
    out_dir: str | os.PathLike, *, fashion_mnist_root: str | os.PathLike = FASHION_MNIST_ROOT, **params
) -> dict:
    """Write the mosaics of ``mosaic_params(**params)`` under ``out_dir``; returns ``{"train": n_boxes, "val": ...}``.

    An existing output with the same parameters is kept as it is (the files would be identical).
    """
    from pycocotools import mask as mask_utils

    params = mosaic_params(**params)
    out_dir = Path(out_dir)
    if _existing_params(out_dir) == params:
        return {split: _count_boxes(out_dir, split) for split in _SPLITS}
    counts = {}
    for split_index, (split, prefix) in enumerate(_SPLITS.items()):
        items, labels = _read_split(Path(fashion_mnist_root), prefix)
        rng = np.random.default_rng([params["seed"], split_index])
        image_dir = out_dir / split
        image_dir.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for image_id in range(params[f"num_{split}"]):
            canvas, placed = _compose(items, labels, rng, params)
            file_name = f"{image_id:06d}.png"
            Image.fromarray(canvas).save(image_dir / file_name)
            images.append({"id": image_id, "file_name": file_name, "width": canvas.shape[1], "height": canvas.shape[0]})
            for label, mask in placed:
                rle = mask_utils.encode(np.asfortranarray(mask))
                x, y, width, height = (float(v) for v in mask_utils.toBbox(rle))
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": label + 1,
                        "bbox": [x, y, width, height],
                        "area": float(mask.sum()),
                        "iscrowd": 0,
                        "segmentation": {"size": list(mask.shape), "counts": rle["counts"].decode("ascii")},
                    }
                )
        categories = [{"id": index + 1, "name": name} for index, name in enumerate(FASHION_MNIST_CLASSES)]
        dataset = {
            "info": {
                "description": f"Fashion-MNIST mosaics ({split}), made by unikd.detection.mosaics",
                "params": params,
            },
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        annotation_path = out_dir / "annotations" / f"instances_{split}.json"
        annotation_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = annotation_path.with_suffix(".json.tmp")  # the JSON last: a complete one means complete images
        temporary.write_text(json.dumps(dataset))
        os.replace(temporary, annotation_path)
        counts[split] = len(annotations)
    return counts


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An idx file (MNIST's format, gzipped or not): magic 0 0 <type 0x08 = ubyte> <ndim>, big-endian sizes, data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as file:
        payload = file.read()
    if len(payload) < 4 or payload[:2] != b"\0\0" or payload[2] != 0x08:
        raise UnikdError(f"{path}: not an unsigned-byte idx file (MNIST format)")
    ndim = payload[3]
    shape = tuple(int.from_bytes(payload[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(payload, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise UnikdError(f"{path}: truncated idx file ({data.size} values for shape {shape})")
    return data.reshape(shape)


# ---- helpers ----------------------------------------------------------------------------------------------------


def _read_split(root: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    paths = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [root / f"{prefix}-{kind}", root / f"{prefix}-{kind}.gz"]
        found = next((path for path in candidates if path.is_file()), None)
        if found is None:
            raise UnikdError(
                f"mosaics: Fashion-MNIST file {candidates[1]} not found; install it with apt-get install "
                "dataset-fashion-mnist, or pass --fashion-mnist DIR (the folder with the four idx files)"
            )
        paths.append(found)
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UnikdError(f"mosaics: {paths[0]} and {paths[1]} do not hold N images of H x W and N labels")
    return images, labels


def _compose(items: np.ndarray, labels: np.ndarray, rng: np.random.Generator, params: dict):
    """One canvas (H, W) uint8 and its items [(label, visible mask (H, W) uint8)], later items on top."""
    size = params["canvas"]
    canvas = np.zeros((size, size), dtype=np.uint8)
    placed: list[tuple[int, np.ndarray, tuple[int, int, int, int]]] = []  # (label, full mask, box x0 y0 x1 y1)
    for _ in range(int(rng.integers(params["items"][0], params["items"][1] + 1))):
        index = int(rng.integers(len(items)))
        side = round(items.shape[1] * float(rng.uniform(*params["scale"])))
        pixels = np.asarray(Image.fromarray(items[index]).resize((side, side), Image.BILINEAR))
        for _ in range(_PLACEMENT_TRIES):
            x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            box = (x0, y0, x0 + side, y0 + side)
            mask = np.zeros((size, size), dtype=bool)
            mask[y0 : y0 + side, x0 : x0 + side] = pixels > params["mask_threshold"]
            if _fits(box, mask, placed, params):
                break
        else:
            continue  # no position keeps the overlaps within bounds: leave this item out
        canvas[mask] = pixels[mask[y0 : y0 + side, x0 : x0 + side]]
        placed.append((int(labels[index]), mask, box))
    visible = []
    for position, (label, mask, _) in enumerate(placed):
        covered = np.zeros_like(mask)
        for _, later, _ in placed[position + 1 :]:
            covered |= later
        visible.append((label, (mask & ~covered).astype(np.uint8)))
    return canvas, visible


def _fits(box, mask: np.ndarray, placed: list, params: dict) -> bool:
    """Box IoU with every placed item at most max_overlap, and each placed item keeps min_visible of its pixels."""
    if not mask.any():
        return False
    covering = mask.copy()
    for _, earlier, earlier_box in reversed(placed):
        if _iou(box, earlier_box) > params["max_overlap"]:
            return False
        full = earlier.sum()
        if full and (earlier & ~covering).sum() < params["min_visible"] * full:
            return False
        covering |= earlier
    return True


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    width, height = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _existing_params(out_dir: Path) -> dict | None:
    params = None
    for split in _SPLITS:
        path = out_dir / "annotations" / f"instances_{split}.json"
        try:
            split_params = json.loads(path.read_text())["info"]["params"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if params is not None and split_params != params:
            return None
        params = split_params
    return params


def _count_boxes(out_dir: Path, split: str) -> int:
    return len(json.loads((out_dir / "annotations" / f"instances_{split}.json").read_text())["annotations"])
