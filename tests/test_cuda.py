"""CUDA checks: the losses agree with the CPU (the USKD rank takes the torch-sort path there) and training runs
under fp16 (GradScaler) and bf16 autocast. Skipped on machines without CUDA."""

from __future__ import annotations

import math

import pytest
import torch

import unikd.losses as L
from unikd.config import load_config
from unikd.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _losses(student, teacher, target, weak, dense):
    return {
        "nkd": L.nkd_loss(student, teacher, target, temperature=2.0),
        "dkd": L.dkd_loss(student, teacher, target),
        "kd": L.kd_loss(student, teacher),
        "wsld": L.wsld_loss(student, teacher, target),
        "uskd": L.uskd_loss(student, weak, target),
        "uskd_released": L.uskd_loss(student, weak, target, rank="released"),
        "tfkd": L.tfkd_loss(student, target),
        "zipf_ls": L.zipf_ls_loss(student, dense, target),
    }


@pytest.mark.parametrize("mixed", [False, True])
def test_losses_and_gradients_match_the_cpu(mixed):
    generator = torch.Generator().manual_seed(0)
    n, c = 32, 100
    student, teacher, weak = (torch.randn(n, c, generator=generator) * 3 for _ in range(3))
    dense = torch.randn(n, 9, c, generator=generator)
    target = torch.randint(0, c, (n,), generator=generator)
    if mixed:
        target = 0.7 * torch.nn.functional.one_hot(target, c) + 0.3 * torch.nn.functional.one_hot((target + 1) % c, c)
    results = {}
    for device in ("cpu", "cuda"):
        leaf = student.to(device).requires_grad_(True)
        args = [t.to(device) for t in (teacher, target, weak, dense)]
        values = _losses(leaf, *args)
        results[device] = {k: (v.item(), torch.autograd.grad(v, leaf)[0].cpu()) for k, v in values.items()}
    for name, (value, grad) in results["cpu"].items():
        cuda_value, cuda_grad = results["cuda"][name]
        assert cuda_value == pytest.approx(value, rel=1e-4), name
        torch.testing.assert_close(cuda_grad, grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_training_runs_under_amp_on_cuda(tmp_path, amp):
    overrides = [
        "data.name=fake",
        "data.img_size=16",
        "data.train_subset=64",
        "data.val_subset=32",
        "data.num_workers=0",
        "method.name=uskd",
        "train.batch_size=16",
        "train.epochs=1",
        "train.progress=false",
        "train.tensorboard=false",
        "train.device=cuda",
        f"train.amp={amp}",
        f"output_dir={tmp_path / amp}",
    ]
    metrics = train(load_config(None, overrides))
    assert math.isfinite(metrics["last_top1"]) and metrics["history"][0]["peak_mem_mb"] > 0
