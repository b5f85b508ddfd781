"""Deterministic augmentation (unikd._sampling): batches are a function of (seed, epoch, key) only."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torchvision import datasets
from torchvision.transforms import v2

from unikd._errors import UnikdError
from unikd._sampling import EpochBatchSampler, KeyedCollate, SeededDataset, derive_seed, keyed_loader

NUM_CLASSES = 5


class _DrawsFromEveryGenerator:
    """A transform that draws from torch's, Python's and numpy's global generators (as timm's RandAugment does)."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image + torch.rand(()) + random.random() + float(np.random.rand())


def _mix_from_every_generator(images: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch-level mix drawing from all three generators, after torchvision's MixUp/CutMix."""
    mixed = v2.RandomChoice(
        [v2.MixUp(alpha=0.8, num_classes=NUM_CLASSES), v2.CutMix(alpha=1.0, num_classes=NUM_CLASSES)]
    )
    images, target = mixed(images, target)
    return images * (1 + random.random() + float(np.random.rand())), target


def _dataset(size: int = 40, pipeline: str = "v2") -> datasets.FakeData:
    if pipeline == "timm":
        from timm.data import create_transform

        transform = create_transform(16, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic")
    else:
        transform = v2.Compose(
            [
                v2.RandomResizedCrop(16, antialias=True),
                v2.RandomHorizontalFlip(),
                v2.RandAugment(),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                _DrawsFromEveryGenerator(),
            ]
        )
    return datasets.FakeData(size, (3, 20, 20), NUM_CLASSES, transform=transform)


def _epoch(dataset, *, epoch: int = 2, seed: int = 7, batch_size: int = 8, start: int = 0, **kwargs) -> list:
    loader = keyed_loader(dataset, batch_size=batch_size, seed=seed, **kwargs)
    loader.batch_sampler.set_epoch(epoch)
    loader.batch_sampler.start_batch = start
    return list(loader)


def _assert_same(batches: list, expected: list) -> None:
    assert len(batches) == len(expected)
    for batch, reference in zip(batches, expected):
        for tensor, reference_tensor in zip(batch, reference):
            assert tensor.dtype == reference_tensor.dtype
            assert torch.equal(tensor, reference_tensor)


@pytest.mark.parametrize("mix", [None, _mix_from_every_generator], ids=["no-mix", "mix"])
def test_same_batches_with_0_1_and_2_workers(mix):
    dataset = _dataset()
    reference = _epoch(dataset, mix=mix)
    assert len(reference) == 5
    images, target, keys = reference[0]
    assert images.shape == (8, 3, 16, 16) and keys.shape == (8, 4) and keys.dtype == torch.int64
    assert target.shape == ((8, NUM_CLASSES) if mix else (8,))
    for workers in (1, 2):
        _assert_same(_epoch(dataset, mix=mix, num_workers=workers), reference)


def test_timm_randaugment_pipeline_is_the_same_with_workers():
    dataset = _dataset(16, pipeline="timm")
    _assert_same(_epoch(dataset, num_workers=2), _epoch(dataset))


def test_persistent_workers_follow_set_epoch_and_start_batch():
    dataset = _dataset(24)
    loader = keyed_loader(dataset, batch_size=8, seed=7, num_workers=2, persistent_workers=True)
    for epoch, start in [(0, 0), (1, 1), (2, 0)]:
        loader.batch_sampler.set_epoch(epoch)
        loader.batch_sampler.start_batch = start
        _assert_same(list(loader), _epoch(dataset, epoch=epoch, start=start))


def test_ranks_shares_concatenate_to_the_single_process_batch():
    dataset = _dataset()
    single = _epoch(dataset)
    shares = [_epoch(dataset, rank=rank, world_size=2) for rank in range(2)]
    for step, batch in enumerate(single):
        for part, whole in zip(zip(*(share[step] for share in shares)), batch):
            assert torch.equal(torch.cat(part), whole)


def test_with_mixing_ranks_mix_within_their_share():
    dataset = _dataset()
    single = _epoch(dataset, mix=_mix_from_every_generator)
    shares = [_epoch(dataset, rank=rank, world_size=2, mix=_mix_from_every_generator) for rank in range(2)]
    plain_shares = [_epoch(dataset, rank=rank, world_size=2) for rank in range(2)]
    for rank, share in enumerate(shares):
        for step, (images, target, keys) in enumerate(share):
            # the same samples as the single process's batch, mixed among themselves (rank in the mix's seed)
            assert torch.equal(keys, single[step][2][rank * 4 : (rank + 1) * 4])
            plain_images, plain_target, _ = plain_shares[rank][step]
            collate = KeyedCollate(_mix_from_every_generator, seed=7, rank=rank)
            items = [
                (image, int(label), tuple(key.tolist())) for image, label, key in zip(plain_images, plain_target, keys)
            ]
            mixed_images, mixed_target, _ = collate(items)
            assert torch.equal(mixed_images, images) and torch.equal(mixed_target, target)
    assert not torch.equal(torch.cat([shares[0][0][0], shares[1][0][0]]), single[0][0])


def test_resume_at_batch_k_is_the_tail_of_the_epoch_without_loading_the_skipped_batches():
    loaded = []

    class Recording(torch.utils.data.Dataset):
        def __init__(self, dataset):
            self.dataset = dataset

        def __len__(self):
            return len(self.dataset)

        def __getitem__(self, index):
            loaded.append(index)
            return self.dataset[index]

    dataset = Recording(_dataset())
    full = _epoch(dataset, mix=_mix_from_every_generator)
    loaded.clear()
    tail = _epoch(dataset, mix=_mix_from_every_generator, start=3)
    _assert_same(tail, full[3:])
    assert sorted(loaded) == sorted(torch.cat([keys[:, 3] for _, _, keys in full[3:]]).tolist())


def test_a_sample_is_augmented_the_same_in_any_batch():
    dataset = _dataset()
    by_index = {}
    for images, _, keys in _epoch(dataset, batch_size=8):
        by_index.update(zip(keys[:, 3].tolist(), images))
    for images, _, keys in _epoch(dataset, batch_size=5):
        for index, image in zip(keys[:, 3].tolist(), images):
            assert torch.equal(image, by_index[index])


def test_other_epochs_and_seeds_give_other_orders_and_augmentations():
    dataset = _dataset()

    def by_index(**kwargs) -> dict:
        return {int(key[3]): image for images, _, keys in _epoch(dataset, **kwargs) for key, image in zip(keys, images)}

    reference = _epoch(dataset)
    for other in (_epoch(dataset, epoch=3), _epoch(dataset, seed=8)):
        assert not torch.equal(other[0][2][:, 3], reference[0][2][:, 3])  # order
    base, next_epoch, next_seed = by_index(), by_index(epoch=3), by_index(seed=8)
    for other in (next_epoch, next_seed):
        common = sorted(set(base) & set(other))
        assert common and all(not torch.equal(base[index], other[index]) for index in common)
    # (seed, epoch) is hashed, not added: seed 0's epoch 1 is not seed 1's epoch 0 (DistributedSampler's seed + epoch)
    assert not torch.equal(EpochBatchSampler(40, 8, seed=0).order(1), EpochBatchSampler(40, 8, seed=1).order(0))


def test_loading_in_the_main_process_leaves_its_generators_untouched():
    dataset = _dataset()

    def draws() -> tuple:
        return torch.rand(3), random.random(), np.random.rand(), torch.randn(1)  # randn: also the cached normal

    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    torch.randn(1)
    expected = draws()
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    torch.randn(1)
    batches = _epoch(dataset, mix=_mix_from_every_generator)
    assert len(batches) == 5
    for value, reference in zip(draws(), expected):
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(reference))


def test_epoch_keys_are_every_ranks_keys_in_global_order():
    sampler = EpochBatchSampler(42, 8, seed=3, max_batches=4)
    sampler.set_epoch(5)
    keys = sampler.epoch_keys(5)
    assert keys.shape == (32, 4)
    assert torch.equal(keys, torch.tensor([key for batch in sampler for key in batch]))
    shares = []
    for rank in range(4):
        share = EpochBatchSampler(42, 8, seed=3, rank=rank, world_size=4, max_batches=4)
        share.set_epoch(5)
        shares.append(list(share))
    merged = [key for step in zip(*shares) for share_batch in step for key in share_batch]
    assert torch.equal(torch.tensor(merged), keys)
    assert len(EpochBatchSampler(42, 8, seed=3)) == 5 and keys[:, 3].unique().numel() == 32


def test_seeded_dataset_items_and_derive_seed():
    dataset = _dataset(8)
    seeded = SeededDataset(dataset, seed=7)
    image, label, key = seeded[(0, 0, 0, 3)]
    again, _, _ = seeded[(0, 5, 2, 3)]  # another batch and slot, the same (epoch, index): the same augmentation
    assert torch.equal(image, again) and key == (0, 0, 0, 3) and label == dataset[3][1] and len(seeded) == 8
    assert derive_seed(0, 1) != derive_seed(1, 0) and derive_seed(-1) == derive_seed(2**64 - 1)
    assert 0 <= derive_seed(1, 2, 3) < 2**128


def test_batch_size_must_split_over_the_processes():
    with pytest.raises(UnikdError) as error:
        EpochBatchSampler(40, 10, seed=0, rank=0, world_size=4)
    assert str(error.value) == "batch size 10 does not split over 4 processes; use a multiple of 4"
    with pytest.raises(UnikdError) as error:
        EpochBatchSampler(40, 8, seed=0, rank=2, world_size=2)
    assert str(error.value) == "rank 2 is not in [0, 2)"
