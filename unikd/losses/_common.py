"""Shared plumbing of the loss functions: input checks, target handling, float32 compute, the module wrapper.

Targets are class indices (N,) or probabilities (N, C) everywhere (mixup/cutmix, smoothing).
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def full_precision(loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Run a loss with autocast off and float16/bfloat16 tensors upcast to float32.

    Softmax, log and the Zipf tables lose too much in half precision (and the masked logits use the dtype's most
    negative value), so the arithmetic is float32 whatever the caller's autocast state; float64 stays float64.
    """

    @functools.wraps(loss_fn)
    def wrapper(*args, **kwargs):
        args = [a.float() if isinstance(a, torch.Tensor) and a.dtype in _HALF_DTYPES else a for a in args]
        device_types = {a.device.type for a in args if isinstance(a, torch.Tensor)}
        device_type = "cuda" if "cuda" in device_types else next(iter(device_types), "cpu")
        with torch.autocast(device_type=device_type, enabled=False):
            return loss_fn(*args, **kwargs)

    return wrapper


def _shape(tensor: torch.Tensor) -> str:
    return str(tuple(tensor.shape))


def check_logits(name: str, logits: torch.Tensor, like: torch.Tensor | None = None) -> None:
    """Logits must be a floating (N, C) tensor with C >= 2, of the same shape as ``like`` when given."""
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor of shape (N, C), got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise ValueError(f"{name}: expected floating-point logits, got dtype {logits.dtype}; convert with .float()")
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"{name}: expected shape (N, C) with C >= 2 classes, got {_shape(logits)}")
    if like is not None and logits.shape != like.shape:
        raise ValueError(
            f"{name}: shape {_shape(logits)} does not match student_logits {_shape(like)}; both must be (N, C)"
        )


def check_target(target: torch.Tensor, logits: torch.Tensor, validate: bool | None) -> None:
    """Check ``target`` against (N, C) logits: indices (N,) in [0, C) or probability rows (N, C).

    Shape checks always run. Value checks (range, non-negative rows summing to 1) need the values on the host,
    which synchronises an accelerator: they run when ``validate`` is True, or when it is None and the data is on
    the CPU (where they cost no sync).
    """
    n, c = logits.shape
    if not isinstance(target, torch.Tensor):
        raise ValueError(f"target: expected a tensor, got {type(target).__name__}")
    if (target.dim(), tuple(target.shape)) not in ((1, (n,)), (2, (n, c))):
        raise ValueError(
            f"target: expected class indices ({n},) or probabilities ({n}, {c}) for logits of shape ({n}, {c}), "
            f"got shape {_shape(target)}"
        )
    if target.dim() == 1 and (target.is_floating_point() or target.dtype == torch.bool):
        raise ValueError(f"target: class indices (N,) must be an integer tensor, got dtype {target.dtype}")
    if target.dim() == 2 and not target.is_floating_point():
        raise ValueError(f"target: probabilities (N, C) must be floating point, got dtype {target.dtype}")
    if validate is False or (validate is None and target.device.type != "cpu"):
        return
    if target.dim() == 1:
        low, high = int(target.min()), int(target.max())
        if low < 0 or high >= c:
            raise ValueError(f"target: class indices must be in [0, {c}), got values from {low} to {high}")
    else:
        row_sums = target.sum(dim=1)
        if bool((target < 0).any()) or not torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-3):
            raise ValueError("target: probability rows must be non-negative and sum to 1 (check mixup/cutmix output)")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{name}: {value!r} is not one of {', '.join(map(repr, choices))}{hint}")


def check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name}: must be > 0, got {value}")


def target_class(target: torch.Tensor) -> torch.Tensor:
    """(N,) class indices: the target itself, or the argmax of probability rows (as the released NKD code)."""
    return target if target.dim() == 1 else target.argmax(dim=1)


def mask_columns(logits: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """A copy of (N, C) logits with the given columns (N, k) set to the dtype's most negative value.

    A softmax over the result is the softmax over the remaining classes with exactly zero mass on the masked ones;
    unlike boolean-mask indexing it keeps the (N, C) layout, so no gather into a ragged copy.
    """
    return logits.scatter(1, columns, torch.finfo(logits.dtype).min)


def non_target_softmax(scaled_logits: torch.Tensor, columns: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Softmax over the classes not in ``columns`` (N, k) of (N, C) logits, with its log-normaliser.

    Returns ``(masked, probs, log_norm)``: the logits with the columns masked (see :func:`mask_columns`), the
    renormalised probabilities (N, C) (exactly 0 at the columns), and the log-sum-exp over the other classes (N, 1).
    One fused softmax does the work; the log-normaliser is read back at each row's largest entry,
    ``lse = max_j z_j - log max_j p_j``, where p >= 1/C keeps the log exact.
    """
    masked = mask_columns(scaled_logits, columns)
    probs = F.softmax(masked, dim=1)
    log_norm = masked.amax(dim=1, keepdim=True) - probs.amax(dim=1, keepdim=True).log()
    return masked, probs, log_norm


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_j a_ij b_ij per row, (N, 1), without an (N, C) temporary."""
    return torch.linalg.vecdot(a, b, dim=1).unsqueeze(1)


class _PrecomputedGradient(torch.autograd.Function):
    """A loss value whose gradient with respect to the logits was computed together with it."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, value: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gradient)
        return value

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (gradient,) = ctx.saved_tensors
        return gradient * grad_output, None, None


def with_gradient(logits: torch.Tensor, value: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Attach a closed-form gradient (same shape as ``logits``) to a scalar loss ``value``.

    The hot losses (NKD, DKD, USKD) derive their gradient in closed form from the softmaxes the forward pass computes
    anyway: one saved (N, C) tensor and no autograd graph through a dozen (N, C) intermediates. Double backward is
    not supported through these losses.
    """
    return _PrecomputedGradient.apply(logits, value, gradient)


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_i p_i log softmax(logits)_i; torch's fused cross-entropy with soft targets."""
    return F.cross_entropy(logits, target_probs)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_i p_i log p_i, with 0 log 0 = 0."""
    return -torch.special.xlogy(probs, probs).sum(dim=1).mean()


class LossModule(nn.Module):
    """``nn.Module`` wrapper of a loss function: hyper-parameters at construction, tensors at call.

    Subclasses only name the function: ``loss_fn = staticmethod(nkd_loss)``. Hyper-parameters are checked against
    the function's keyword-only parameters, so a typo fails at construction with the valid names.
    """

    loss_fn: Callable[..., torch.Tensor]

    def __init__(self, **hparams) -> None:
        super().__init__()
        signature = inspect.signature(type(self).loss_fn)
        valid = [p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        for key in hparams:
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise TypeError(f"{type(self).__name__}: unknown hyper-parameter {key!r}{hint}; valid: {valid}")
        self.hparams = hparams

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return type(self).loss_fn(*tensors, **self.hparams)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
