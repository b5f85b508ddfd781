"""Datasets in each real format (written by conftest.py), their transforms, subsets and MixUp/CutMix."""

from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision
from conftest import CIFAR10_NAMES, IMAGEFOLDER_CLASSES, write_idx
from PIL import Image
from torch.utils.data._utils import ExceptionWrapper
from torchvision.transforms import v2

from unikd import data as unikd_data
from unikd._errors import ConfigError, DataError
from unikd.config import DATASETS, NATIVE_CHANNELS, DataConfig, load_config
from unikd.data import DataBundle, build_datasets, build_mix_collate, build_transform, dataset_root, read_rgb_image


def _bundle(name: str, root: Path | None, **fields) -> DataBundle:
    return build_datasets(DataConfig(name=name, root=None if root is None else str(root), **fields))


def _check_items(bundle: DataBundle, shape: tuple[int, ...]) -> None:
    for dataset in (bundle.train, bundle.val):
        image, label = dataset[0]
        assert image.shape == shape and image.dtype == torch.float32
        assert isinstance(label, int) and 0 <= label < bundle.num_classes
    assert (bundle.in_chans, bundle.img_size, bundle.img_size) == shape


def test_cifar10(cifar10_root):
    bundle = _bundle("cifar10", cifar10_root)
    assert (len(bundle.train), len(bundle.val), bundle.num_classes) == (200, 100, 10)
    assert bundle.class_names == CIFAR10_NAMES
    _check_items(bundle, (3, 32, 32))
    with open(cifar10_root / "cifar-10-batches-py" / "test_batch", "rb") as file:
        assert bundle.val.targets == pickle.load(file)["labels"]


def test_cifar100(cifar100_root):
    bundle = _bundle("cifar100", cifar100_root)
    assert (len(bundle.train), len(bundle.val), bundle.num_classes) == (200, 100, 100)
    assert bundle.class_names[:2] == ["fine_0", "fine_1"] and len(bundle.class_names) == 100
    _check_items(bundle, (3, 32, 32))


@pytest.mark.parametrize("root_fixture", ["fashion_mnist_root", "fashion_mnist_plain_root"])
def test_fashion_mnist_reads_flat_idx_files_gzipped_or_not(root_fixture, request):
    root = request.getfixturevalue(root_fixture)
    bundle = _bundle("fashion_mnist", root)
    assert (len(bundle.train), len(bundle.val), bundle.num_classes) == (200, 100, 10)
    assert bundle.class_names == torchvision.datasets.FashionMNIST.classes
    _check_items(bundle, (1, 28, 28))
    assert bundle.train.data.shape == (200, 28, 28) and bundle.train.data.dtype == torch.uint8
    # the generator makes class k brighter than class k - 1, so the labels must line up with the pixels
    means = torch.stack([bundle.train.data[bundle.train.targets == k].float().mean() for k in range(10)])
    assert torch.all(means[1:] > means[:-1])


def test_mnist_uses_the_same_reader(fashion_mnist_root):
    bundle = _bundle("mnist", fashion_mnist_root)
    assert bundle.num_classes == 10 and bundle.class_names[0] == "0 - zero"
    _check_items(bundle, (1, 28, 28))


def test_imagefolder(imagefolder_root):
    bundle = _bundle("imagefolder", imagefolder_root, img_size=32)
    assert (len(bundle.train), len(bundle.val), bundle.num_classes) == (96, 32, 4)
    assert bundle.class_names == IMAGEFOLDER_CLASSES
    _check_items(bundle, (3, 32, 32))
    assert _bundle("imagefolder", imagefolder_root).img_size == 224


def test_fake_sizes_follow_the_subsets():
    bundle = _bundle("fake", None, num_classes=5, train_subset=12, val_subset=4, img_size=16)
    assert (len(bundle.train), len(bundle.val), bundle.num_classes) == (12, 4, 5)
    assert bundle.class_names == [f"class_{k}" for k in range(5)]
    _check_items(bundle, (3, 16, 16))
    assert not torch.equal(bundle.train[0][0], bundle.val[0][0])  # distinct images in train and val
    assert len(_bundle("fake", None).train) == unikd_data.FAKE_SIZES[0]


def test_every_dataset_name_has_a_loader():
    assert set(unikd_data._LOADERS) | {"fake"} == set(DATASETS) == set(unikd_data._STATS)


def test_default_roots():
    assert dataset_root(DataConfig(name="fashion_mnist")) == Path("/usr/share/datasets/fashion-mnist")
    assert dataset_root(DataConfig(name="cifar100")) == Path("data/cifar100")
    assert dataset_root(DataConfig(name="cifar100", root="~/x")) == Path.home() / "x"


# ---- errors -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "cifar100",
            "data.root: cifar100 not found in {root} (expected cifar-100-python/{{train,test,meta}}); point data.root "
            "at the folder that holds them, or set data.download=true to download them",
        ),
        (
            "cifar10",
            "data.root: cifar10 not found in {root} (expected cifar-10-batches-py/{{data_batch_1,data_batch_2,"
            "data_batch_3,data_batch_4,data_batch_5,test_batch,batches.meta}}); point data.root at the folder that "
            "holds them, or set data.download=true to download them",
        ),
        (
            "fashion_mnist",
            "data.root: fashion_mnist not found in {root} (expected train-images-idx3-ubyte[.gz], "
            "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]); install it with "
            "apt-get install dataset-fashion-mnist, point data.root at the folder that holds them, or set "
            "data.download=true to download them",
        ),
        (
            "imagefolder",
            "data.root: imagefolder not found in {root} (expected train/<class>/<image> and val/<class>/<image>); "
            "point data.root at the folder that holds them",
        ),
    ],
)
def test_missing_files_name_the_root_the_files_and_the_fix(tmp_path, name, message):
    with pytest.raises(ValueError) as error:
        _bundle(name, tmp_path)
    assert str(error.value) == message.format(root=tmp_path)


def test_a_partial_idx_folder_is_missing_files(tmp_path):
    write_idx(tmp_path, num_train=4, num_test=4)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ValueError, match=r"^data\.root: fashion_mnist not found in "):
        _bundle("fashion_mnist", tmp_path)


def test_failed_download_says_so(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise URLError("no route to host")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", no_network)
    with pytest.raises(ValueError) as error:
        _bundle("cifar10", tmp_path, download=True)
    assert str(error.value) == (
        f"data.download: downloading cifar10 to {tmp_path} failed (no route to host); without a network, copy the "
        "files there by hand and set data.download=false"
    )


def test_download_is_skipped_when_the_files_exist(cifar10_root, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", pytest.fail)
    assert _bundle("cifar10", cifar10_root, download=True).num_classes == 10


def test_num_classes_must_match_the_dataset(cifar10_root):
    with pytest.raises(ValueError) as error:
        _bundle("cifar10", cifar10_root, num_classes=100)
    assert (
        str(error.value)
        == f"data.num_classes: 100 does not match the dataset (cifar10 in {cifar10_root} has 10 classes)"
    )
    assert _bundle("cifar10", cifar10_root, num_classes=10).num_classes == 10


def test_imagefolder_train_and_val_classes_must_agree(tmp_path, imagefolder_root):
    shutil.copytree(imagefolder_root, tmp_path, dirs_exist_ok=True)
    shutil.rmtree(tmp_path / "val" / "owl")
    with pytest.raises(ValueError) as error:
        _bundle("imagefolder", tmp_path)
    assert str(error.value) == (
        f"data.root: {tmp_path}/train and {tmp_path}/val have different class folders (in only one: owl)"
    )


def test_damaged_cifar_files_are_named(tmp_path, cifar10_root):
    shutil.copytree(cifar10_root, tmp_path, dirs_exist_ok=True)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(DataError, match=r"^data\.root: the cifar10 files in .*cifar-10-batches-py are damaged or "):
        _bundle("cifar10", tmp_path)


def test_a_truncated_plain_idx_file_is_named(tmp_path):
    write_idx(tmp_path, num_train=8, num_test=4, gz=False)
    images = tmp_path / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises(DataError) as error:
        _bundle("fashion_mnist", tmp_path)
    assert re.fullmatch(
        rf"data\.root: {re.escape(str(images))} is damaged or truncated \(RuntimeError: .*\); reinstall it \(apt-get "
        r"install --reinstall dataset-fashion-mnist\) or copy the file again",
        str(error.value),
    )


@pytest.mark.parametrize("pixels", ["bomb", "warning"])
def test_images_over_the_decompression_bomb_limit_are_refused_not_decoded(tmp_path, monkeypatch, pixels):
    path = tmp_path / "big.png"
    Image.new("RGB", (40, 40)).save(path)  # 1600 pixels
    # PIL errors above twice MAX_IMAGE_PIXELS and only warns between once and twice: both stop unikd.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 700 if pixels == "bomb" else 1000)
    with pytest.raises(DataError, match=rf"^data: {re.escape(str(path))} is too large to decode safely \(Decompr"):
        read_rgb_image(str(path))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    assert read_rgb_image(str(path)).size == (40, 40)


def test_a_data_error_raised_in_a_worker_keeps_its_one_line_message():
    original = DataError("data: cannot read image /x.png (not an image format PIL knows)")
    try:
        raise original
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DataError) as error:
        wrapped.reraise()  # what torch does with a worker's exception in the main process
    assert str(error.value) == str(original)


def test_channels_3_repeats_a_grayscale_channel(fashion_mnist_root):
    gray, rgb = _bundle("fashion_mnist", fashion_mnist_root), _bundle("fashion_mnist", fashion_mnist_root, channels=3)
    assert (gray.in_chans, rgb.in_chans) == (1, 3)
    image, _ = rgb.val[0]
    assert image.shape == (3, 28, 28) and all(torch.equal(image[c], gray.val[0][0][0]) for c in range(3))
    assert rgb.train[0][0].shape == (3, 28, 28)
    transform = pickle.loads(pickle.dumps(build_transform(DataConfig(channels=3), train=True)))  # workers pickle it
    assert isinstance(transform.transforms[-1], unikd_data._RepeatChannels)


def test_native_channels_match_the_normalisation_statistics():
    assert {name: len(stats.mean) for name, stats in unikd_data._STATS.items()} == NATIVE_CHANNELS


# ---- transforms -------------------------------------------------------------------------------------------------


def _steps(transform) -> list:
    return list(transform.transforms)


def _step_types(*, train: bool, **fields) -> set[type]:
    return {type(step) for step in _steps(build_transform(DataConfig(**fields), train=train))}


@pytest.mark.parametrize(("name", "padding"), [("cifar10", 4), ("cifar100", 4), ("fashion_mnist", 2), ("mnist", 2)])
def test_small_image_train_transform_is_crop_pad_flip_normalize(name, padding):
    crop, flip, *_, normalize = _steps(build_transform(DataConfig(name=name), train=True))
    assert isinstance(crop, v2.RandomCrop) and crop.padding == [padding] * 4
    assert isinstance(flip, v2.RandomHorizontalFlip) and isinstance(normalize, v2.Normalize)
    assert not any(
        isinstance(step, v2.RandomCrop) for step in _steps(build_transform(DataConfig(name=name), train=False))
    )


def test_img_size_resizes_small_images_and_scales_the_padding(cifar10_root):
    transform = build_transform(DataConfig(name="cifar10", img_size=64), train=True)
    resize, crop = _steps(transform)[:2]
    assert resize.size == [64] and crop.padding == [8] * 4
    assert _bundle("cifar10", cifar10_root, img_size=64).train[0][0].shape == (3, 64, 64)


def test_augment_none_and_randaugment(cifar10_root):
    assert not any(
        isinstance(s, v2.RandomCrop) for s in _steps(build_transform(DataConfig(augment="none"), train=True))
    )
    assert any(
        isinstance(s, v2.RandAugment) for s in _steps(build_transform(DataConfig(augment="randaugment"), train=True))
    )
    assert _bundle("cifar10", cifar10_root, augment="randaugment").train[0][0].shape == (3, 32, 32)


def test_imagefolder_transforms(imagefolder_root):
    train = _steps(build_transform(DataConfig(name="imagefolder", img_size=32), train=True))
    assert isinstance(train[0], v2.RandomResizedCrop) and isinstance(train[1], v2.RandomHorizontalFlip)
    resize, center = _steps(build_transform(DataConfig(name="imagefolder"), train=False))[:2]
    assert resize.size == [256] and tuple(center.size) == (224, 224)
    randaugment = build_transform(DataConfig(name="imagefolder", img_size=32, augment="randaugment"), train=True)
    assert "RandAugment" in repr(randaugment)  # timm's create_transform
    bundle = _bundle("imagefolder", imagefolder_root, img_size=32, augment="randaugment")
    assert bundle.train[0][0].shape == (3, 32, 32)


def test_randaugment_can_posterize_to_zero_bits():
    # timm's 'inc1' RandAugment (the DeiT/Swin recipes) posterizes to 0 bits at magnitude 10, which mstd0.5 reaches
    # for about 1 image in 600; Pillow 13 refuses 0 bits (ValueError mid-epoch), hence pyproject's pillow<13.
    from timm.data.auto_augment import _posterize_increasing_level_to_arg, posterize

    assert _posterize_increasing_level_to_arg(10, {}) == (0,)
    image = Image.new("RGB", (4, 4), (200, 100, 50))
    assert posterize(image, 0).getextrema() == ((0, 0), (0, 0), (0, 0))


def test_the_eval_resize_is_the_configs(imagefolder_root, tmp_path):
    resize, center = _steps(build_transform(DataConfig(name="imagefolder"), train=False))[:2]
    assert resize.interpolation == v2.InterpolationMode.BILINEAR  # "auto" unresolved (no model): bilinear
    folder = {"name": "imagefolder", "root": str(imagefolder_root), "img_size": 32, "eval_crop_pct": 0.9}
    bicubic = DataConfig(**folder, eval_interpolation="bicubic")
    resize, center = _steps(build_transform(bicubic, train=False))[:2]
    assert (resize.size, resize.interpolation, tuple(center.size)) == ([35], v2.InterpolationMode.BICUBIC, (32, 32))
    # The images really go through it: bicubic and bilinear resizes of the same file differ.
    bilinear = DataConfig(**folder, eval_interpolation="bilinear")
    images = [build_datasets(cfg, with_train=False).val[0][0] for cfg in (bicubic, bilinear)]
    assert images[0].shape == images[1].shape == (3, 32, 32) and not torch.equal(*images)


def test_evaluation_needs_only_the_validation_split(imagefolder_root, tmp_path):
    val_only = tmp_path / "val_only"
    shutil.copytree(imagefolder_root / "val", val_only / "val")
    bundle = build_datasets(DataConfig(name="imagefolder", root=str(val_only), img_size=32), with_train=False)
    assert bundle.train is None and bundle.class_names == IMAGEFOLDER_CLASSES and len(bundle.val) == 32
    with pytest.raises(ConfigError, match=r"expected train/<class>/<image> and val/<class>/<image>\)"):
        build_datasets(DataConfig(name="imagefolder", root=str(val_only), img_size=32))
    assert build_datasets(DataConfig(name="fake", val_subset=4), with_train=False).train is None


def test_eval_transform_is_deterministic(cifar10_root):
    bundle = _bundle("cifar10", cifar10_root)
    assert torch.equal(bundle.val[3][0], bundle.val[3][0])
    assert abs(bundle.val[3][0].mean().item()) < 3  # normalised


# ---- subsets ----------------------------------------------------------------------------------------------------


def test_subsets_are_fixed_by_the_seed(cifar10_root):
    first = _bundle("cifar10", cifar10_root, train_subset=50, val_subset=20)
    second = _bundle("cifar10", cifar10_root, train_subset=50, val_subset=20)
    assert (len(first.train), len(first.val)) == (50, 20)
    assert first.train.indices == second.train.indices and first.val.indices == second.val.indices
    assert first.train.indices == sorted(first.train.indices) and first.train.indices != list(range(50))
    assert len(_bundle("cifar10", cifar10_root, train_subset=10_000).train) == 200  # larger than the set: all of it


def test_subsets_come_from_the_config(fashion_mnist_root):
    cfg = load_config(None, [f"data.root={fashion_mnist_root}", "data.train_subset=30"])
    assert len(build_datasets(cfg.data).train) == 30


# ---- MixUp / CutMix ---------------------------------------------------------------------------------------------


def _batch(count: int = 16, num_classes: int = 10) -> list:
    return [(torch.rand(3, 8, 8), index % num_classes) for index in range(count)]


def test_no_mixing_gives_no_collate():
    assert build_mix_collate(DataConfig(), 10) is None


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.2, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mix_collate_gives_probability_targets(mixup, cutmix):
    torch.manual_seed(0)
    collate = build_mix_collate(DataConfig(mixup=mixup, cutmix=cutmix), 10)
    batch = _batch()
    images, target = collate(batch)
    assert images.shape == (16, 3, 8, 8) and target.shape == (16, 10) and target.dtype == torch.float32
    assert torch.all(target >= 0) and torch.allclose(target.sum(dim=1), torch.ones(16))
    assert (target.max(dim=1).values < 1).any()  # actually mixed
    assert not torch.equal(images, torch.stack([image for image, _ in batch]))
    assert isinstance(pickle.loads(pickle.dumps(collate)), unikd_data.MixCollate)  # DataLoader workers pickle it


def test_both_mixes_choose_one_per_batch():
    collate = build_mix_collate(DataConfig(mixup=0.8, cutmix=1.0), 10)
    assert isinstance(collate.mix, v2.RandomChoice) and len(collate.mix.transforms) == 2
