"""Optimizer and per-step learning-rate schedule.

``build_optimizer`` makes SGD or AdamW with two parameter groups: decayed weights, and the parameters that weight
decay should not touch (norm weights, biases, any 1-d parameter, ViT position embeddings and class/distillation
tokens; see timm's ``param_groups_weight_decay``). ``build_scheduler`` returns a ``LambdaLR`` stepped once per
optimizer step: linear warm-up from ``lr * warmup_lr_ratio`` to ``lr``, then cosine / multistep / step / constant.
The lambda is rebuilt from the config, so the scheduler's ``state_dict`` (its step count) is all a checkpoint needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from unikd._errors import UnikdError

# Parameter-name fragments that never get weight decay, whatever their shape (ViT embeddings and tokens).
NO_DECAY_NAME_FRAGMENTS = ("pos_embed", "cls_token", "dist_token", "reg_token", "relative_position_bias_table")


def param_groups(model: nn.Module, weight_decay: float, no_decay_norm_bias: bool = True) -> list[dict]:
    """Split ``model``'s trainable parameters into a decayed and a non-decayed group.

    With ``no_decay_norm_bias`` False every parameter is decayed (one group).
    """
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not no_decay_norm_bias:
        return [{"params": [p for _, p in params], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for name, p in params:
        excluded = p.ndim <= 1 or name.endswith(".bias") or any(f in name for f in NO_DECAY_NAME_FRAGMENTS)
        (no_decay if excluded else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, optim_cfg) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW over ``param_groups(model, ...)``; ``optim_cfg`` is ``cfg.optim``."""
    groups = param_groups(model, optim_cfg.weight_decay, optim_cfg.no_decay_norm_bias)
    if optim_cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=optim_cfg.lr, momentum=optim_cfg.momentum, nesterov=optim_cfg.nesterov)
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=optim_cfg.lr)
    raise UnikdError(f"optim.name: {optim_cfg.name!r} is not one of adamw, sgd")


def lr_factor_fn(schedule_cfg, base_lr: float, epochs: int, steps_per_epoch: int) -> Callable[[int], float]:
    """Return ``factor(step)``: the multiplier of the base learning rate after ``step`` optimizer steps.

    Warm-up lasts ``round(warmup_epochs * steps_per_epoch)`` steps and rises linearly from ``warmup_lr_ratio`` to 1.
    Cosine then decays from 1 to ``min_lr / base_lr`` over the remaining steps; multistep multiplies by ``gamma`` at
    each epoch in ``milestones``; step multiplies by ``gamma`` every ``step_size`` epochs (epochs count from 0, so the
    first decay happens at the start of epoch ``step_size``).
    """
    name = schedule_cfg.name
    if name not in ("cosine", "multistep", "step", "constant"):
        raise UnikdError(f"schedule.name: {name!r} is not one of constant, cosine, multistep, step")
    total_steps = max(1, epochs * steps_per_epoch)
    warmup_steps = round(schedule_cfg.warmup_epochs * steps_per_epoch)
    min_ratio = schedule_cfg.min_lr / base_lr if base_lr > 0 else 0.0
    milestones = sorted(schedule_cfg.milestones)

    def factor(step: int) -> float:
        if step < warmup_steps:
            ratio = schedule_cfg.warmup_lr_ratio
            return ratio + (1.0 - ratio) * step / warmup_steps
        epoch = step // steps_per_epoch
        if name == "cosine":
            progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
            return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if name == "multistep":
            return schedule_cfg.gamma ** sum(epoch >= m for m in milestones)
        if name == "step":
            return schedule_cfg.gamma ** (epoch // schedule_cfg.step_size)
        return 1.0

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule_cfg, base_lr: float, epochs: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` to be stepped after every optimizer step; ``schedule_cfg`` is ``cfg.schedule``."""
    factor = lr_factor_fn(schedule_cfg, base_lr, epochs, steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
