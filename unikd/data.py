"""Datasets, their standard augmentations, and MixUp/CutMix, all through torchvision.

    bundle = build_datasets(cfg.data)        # DataBundle(train, val, num_classes, class_names, in_chans, img_size)
    collate = build_mix_collate(cfg.data, bundle.num_classes)   # None when MixUp and CutMix are off

Datasets (``data.name``) and the files each expects under ``data.root``:

- ``cifar10`` / ``cifar100``: the python pickles, ``cifar-10-batches-py/`` or ``cifar-100-python/{train,test,meta}``
  (``data.download=true`` fetches them where a network exists). Train: RandomCrop 32 pad 4 + flip.
- ``fashion_mnist`` / ``mnist``: the four idx files, gzipped or not, straight in ``data.root`` (the layout of the
  Debian package ``dataset-fashion-mnist``, the default root). Train: RandomCrop 28 pad 2 + horizontal flip; the
  flip is the usual choice for Fashion-MNIST (clothes are left-right symmetric), harmless for the MNIST digits test.
- ``imagefolder``: the ImageNet layout ``train/<class>/*`` and ``val/<class>/*`` (``val/`` alone to evaluate). Train:
  RandomResizedCrop + flip, or timm's ``create_transform`` with RandAugment for ``data.augment=randaugment`` (ViT
  recipes); eval: resize the short side to floor(size / ``data.eval_crop_pct``) with ``data.eval_interpolation``,
  then centre-crop ``size`` (224: 256 then 224, as mmpretrain's and torchvision's references; their CNN configs
  resize bilinearly, the DeiT / Swin ones bicubically. mmpretrain's CNN pipeline resizes with OpenCV, which does not
  antialias: PIL's bilinear resize used here differs slightly from it).
- ``fake``: torchvision's ``FakeData`` (random images, 3x32x32 unless ``data.img_size``), ``data.train_subset`` or
  1000 training and ``data.val_subset`` or 200 validation images; for smoke tests and benchmarks.

``data.augment=none`` turns training augmentation off; ``randaugment`` adds torchvision's RandAugment after
crop + flip on the small-image datasets. Images are normalised with each dataset's mean and std; ``data.channels=3``
then repeats a grayscale dataset's channel for models that take RGB (torchvision's). The trainer owns the loaders
(workers, pinned memory, samplers).

Damaged data stops the run with a ``DataError`` naming the file, rather than training on other images than the
folder holds: a truncated or unreadable image (when it is first read; unikd does not decode every image up front),
an image larger than PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, 89 million pixels), a
truncated idx or CIFAR file (when the dataset is built). Images are never skipped.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import shutil
import tempfile
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.error import URLError

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset, default_collate
from torchvision import datasets
from torchvision.datasets.mnist import read_image_file, read_label_file
from torchvision.transforms import v2

from unikd._errors import ConfigError, DataError
from unikd.config import NATIVE_CHANNELS, DataConfig, dataset_channels

__all__ = [
    "DataBundle",
    "MixCollate",
    "build_datasets",
    "build_mix",
    "build_mix_collate",
    "build_transform",
    "dataset_root",
    "mix_description",
    "read_rgb_image",
]

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # where the Debian package dataset-fashion-mnist puts it
SUBSET_SEED = 0  # subsets are the same for every run (and every train.seed), so runs compare on the same images
FAKE_SIZES = (1000, 200)  # train, val images of data.name=fake unless data.train_subset / data.val_subset
FAKE_VAL_OFFSET = 10**9  # FakeData index offset of the validation images
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# data.eval_interpolation. A loaded config has resolved "auto" from its model; a DataConfig made by hand has not.
_INTERPOLATIONS = {
    "auto": v2.InterpolationMode.BILINEAR,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
}


class _Stats(NamedTuple):
    mean: tuple[float, ...]
    std: tuple[float, ...]
    img_size: int  # native image size
    crop_padding: int  # RandomCrop padding at the native size


_STATS = {
    "cifar10": _Stats((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 32, 4),
    "cifar100": _Stats((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 32, 4),
    "fashion_mnist": _Stats((0.2860,), (0.3530,), 28, 2),
    "mnist": _Stats((0.1307,), (0.3081,), 28, 2),
    "imagefolder": _Stats(IMAGENET_MEAN, IMAGENET_STD, 224, 0),
    "fake": _Stats((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 32, 4),
}


@dataclass
class DataBundle:
    """The training and validation sets of one dataset and what the models need to know about it.

    Items are ``(image (in_chans, img_size, img_size) float tensor, class index int)``. ``train`` is None when only
    the validation set was loaded (``build_datasets(..., with_train=False)``).
    """

    train: Dataset | None
    val: Dataset
    num_classes: int
    class_names: list[str]
    in_chans: int
    img_size: int


def dataset_root(data_cfg: DataConfig) -> Path:
    """``data.root``, or the dataset's default: the Debian package's folder for Fashion-MNIST, else ./data/<name>."""
    if data_cfg.root is not None:
        return Path(data_cfg.root).expanduser()
    return Path(FASHION_MNIST_ROOT if data_cfg.name == "fashion_mnist" else f"data/{data_cfg.name}")


def build_datasets(data_cfg: DataConfig, *, with_train: bool = True) -> DataBundle:
    """Load ``data.name`` from ``data.root`` with its train / eval transforms and the configured subsets.

    ``with_train=False`` loads the validation set only (evaluation; ``bundle.train`` is None): an ImageNet-layout
    folder then needs only ``val/``. Raises ``ConfigError`` naming ``data.root`` (missing files, and how to get
    them), ``data.download`` (a failed download) or ``data.num_classes`` (it disagrees with the dataset).
    """
    root = dataset_root(data_cfg)
    train_tf = build_transform(data_cfg, train=True) if with_train else None
    val_tf = build_transform(data_cfg, train=False)
    if data_cfg.name == "fake":
        train, val, class_names = _fake(data_cfg, train_tf, val_tf)
    else:
        train, val, class_names = _LOADERS[data_cfg.name](data_cfg, root, train_tf, val_tf)
    if data_cfg.num_classes is not None and data_cfg.num_classes != len(class_names):
        raise ConfigError(
            f"data.num_classes: {data_cfg.num_classes} does not match the dataset "
            f"({data_cfg.name} in {root} has {len(class_names)} classes)"
        )
    return DataBundle(
        train=None if train is None else _subset(train, data_cfg.train_subset),
        val=_subset(val, data_cfg.val_subset),
        num_classes=len(class_names),
        class_names=list(class_names),
        in_chans=dataset_channels(data_cfg),
        img_size=data_cfg.img_size or _STATS[data_cfg.name].img_size,
    )


def build_transform(data_cfg: DataConfig, *, train: bool) -> Callable:
    """The training (augmenting) or evaluation transform of ``data.name``: PIL image -> normalised float tensor."""
    stats = _STATS[data_cfg.name]
    size = data_cfg.img_size or stats.img_size
    augment = train and data_cfg.augment != "none"
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(stats.mean, stats.std)]
    if dataset_channels(data_cfg) != NATIVE_CHANNELS[data_cfg.name]:
        to_tensor.append(_RepeatChannels(dataset_channels(data_cfg)))
    if data_cfg.name == "imagefolder":
        if augment and data_cfg.augment == "randaugment":
            from timm.data import create_transform

            return create_transform(
                size, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
                mean=stats.mean, std=stats.std,
            )  # fmt: skip
        if augment:
            return v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), *to_tensor])
        resize = v2.Resize(
            math.floor(size / data_cfg.eval_crop_pct), interpolation=_INTERPOLATIONS[data_cfg.eval_interpolation],
            antialias=True,
        )  # fmt: skip
        return v2.Compose([resize, v2.CenterCrop(size), *to_tensor])
    # Small-image datasets: resize only to run them at another size (e.g. a ViT on CIFAR); FakeData is made at size.
    steps: list[Any] = []
    if size != stats.img_size and data_cfg.name != "fake":
        steps.append(v2.Resize(size, antialias=True))
    if augment:
        padding = round(stats.crop_padding * size / stats.img_size)
        steps += [v2.RandomCrop(size, padding=padding), v2.RandomHorizontalFlip()]
        if data_cfg.augment == "randaugment":
            steps.append(v2.RandAugment())
    return v2.Compose([*steps, *to_tensor])


class _RepeatChannels:
    """(1, H, W) -> (channels, H, W): a grayscale image for models that take RGB. A class, so workers can pickle it."""

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image.repeat(self.channels, 1, 1)


class MixCollate:
    """``default_collate`` then MixUp or CutMix on the batch: images (N, ...) and probability targets (N, C).

    A class rather than a closure so that DataLoader workers can pickle it.
    """

    def __init__(self, mix: Callable) -> None:
        self.mix = mix

    def __call__(self, batch: list) -> tuple[torch.Tensor, torch.Tensor]:
        images, target = default_collate(batch)
        return self.mix(images, target)


def build_mix(data_cfg: DataConfig, num_classes: int) -> Callable | None:
    """MixUp (``data.mixup`` alpha) and/or CutMix (``data.cutmix`` alpha) as one ``(images, target) -> (images,
    target)`` callable, one of the two chosen at random per batch when both are on; ``None`` when both are 0. Targets
    become (N, C) rows summing to 1. The trainer applies it per batch under seeded generators
    (``unikd._sampling.KeyedCollate``)."""
    mixes = []
    if data_cfg.mixup > 0:
        mixes.append(v2.MixUp(alpha=data_cfg.mixup, num_classes=num_classes))
    if data_cfg.cutmix > 0:
        mixes.append(v2.CutMix(alpha=data_cfg.cutmix, num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


def mix_description(data_cfg: DataConfig) -> str | None:
    """MixUp/CutMix in words (``"mixup=0.8 cutmix=1.0"``), for the teacher cache's data fingerprint; None when off."""
    if data_cfg.mixup <= 0 and data_cfg.cutmix <= 0:
        return None
    return f"mixup={data_cfg.mixup!r} cutmix={data_cfg.cutmix!r}"


def build_mix_collate(data_cfg: DataConfig, num_classes: int) -> MixCollate | None:
    """``build_mix`` as a collate function (``default_collate`` then the mix, drawn from the global generators);
    ``None`` when MixUp and CutMix are off."""
    mix = build_mix(data_cfg, num_classes)
    return None if mix is None else MixCollate(mix)


def _subset(dataset: Dataset, size: int | None) -> Dataset:
    """A fixed (seeded) random subset of ``size`` items, in index order; the whole set when it has no more."""
    if size is None or size >= len(dataset):
        return dataset
    generator = torch.Generator().manual_seed(SUBSET_SEED)
    indices = torch.randperm(len(dataset), generator=generator)[:size].sort().values
    return Subset(dataset, indices.tolist())


# ---- CIFAR ------------------------------------------------------------------------------------------------------


def _existence_only(cls: type) -> type:
    """``cls`` checking that its files exist instead of their md5 (hashing 160 MB on every start is slow, and the
    tests write tiny files in the real format); downloads still verify the archive's md5."""
    return type(
        cls.__name__,
        (cls,),
        {
            "train_list": [[name, None] for name, _ in cls.train_list],
            "test_list": [[name, None] for name, _ in cls.test_list],
            "meta": {**cls.meta, "md5": None},
        },
    )


_CIFAR = {"cifar10": _existence_only(datasets.CIFAR10), "cifar100": _existence_only(datasets.CIFAR100)}


def _cifar(data_cfg: DataConfig, root: Path, train_tf: Callable, val_tf: Callable) -> tuple[Dataset, Dataset, list]:
    cls = _CIFAR[data_cfg.name]
    files = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    expected = f"{cls.base_folder}/{{{','.join(files)}}}"
    if data_cfg.download:
        _download(lambda: cls(root, train=True, download=True), data_cfg.name, root)
    if not all((root / cls.base_folder / name).is_file() for name in files):
        raise _not_found(data_cfg.name, root, expected, downloadable=True)
    try:
        train = cls(root, train=True, transform=train_tf) if train_tf is not None else None
        val = cls(root, train=False, transform=val_tf)
    except (EOFError, pickle.UnpicklingError, ValueError, KeyError, OSError) as error:
        raise DataError(
            f"data.root: the {data_cfg.name} files in {root / cls.base_folder} are damaged or truncated "
            f"({_reason(error)}); download or copy them again"
        ) from None
    return train, val, val.classes


# ---- MNIST-like (idx files) -------------------------------------------------------------------------------------


def _idx_path(folder: str | Path, name: str) -> Path | None:
    """``folder/name`` or ``folder/name.gz``, whichever exists."""
    for candidate in (Path(folder) / name, Path(folder) / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(reader: Callable[[str], torch.Tensor], path: Path) -> torch.Tensor:
    """torchvision's idx ``reader`` on ``path``, gunzipping to a temporary file first (the reader opens a path)."""
    if path.suffix != ".gz":
        return reader(str(path))
    with tempfile.TemporaryDirectory() as folder:
        plain = os.path.join(folder, path.stem)
        with gzip.open(path, "rb") as source, open(plain, "wb") as target:
            shutil.copyfileobj(source, target)
        return reader(plain)


class _FlatIdx:
    """Mixin for torchvision's MNIST classes: read the idx files (gzipped or not) straight from ``root``, as the
    Debian packages ship them, instead of from ``<root>/<ClassName>/raw``; downloads go to ``root`` too."""

    @property
    def raw_folder(self) -> str:
        return str(self.root)

    def _check_exists(self) -> bool:
        return all(_idx_path(self.root, name.removesuffix(".gz")) for name, _ in self.resources)

    def _load_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        split = "train" if self.train else "t10k"
        images_path = _idx_path(self.root, f"{split}-images-idx3-ubyte")
        labels_path = _idx_path(self.root, f"{split}-labels-idx1-ubyte")
        images, labels = self._read(read_image_file, images_path), self._read(read_label_file, labels_path)
        if len(images) != len(labels):
            raise DataError(
                f"data.root: {images_path} holds {len(images)} images but {labels_path} {len(labels)} labels; "
                f"{self._fix}"
            )
        return images, labels

    def _read(self, reader: Callable[[str], torch.Tensor], path: Path) -> torch.Tensor:
        try:
            return _read_idx(reader, path)
        except (EOFError, OSError, RuntimeError, ValueError, AssertionError, zlib.error) as error:
            raise DataError(f"data.root: {path} is damaged or truncated ({_reason(error)}); {self._fix}") from None

    @property
    def _fix(self) -> str:
        if isinstance(self, datasets.FashionMNIST):
            return "reinstall it (apt-get install --reinstall dataset-fashion-mnist) or copy the file again"
        return "download or copy the file again"


class _FashionMNIST(_FlatIdx, datasets.FashionMNIST):
    pass


class _MNIST(_FlatIdx, datasets.MNIST):
    pass


_IDX = {"fashion_mnist": _FashionMNIST, "mnist": _MNIST}


def _idx(data_cfg: DataConfig, root: Path, train_tf: Callable, val_tf: Callable) -> tuple[Dataset, Dataset, list]:
    cls = _IDX[data_cfg.name]
    expected = ", ".join(f"{name.removesuffix('.gz')}[.gz]" for name, _ in cls.resources)
    if data_cfg.download:
        _download(lambda: cls(root, train=True, download=True), data_cfg.name, root)
    if not all(_idx_path(root, name.removesuffix(".gz")) for name, _ in cls.resources):
        hint = "install it with apt-get install dataset-fashion-mnist, " if data_cfg.name == "fashion_mnist" else ""
        raise _not_found(data_cfg.name, root, expected, downloadable=True, hint=hint)
    train = cls(root, train=True, transform=train_tf) if train_tf is not None else None
    return train, cls(root, train=False, transform=val_tf), list(cls.classes)


# ---- ImageFolder and fake ---------------------------------------------------------------------------------------


def _imagefolder(
    data_cfg: DataConfig, root: Path, train_tf: Callable | None, val_tf: Callable
) -> tuple[Any, Any, list]:
    splits = ("train", "val") if train_tf is not None else ("val",)
    expected = " and ".join(f"{split}/<class>/<image>" for split in splits)
    if not all((root / split).is_dir() for split in splits):
        raise _not_found(data_cfg.name, root, expected, downloadable=False)
    try:
        train = None
        if train_tf is not None:
            train = datasets.ImageFolder(root / "train", transform=train_tf, loader=read_rgb_image)
        val = datasets.ImageFolder(root / "val", transform=val_tf, loader=read_rgb_image)
    except FileNotFoundError as error:  # no class folders, or a class folder without images
        raise ConfigError(f"data.root: {error} (expected {expected})") from None
    first = train if train is not None else val
    if len(first.classes) < 2:
        raise ConfigError(
            f"data.root: {first.root} has one class folder ({first.classes[0]}); classification needs at least two"
        )
    if train is None:
        return None, val, val.classes
    if val.classes != train.classes:
        only = sorted(set(train.classes) ^ set(val.classes))
        raise ConfigError(
            f"data.root: {root}/train and {root}/val have different class folders (in only one: {', '.join(only)})"
        )
    return train, val, train.classes


def read_rgb_image(path: str) -> Image.Image:
    """ImageFolder's loader: the image at ``path`` decoded to RGB now; a ``DataError`` naming the file when it is
    truncated, not an image, or larger than PIL's decompression-bomb limit (its warning counts as the error)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open(path, "rb") as file:
                return Image.open(file).convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise DataError(
            f"data: {path} is too large to decode safely ({_reason(error)}); shrink or remove the image (the limit "
            "is PIL.Image.MAX_IMAGE_PIXELS)"
        ) from None
    except (OSError, SyntaxError, ValueError) as error:
        reason = "not an image format PIL knows" if isinstance(error, Image.UnidentifiedImageError) else _reason(error)
        raise DataError(
            f"data: cannot read image {path} ({reason}); replace or remove it (unikd stops rather than skip images)"
        ) from None


def _fake(data_cfg: DataConfig, train_tf: Callable | None, val_tf: Callable) -> tuple[Dataset | None, Dataset, list]:
    num_classes = data_cfg.num_classes or 10
    size = data_cfg.img_size or _STATS["fake"].img_size
    train_size, val_size = data_cfg.train_subset or FAKE_SIZES[0], data_cfg.val_subset or FAKE_SIZES[1]
    # A fixed random_offset keeps the validation images distinct from the training images (FakeData seeds image i
    # with i + offset) and the same whatever data.train_subset, so a checkpoint's validation set is well defined.
    train = None
    if train_tf is not None:
        train = datasets.FakeData(train_size, (3, size, size), num_classes, transform=train_tf)
    val = datasets.FakeData(val_size, (3, size, size), num_classes, transform=val_tf, random_offset=FAKE_VAL_OFFSET)
    return train, val, [f"class_{index}" for index in range(num_classes)]


_LOADERS = {"cifar10": _cifar, "cifar100": _cifar, "fashion_mnist": _idx, "mnist": _idx, "imagefolder": _imagefolder}


# ---- errors -----------------------------------------------------------------------------------------------------


def _not_found(name: str, root: Path, expected: str, *, downloadable: bool, hint: str = "") -> ConfigError:
    fix = f"{hint}point data.root at the folder that holds them"
    fix += ", or set data.download=true to download them" if downloadable else ""
    return ConfigError(f"data.root: {name} not found in {root} (expected {expected}); {fix}")


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _download(fetch: Callable[[], Any], name: str, root: Path) -> None:
    try:
        fetch()
    except (URLError, OSError, RuntimeError) as error:
        reason = str(getattr(error, "reason", error)).splitlines()[0]
        raise ConfigError(
            f"data.download: downloading {name} to {root} failed ({reason}); without a network, copy the files "
            "there by hand and set data.download=false"
        ) from None
