"""Optimizer parameter groups (weight-decay exclusions) and the per-step learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from unikd._optim import build_optimizer, build_scheduler, lr_factor_fn, param_groups
from unikd.config import OptimConfig, ScheduleConfig


class TinyViTLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.head = nn.Linear(4, 2)
        self.frozen = nn.Linear(2, 2).requires_grad_(False)


def _names(model: nn.Module, params: list[torch.Tensor]) -> set[str]:
    ids = {id(p) for p in params}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def test_weight_decay_excludes_norm_bias_embeddings_and_frozen_params():
    model = TinyViTLike()
    decay, no_decay = param_groups(model, weight_decay=5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert _names(model, decay["params"]) == {"conv.weight", "head.weight"}
    assert _names(model, no_decay["params"]) == {
        "conv.bias",
        "norm.weight",
        "norm.bias",
        "pos_embed",
        "cls_token",
        "head.bias",
    }


def test_weight_decay_on_everything_when_exclusions_are_off():
    model = TinyViTLike()
    (group,) = param_groups(model, weight_decay=1e-4, no_decay_norm_bias=False)
    assert group["weight_decay"] == 1e-4
    assert len(group["params"]) == 8  # all trainable parameters, the frozen layer left out


def test_build_optimizer_sgd_and_adamw():
    model = TinyViTLike()
    sgd = build_optimizer(model, OptimConfig(name="sgd", lr=0.2, momentum=0.8, nesterov=True, weight_decay=1e-3))
    assert isinstance(sgd, torch.optim.SGD)
    assert [g["weight_decay"] for g in sgd.param_groups] == [1e-3, 0.0]
    assert sgd.defaults["momentum"] == 0.8 and sgd.defaults["nesterov"] and sgd.defaults["lr"] == 0.2
    adamw = build_optimizer(model, OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05))
    assert isinstance(adamw, torch.optim.AdamW)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.05, 0.0]


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        # 10 epochs x 10 steps; 1 warm-up epoch from 0.1 * lr, then cosine down to min_lr / lr = 0.1 over 90 steps.
        (
            ScheduleConfig(name="cosine", warmup_epochs=1, warmup_lr_ratio=0.1, min_lr=0.01),
            {0: 0.1, 5: 0.55, 10: 1.0, 55: 0.1 + 0.9 * 0.5, 100: 0.1},
        ),
        (ScheduleConfig(name="multistep", milestones=[3, 6], gamma=0.1), {0: 1.0, 29: 1.0, 30: 0.1, 59: 0.1, 60: 0.01}),
        (ScheduleConfig(name="step", step_size=4, gamma=0.5), {0: 1.0, 39: 1.0, 40: 0.5, 80: 0.25}),
        (ScheduleConfig(name="constant", warmup_epochs=0.5, warmup_lr_ratio=0.0), {0: 0.0, 1: 0.2, 5: 1.0, 99: 1.0}),
    ],
    ids=["warmup+cosine", "multistep", "step", "warmup+constant"],
)
def test_lr_factor_values(schedule, expected):
    factor = lr_factor_fn(schedule, base_lr=0.1, epochs=10, steps_per_epoch=10)
    for step, value in expected.items():
        assert math.isclose(factor(step), value, rel_tol=1e-9, abs_tol=1e-12), (step, factor(step), value)


def test_scheduler_steps_per_iteration_and_resumes_from_its_state_dict():
    schedule = ScheduleConfig(name="cosine", warmup_epochs=1, warmup_lr_ratio=0.1)
    param = nn.Parameter(torch.zeros(1))

    def make():
        optimizer = torch.optim.SGD([param], lr=0.1)
        return optimizer, build_scheduler(optimizer, schedule, base_lr=0.1, epochs=3, steps_per_epoch=4)

    optimizer, scheduler = make()
    factor = lr_factor_fn(schedule, 0.1, 3, 4)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(5):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.1 * factor(step) for step in range(6)])

    resumed_optimizer, resumed_scheduler = make()
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed_scheduler.load_state_dict(scheduler.state_dict())
    for opt, sched in ((optimizer, scheduler), (resumed_optimizer, resumed_scheduler)):
        opt.step()
        sched.step()
    assert resumed_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * factor(6))
