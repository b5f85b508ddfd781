"""Shared fixtures: tiny datasets written in the real on-disk formats, learnable so that training visibly works.

Every image of class k has a class-specific mean colour (plus noise), which a CNN separates in a few steps and
which survives random crops and flips. Fixtures are session-scoped (the data is read-only) and return the folder
to use as ``data.root``:

    cifar10_root      cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}   10 classes, 200 + 100 images
    cifar100_root     cifar-100-python/{train,test,meta}    100 classes of which the first 10 occur, 200 + 100 images
    fashion_mnist_root        {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz (the Debian package's layout)
    fashion_mnist_plain_root  the same files not gzipped                                 10 classes, 200 + 100 images
    imagefolder_root  train/<class>/*.png, val/<class>/*.png      4 classes, 32x32 RGB, 4 x 24 + 4 x 8 images
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# One intra-op thread per test process (subprocesses included): `make test` runs two xdist workers on two cores, and
# OpenMP threads that spin-wait for a busy core make a small CNN's training step 10x slower than on one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGEFOLDER_CLASSES = ["cat", "dog", "fox", "owl"]


def learnable_images(labels: np.ndarray, num_classes: int, size: int, channels: int, seed: int) -> np.ndarray:
    """uint8 images (N, channels, size, size): channel c of class k has mean 40 + 175 * ((k + c * K // 3) % K) / K."""
    rng = np.random.default_rng(seed)
    channel_shift = np.arange(channels) * (num_classes // 3)
    levels = 40 + 175 * ((labels[:, None] + channel_shift[None]) % num_classes) / num_classes  # (N, channels)
    noise = rng.normal(0, 12, size=(len(labels), channels, size, size))
    return np.clip(levels[:, :, None, None] + noise, 0, 255).astype(np.uint8)


def balanced_labels(count: int, num_classes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.arange(count) % num_classes)


def write_cifar10(root: Path, per_batch: int = 40, num_test: int = 100) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    splits = {f"data_batch_{index}": per_batch for index in range(1, 6)} | {"test_batch": num_test}
    for seed, (name, count) in enumerate(splits.items()):
        labels = balanced_labels(count, 10, seed)
        images = learnable_images(labels, 10, 32, 3, seed)
        _pickle(folder / name, {"data": images.reshape(count, -1), "labels": labels.tolist()})
    _pickle(folder / "batches.meta", {"label_names": CIFAR10_NAMES})
    return root


def write_cifar100(root: Path, num_train: int = 200, num_test: int = 100, used_classes: int = 10) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for seed, (name, count) in enumerate({"train": num_train, "test": num_test}.items()):
        labels = balanced_labels(count, used_classes, seed)
        images = learnable_images(labels, used_classes, 32, 3, seed)
        data = {
            "data": images.reshape(count, -1),
            "fine_labels": labels.tolist(),
            "coarse_labels": (labels // 5).tolist(),
        }
        _pickle(folder / name, data)
    meta = {
        "fine_label_names": [f"fine_{k}" for k in range(100)],
        "coarse_label_names": [f"coarse_{k}" for k in range(20)],
    }
    _pickle(folder / "meta", meta)
    return root


def write_idx(root: Path, num_train: int = 200, num_test: int = 100, gz: bool = True) -> Path:
    """The four MNIST/Fashion-MNIST idx files, flat in ``root``: magic (0, 0, 0x08 = ubyte, ndim), big-endian sizes."""
    root.mkdir(parents=True, exist_ok=True)
    for seed, (split, count) in enumerate({"train": num_train, "t10k": num_test}.items()):
        labels = balanced_labels(count, 10, seed)
        images = learnable_images(labels, 10, 28, 1, seed)[:, 0]
        _write_idx_file(root / f"{split}-images-idx3-ubyte", images, gz)
        _write_idx_file(root / f"{split}-labels-idx1-ubyte", labels.astype(np.uint8), gz)
    return root


def write_imagefolder(root: Path, per_class: dict[str, int] | None = None, size: int = 32) -> Path:
    per_class = per_class or {"train": 24, "val": 8}
    for seed, (split, count) in enumerate(per_class.items()):
        labels = balanced_labels(count * len(IMAGEFOLDER_CLASSES), len(IMAGEFOLDER_CLASSES), seed)
        images = learnable_images(labels, len(IMAGEFOLDER_CLASSES), size, 3, seed)
        for index, (label, image) in enumerate(zip(labels, images)):
            folder = root / split / IMAGEFOLDER_CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{index:04d}.png")
    return root


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as file:
        pickle.dump(obj, file)


def _write_idx_file(path: Path, array: np.ndarray, gz: bool) -> None:
    payload = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(f"{path}.gz", "wb") as file:
            file.write(payload)
    else:
        path.write_bytes(payload)


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cifar10(tmp_path_factory.mktemp("cifar10"))


@pytest.fixture(scope="session")
def cifar100_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cifar100(tmp_path_factory.mktemp("cifar100"))


@pytest.fixture(scope="session")
def fashion_mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_idx(tmp_path_factory.mktemp("fashion_mnist"), gz=True)


@pytest.fixture(scope="session")
def fashion_mnist_plain_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_idx(tmp_path_factory.mktemp("fashion_mnist_plain"), gz=False)


@pytest.fixture(scope="session")
def imagefolder_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("imagefolder"))
