"""DDP on CPU (gloo): 2 processes give the weights of 1 process with the same global batch; device/rank helpers.

The ranks' shares of each step, augmented as a function of (seed, epoch, sample index) (unikd._sampling), are the
one-process batch: the weights can only agree if both runs trained on the same augmented images.

The equality needs per-sample losses and a model without BatchNorm (per-rank batch statistics differ from
full-batch ones), so it uses a one-block ViT and USKD with the EMA soft target (Table 15's S2, per sample, where the
default target term takes a batch mean): its weak head trains under DDP, and each rank's EMA copy of the student,
which gives that rank's soft targets, must be updated after every step for the ranks to agree with one process.
Tolerance: float32 sums over different batch splits differ in rounding only; weights agree to 1e-5 relative (1e-7
absolute) after 4 SGD steps (measured: at most ~2e-7 relative).
"""

from __future__ import annotations

import json
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from unikd import UnikdError
from unikd._checkpoint import load_checkpoint
from unikd._distributed import DistInfo, all_reduce, init_distributed, resolve_device
from unikd.config import load_config
from unikd.train import train

TINY_VIT = [
    "data.name=fake",
    "data.img_size=8",
    "data.train_subset=64",
    "data.val_subset=20",
    "data.augment=default",  # per-sample random crops and flips: the same whichever rank draws them
    "data.num_workers=0",
    "model.student=timm/vit_tiny_patch16_224",
    "model.student_kwargs={img_size: 8, patch_size: 4, embed_dim: 16, depth: 1, num_heads: 2}",
    "method.name=uskd",
    "method.target_soft_label=ema",  # not the default batch mean of S_t^2, a per-rank statistic like BatchNorm's
    "train.ema_decay=0.5",
    "optim.lr=0.05",
    "train.batch_size=8",
    "train.eval_batch_size=8",
    "train.epochs=2",
    "train.max_steps_per_epoch=2",
    "train.log_every=1",
    "train.progress=false",
    "train.tensorboard=false",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, overrides: list[str]) -> None:
    """What torchrun does for each process: set the rendezvous environment, then run the trainer."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    train(load_config(None, overrides))


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    single_result = train(load_config(None, [*TINY_VIT, f"output_dir={single}"]))
    mp.spawn(_ddp_worker, args=(2, _free_port(), [*TINY_VIT, f"output_dir={double}"]), nprocs=2)

    a, b = load_checkpoint(single / "last.pt"), load_checkpoint(double / "last.pt")
    for part in ("model", "method", "ema"):  # the student and USKD's weak head train under DDP; the EMA follows
        for name in a[part]:
            torch.testing.assert_close(b[part][name], a[part][name], rtol=1e-5, atol=1e-7, msg=name)

    # Metrics are all-reduced (the same numbers as one process) and written once, by rank 0.
    single_records, double_records = _records(single), _records(double)
    assert [(r["split"], r["step"]) for r in double_records] == [(r["split"], r["step"]) for r in single_records]
    for r1, r2 in zip(single_records, double_records):
        if r1["split"] == "train":
            assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)
            assert r2["loss_uskd"] == pytest.approx(r1["loss_uskd"], rel=1e-5)
        else:
            assert r2["top1"] == r1["top1"] and r2["top5"] == r1["top5"]  # every val image counted exactly once
            assert r2["val_loss"] == pytest.approx(r1["val_loss"], rel=1e-5)
    double_result = json.loads((double / "final.json").read_text())
    assert double_result["best_top1"] == single_result["best_top1"]


def test_under_ddp_each_rank_stores_its_share_and_a_warm_run_reads_them_all(tmp_path):
    from unikd.models import create_model

    torch.save(create_model("cifar/smallcnn", 10, width=4).state_dict(), tmp_path / "teacher.pt")
    kd = [
        *(key for key in TINY_VIT if not key.startswith(("method.", "train.ema"))),
        *("method.name=kd", "model.teacher=cifar/smallcnn", "model.teacher_kwargs={width: 4}"),
        *(f"model.teacher_checkpoint={tmp_path / 'teacher.pt'}", f"train.teacher_cache={tmp_path / 'cache'}"),
    ]
    for name in ("cold", "warm"):
        mp.spawn(_ddp_worker, args=(2, _free_port(), [*kd, f"output_dir={tmp_path / name}"]), nprocs=2)
    cold, warm = ([r for r in _records(tmp_path / name) if r["split"] == "teacher_cache"] for name in ("cold", "warm"))
    assert [(r["hits"], r["misses"]) for r in cold[1:]] == [(0, 4), (0, 4)]  # 2 steps x 2 ranks, every epoch
    assert [(r["hits"], r["misses"]) for r in warm[1:]] == [(4, 0), (4, 0)]
    assert warm[0]["epochs_cached"] == 2 and warm[0]["teacher_top1_cached"]
    a, b = load_checkpoint(tmp_path / "cold" / "last.pt"), load_checkpoint(tmp_path / "warm" / "last.pt")
    assert all(torch.equal(a["model"][name], b["model"][name]) for name in a["model"])


def _ddp_worker_reporting(rank: int, world_size: int, port: int, overrides: list[str], messages) -> None:
    try:
        _ddp_worker(rank, world_size, port, overrides)
        messages.put((rank, "no error"))
    except UnikdError as error:
        messages.put((rank, str(error)))


def test_a_set_up_error_on_rank_0_stops_every_rank_instead_of_hanging(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("")  # output_dir is a file: only rank 0 looks at the run directory
    messages = mp.get_context("spawn").SimpleQueue()
    context = mp.start_processes(
        _ddp_worker_reporting,
        args=(2, _free_port(), [*TINY_VIT, f"output_dir={taken}"], messages),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 120
    while not context.join(timeout=5):
        assert time.monotonic() < deadline, "a rank hung"
    assert dict(messages.get() for _ in range(2)) == {
        0: f"output_dir: {taken} is a file, not a folder; choose another output_dir",
        1: "another process of this job failed while setting up; see rank 0's message",
    }


def test_without_torchrun_the_process_is_rank_0_of_1(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    info, device, initialized_here = init_distributed("cpu")
    assert (info, device, initialized_here) == (DistInfo(0, 0, 1), torch.device("cpu"), False)
    assert info.is_main and not info.is_distributed
    assert torch.equal(all_reduce(torch.tensor([1.0, 2.0])), torch.tensor([1.0, 2.0]))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UnikdError, match=r"^train\.device: 'tpu' is not one of auto, cpu, cuda$"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_is_a_clear_error():
    message = r"^train\.device: 'cuda' was requested but CUDA is not available; use train\.device=auto or cpu$"
    with pytest.raises(UnikdError, match=message):
        resolve_device("cuda")
