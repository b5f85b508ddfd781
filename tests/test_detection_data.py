"""Detection data: the Fashion-MNIST mosaics generator, COCO annotation files checked up front (one-line errors naming
the file, the annotation or image id and the fix), and the datasets the trainer reads (labels, flips, masks)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from test_detection_support import SPLITS, fashion_mnist_idx, mosaics_root  # noqa: F401 (fixtures)

from unikd._errors import UnikdError
from unikd.detection.config import load_detection_config
from unikd.detection.data import build_detection_data, read_coco_annotations
from unikd.detection.mosaics import FASHION_MNIST_CLASSES, make_mosaics, read_idx

# pycocotools' RLE decoding under NumPy 2 (every mask torchvision's COCO wrapper decodes).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

# ---- mosaics ----------------------------------------------------------------------------------------------------


def test_mosaics_are_deterministic_and_not_rewritten(tmp_path, fashion_mnist_idx):  # noqa: F811
    params = {"num_train": 6, "num_val": 3, "canvas": 64, "items": (2, 3), "scale": (0.8, 1.2), "seed": 3}
    first, second = tmp_path / "a", tmp_path / "b"
    make_mosaics(first, fashion_mnist_root=fashion_mnist_idx, **params)
    make_mosaics(second, fashion_mnist_root=fashion_mnist_idx, **params)
    files = sorted(path.relative_to(first) for path in first.rglob("*") if path.is_file())
    assert len(files) == 6 + 3 + 2
    assert all((first / name).read_bytes() == (second / name).read_bytes() for name in files)
    annotation = first / "annotations" / "instances_train.json"
    stamp = annotation.stat().st_mtime_ns
    make_mosaics(first, fashion_mnist_root=fashion_mnist_idx, **params)  # same parameters: kept as it is
    assert annotation.stat().st_mtime_ns == stamp
    make_mosaics(first, fashion_mnist_root=fashion_mnist_idx, **{**params, "seed": 4})
    assert annotation.read_bytes() != (second / "annotations" / "instances_train.json").read_bytes()


def test_mosaic_boxes_and_masks_describe_the_visible_pixels_of_each_item(tmp_path, fashion_mnist_idx):  # noqa: F811
    make_mosaics(tmp_path, fashion_mnist_root=fashion_mnist_idx, num_train=30, num_val=2, canvas=64, items=(3, 5))
    dataset = json.loads((tmp_path / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in dataset["categories"]] == list(FASHION_MNIST_CLASSES)
    assert dataset["info"]["params"]["canvas"] == 64
    by_image: dict[int, list] = {}
    for annotation in dataset["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    overlapping = 0
    for image in dataset["images"]:
        canvas = np.asarray(Image.open(tmp_path / "train" / image["file_name"]))
        union = np.zeros_like(canvas, dtype=bool)
        boxes = []
        for annotation in by_image.get(image["id"], []):
            mask = mask_utils.decode(annotation["segmentation"]).astype(bool)
            assert annotation["area"] == mask.sum() > 0
            ys, xs = np.nonzero(mask)
            x, y, width, height = annotation["bbox"]
            assert (x, y, x + width, y + height) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert 1 <= annotation["category_id"] <= 10
            overlapping += any(
                x < bx1 and bx0 < x + width and y < by1 and by0 < y + height for bx0, by0, bx1, by1 in boxes
            )
            boxes.append((x, y, x + width, y + height))
            union |= mask
        assert (canvas[~union] == 0).all() and (canvas[union] > 0).all()  # items' own pixels, on black
    assert overlapping > 0  # items do overlap (box IoU up to max_overlap)


def test_mosaics_without_fashion_mnist_say_how_to_get_it(tmp_path):
    with pytest.raises(UnikdError) as error:
        make_mosaics(tmp_path / "out", fashion_mnist_root=tmp_path / "none", num_train=1, num_val=1)
    assert str(error.value) == (
        f"mosaics: Fashion-MNIST file {tmp_path / 'none' / 'train-images-idx3-ubyte.gz'} not found; install it with "
        "apt-get install dataset-fashion-mnist, or pass --fashion-mnist DIR (the folder with the four idx files)"
    )


def test_read_idx_reads_the_test_idx_files(fashion_mnist_idx):  # noqa: F811
    assert read_idx(fashion_mnist_idx / "train-images-idx3-ubyte.gz").shape == (200, 28, 28)
    assert read_idx(fashion_mnist_idx / "t10k-labels-idx1-ubyte.gz").shape == (100,)


# ---- checking annotation files ----------------------------------------------------------------------------------


def write_coco(folder: Path, dataset: dict, *, images: bool = True) -> Path:
    """``folder/instances.json`` and the PNG files its images name (64 x 48, grey)."""
    folder.mkdir(parents=True, exist_ok=True)
    if images:
        for image in dataset["images"]:
            Image.fromarray(np.full((image.get("height", 48), image.get("width", 64)), 128, dtype=np.uint8)).save(
                folder / image["file_name"]
            )
    path = folder / "instances.json"
    path.write_text(json.dumps(dataset))
    return path


def small_coco() -> dict:
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 64, "height": 48},
            {"id": 2, "file_name": "b.png", "width": 64, "height": 48},
            {"id": 3, "file_name": "empty.png", "width": 64, "height": 48},
        ],
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}, {"id": 20, "name": "twenty"}],
        "annotations": [
            {"id": 11, "image_id": 1, "category_id": 7, "bbox": [4, 5, 20, 30], "iscrowd": 0},
            {"id": 12, "image_id": 1, "category_id": 20, "bbox": [30, 10, 20, 20], "iscrowd": 0},
            {"id": 13, "image_id": 2, "category_id": 3, "bbox": [0, 0, 10, 10], "iscrowd": 0},
            {"id": 14, "image_id": 2, "category_id": 3, "bbox": [40, 2, 20, 10], "iscrowd": 1},
        ],
    }


def edited(change) -> dict:
    dataset = copy.deepcopy(small_coco())
    change(dataset)
    return dataset


CORRUPT = {
    "category not in categories": (
        lambda d: d["annotations"][1].update(category_id=5),
        "{path}: annotation 12 has category_id 5, which is not in the file's categories (ids 3, 7, 20); add the "
        "category to 'categories' or fix the annotation",
    ),
    "image not in images": (
        lambda d: d["annotations"][0].update(image_id=9),
        "{path}: annotation 11 refers to image_id 9, which is not in the file's images; fix the annotation or add "
        "the image",
    ),
    "bbox not 4 numbers": (
        lambda d: d["annotations"][2].update(bbox=[1, 2, 3]),
        "{path}: annotation 13 (image 2): bbox must be [x, y, width, height], 4 numbers; got [1, 2, 3]",
    ),
    "bbox with NaN": (
        lambda d: d["annotations"][2].update(bbox=[1, 2, float("nan"), 4]),
        "{path}: annotation 13 (image 2): bbox must be [x, y, width, height], 4 numbers; got [1, 2, nan, 4]",
    ),
    "no annotations list": (
        lambda d: d.pop("annotations"),
        "{path}: no 'annotations' list; a COCO instances file (data.train_annotations) holds the lists images, "
        "annotations and categories",
    ),
    "duplicate image id": (
        lambda d: d["images"][1].update(id=1),
        "{path}: image id 1 appears twice in images; ids must be unique",
    ),
    "image without width": (
        lambda d: d["images"][0].pop("width"),
        "{path}: image 1 (a.png): 'width' must be a positive integer, got None",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_malformed_annotation_files_are_refused_naming_the_entry_and_the_fix(tmp_path, case):
    change, expected = CORRUPT[case]
    path = write_coco(tmp_path, edited(change))
    with pytest.raises(UnikdError) as error:
        read_coco_annotations(path, tmp_path)
    assert str(error.value) == expected.format(path=path)


def test_invalid_json_names_the_line_and_column(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text('{"images": [],\n  "annotations": [}\n')
    with pytest.raises(UnikdError) as error:
        read_coco_annotations(path, tmp_path, key="data.val_annotations")
    assert str(error.value) == (
        f"{path}: not valid JSON (line 2, column 19: Expecting value); data.val_annotations must be a COCO instances "
        "file"
    )


def test_a_missing_image_file_names_the_file_the_image_id_and_the_key(tmp_path):
    path = write_coco(tmp_path, small_coco())
    (tmp_path / "b.png").unlink()
    with pytest.raises(UnikdError) as error:
        read_coco_annotations(path, tmp_path, key="data.train_annotations")
    assert str(error.value) == (
        f"data.train_images: image file {tmp_path / 'b.png'} not found (image 2 of {path}; 1 of 3 images missing); "
        "point data.train_images (relative to data.root) at the folder that holds the images"
    )


def test_boxes_without_area_are_dropped_and_boxes_reaching_out_are_clipped_with_a_count(tmp_path):
    def change(dataset):
        dataset["annotations"] += [
            {"id": 15, "image_id": 1, "category_id": 7, "bbox": [10, 10, 0, 5]},  # zero width
            {"id": 16, "image_id": 1, "category_id": 7, "bbox": [70, 10, 5, 5]},  # wholly outside
            {"id": 17, "image_id": 2, "category_id": 7, "bbox": [50, 40, 30, 30]},  # reaches outside
        ]

    path = write_coco(tmp_path, edited(change))
    with pytest.warns(UserWarning) as warned:
        annotations = read_coco_annotations(path, tmp_path)
    assert [str(w.message) for w in warned] == [
        f"{path}: dropped 2 boxes with no area inside their image (first: annotation 15) and clipped 1 box that "
        "reached outside their image"
    ]
    assert [a["id"] for a in annotations.dataset["annotations"]] == [11, 12, 13, 14, 17]
    train = {a["id"]: a["bbox"] for a in annotations.train_dataset["annotations"]}
    assert train == {11: [4, 5, 20, 30], 12: [30, 10, 20, 20], 13: [0, 0, 10, 10], 17: [50.0, 40.0, 14.0, 8.0]}
    assert [c["id"] for c in annotations.categories] == [3, 7, 20]


@pytest.mark.parametrize(
    ("bbox", "problem", "fix"),
    [
        ([10, 10, 5, -2], "has no area inside the image", "drop such boxes"),
        ([50, 40, 30, 30], "extends outside the image", "clip such boxes to the image"),
    ],
)
def test_invalid_boxes_error_stops_at_the_first_one(tmp_path, bbox, problem, fix):
    path = write_coco(tmp_path, edited(lambda d: d["annotations"][1].update(bbox=bbox)))
    with pytest.raises(UnikdError) as error:
        read_coco_annotations(path, tmp_path, invalid_boxes="error")
    assert str(error.value) == (
        f"{path}: annotation 12 (image 1, 64x48): the box {bbox} {problem}; fix it, or set data.invalid_boxes=drop "
        f"to {fix}"
    )


def test_mask_rcnn_needs_a_segmentation_for_every_box(tmp_path):
    path = write_coco(tmp_path, small_coco())
    with pytest.raises(UnikdError) as error:
        read_coco_annotations(path, tmp_path, need_masks=True)
    assert str(error.value) == (
        f"{path}: annotation 11 (image 1): Mask R-CNN needs a segmentation (polygons [[x1, y1, x2, y2, x3, y3, ...], "
        "...] or RLE), got None; add the masks or train model.student.arch=faster_rcnn"
    )


# ---- datasets ---------------------------------------------------------------------------------------------------


def coco_config(folder: Path, *overrides: str):
    paths = [
        f"data.{split}_{kind}=" + ("." if kind == "images" else "instances.json")
        for split in ("train", "val")
        for kind in ("images", "annotations")
    ]
    return load_detection_config(None, [f"data.root={folder}", *paths, *overrides]).data


def test_categories_become_contiguous_labels_and_empty_images_only_validate(tmp_path):
    write_coco(tmp_path, small_coco())
    data = build_detection_data(coco_config(tmp_path, "data.hflip=0"))
    assert data.label_to_category == [0, 3, 7, 20]
    assert len(data.train) == 2 and len(data.val) == 3 and data.val_image_ids == [1, 2, 3]
    image, target = data.train[0]
    assert image.shape == (3, 48, 64) and image.dtype == torch.float32 and 0.49 < image.mean() < 0.51
    assert torch.equal(target["labels"], torch.tensor([2, 3]))  # ids 7, 20
    assert torch.equal(target["boxes"], torch.tensor([[4.0, 5.0, 24.0, 35.0], [30.0, 10.0, 50.0, 30.0]]))
    _, crowd_image_target = data.train[1]
    assert torch.equal(crowd_image_target["labels"], torch.tensor([1]))  # the crowd box is not a training target
    assert data.val[2][1] == {"image_id": 3}


def test_a_flip_moves_boxes_and_masks_with_the_image(mosaics_root):  # noqa: F811
    data_cfg = load_detection_config(None, [f"data.root={mosaics_root}", *SPLITS, "data.hflip=1.0"]).data
    flipped = build_detection_data(data_cfg, masks=True).train
    data_cfg.hflip = 0.0
    plain = build_detection_data(data_cfg, masks=True).train
    for index in range(3):
        (image, target), (flipped_image, flipped_target) = plain[index], flipped[index]
        assert torch.equal(flipped_image, image.flip(-1))
        assert torch.equal(flipped_target["masks"], target["masks"].flip(-1))
        width = image.shape[-1]
        expected = torch.stack(
            [
                width - target["boxes"][:, 2],
                target["boxes"][:, 1],
                width - target["boxes"][:, 0],
                target["boxes"][:, 3],
            ],
            dim=1,
        )
        torch.testing.assert_close(flipped_target["boxes"], expected)
        for box, mask in zip(flipped_target["boxes"], flipped_target["masks"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert torch.equal(box, torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float())


def test_an_image_of_another_size_than_its_annotation_is_reported(tmp_path):
    path = write_coco(tmp_path, small_coco())
    Image.fromarray(np.zeros((20, 30), dtype=np.uint8)).save(tmp_path / "a.png")
    data = build_detection_data(coco_config(tmp_path))
    with pytest.raises(UnikdError) as error:
        data.train[0]
    assert str(error.value) == (
        f"{tmp_path / 'a.png'} is 30x20 pixels but {path} says 64x48 (image 1); fix its width/height in the "
        "annotation file"
    )


def test_both_splits_need_the_same_categories(tmp_path):
    write_coco(tmp_path, small_coco())
    write_coco(tmp_path / "val", edited(lambda d: d["categories"].pop()) | {"annotations": []})
    data_cfg = coco_config(tmp_path, "data.val_images=val", "data.val_annotations=val/instances.json")
    with pytest.raises(UnikdError, match="both splits need the same categories"):
        build_detection_data(data_cfg)


def test_subsets_are_fixed_random_choices(mosaics_root):  # noqa: F811
    data_cfg = load_detection_config(None, [f"data.root={mosaics_root}", *SPLITS, "data.train_subset=5"]).data
    data_cfg.val_subset = 3
    data = build_detection_data(data_cfg)
    again = build_detection_data(data_cfg)
    assert len(data.train) == 5 and data.train.ids == again.train.ids and data.val_image_ids == again.val_image_ids
    assert len(data.val) == 3 and data.val_image_ids == sorted(data.val_image_ids)
    assert len(set(data.val_image_ids) | set(build_detection_data(data_cfg).val_image_ids)) == 3
