"""The CIFAR-100 KD zoo as CRD and mdistiller name it: model names and state_dict key names.

Our ``cifar/`` models compute exactly what mdistiller's (megvii-research/mdistiller, ``mdistiller/models/cifar``;
the same zoo as CRD's HobbitLong/RepDistiller) compute at 32x32; only the parameter names differ, plus one thing in
VGG: mdistiller's VGG convs carry a bias in front of each BatchNorm, ours do not. We fold that bias into the
BatchNorm's running mean, which is exact in both modes:

- eval: ``BN(conv(x) + b)`` normalises with ``(conv(x) + b - running_mean)``, so ``running_mean - b`` with no bias
  gives the same output;
- train: BatchNorm subtracts the batch mean, which contains ``b``, so the output never depended on ``b``, and the
  running-mean update ``(1 - m) * rm + m * (batch_mean + b)`` keeps the folded ``rm - b`` in step.

(``to_mdistiller`` writes zero biases, so our -> mdistiller -> ours is the identity, and mdistiller -> ours ->
mdistiller moves each bias into its running mean.) Where the two zoos differ away from 32x32 inputs: mdistiller pools
with a fixed kernel (8 or 4) and its VGG adds a fourth max-pool for 64x64 inputs; ours pools globally.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

import torch

# mdistiller's cifar_model_dict names (and the factory names of its VGG / MobileNetV2) -> our cifar/ architecture.
MDISTILLER_MODELS: dict[str, str] = {
    **{f"resnet{depth}": f"resnet{depth}" for depth in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": "resnet8x4",
    "resnet32x4": "resnet32x4",
    "ResNet18": "resnet18",
    "ResNet34": "resnet34",
    "ResNet50": "resnet50",
    "wrn_16_2": "wrn_16_2",
    "wrn_40_1": "wrn_40_1",
    "wrn_40_2": "wrn_40_2",
    **{f"vgg{depth}": f"vgg{depth}" for depth in (8, 11, 13, 16, 19)},
    **{f"vgg{depth}_bn": f"vgg{depth}" for depth in (8, 11, 13, 16, 19)},
    "MobileNetV2": "mobilenetv2",
    "mobile_half": "mobilenetv2",
    "ShuffleV1": "shufflenetv1",
    "ShuffleV2": "shufflenetv2",
}

Rule = tuple[str, str | Callable[[re.Match], str]]


def _vgg_index(match: re.Match) -> str:
    """Our ``layer{s}.{i}.{0 conv | 1 bn}`` -> mdistiller's ``block{s-1}.{3 * unit + part}``: their stage is a flat
    (conv, bn, relu)* list, ours opens stages 2-4 with a max-pool at index 0."""
    stage, index, part = (int(group) for group in match.groups())
    unit = index - (1 if stage in (2, 3, 4) else 0)
    return f"block{stage - 1}.{3 * unit + part}."


def _shufflev2_unit(match: re.Match) -> str:
    """Our ShuffleV2 blocks -> mdistiller's: the stride-2 block (index 0) is their DownBlock, whose left branch
    (conv1, conv2) is our ``shortcut_branch`` and whose right branch (conv3..5) is our ``branch``."""
    prefix, branch, unit, part = match.groups()
    offset = 3 if branch == "branch" and prefix.endswith(".0") else 1
    return f"{prefix}.{'bn' if part == '1' else 'conv'}{int(unit) + offset}."


_STEM = (r"^stem\.0\.", "conv1."), (r"^stem\.1\.", "bn1.")
_BLOCK_CONVS = (r"^(layer\d\.\d+)\.conv(\d)\.0\.", r"\1.conv\2."), (r"^(layer\d\.\d+)\.conv(\d)\.1\.", r"\1.bn\2.")
_FAMILY_RULES: dict[str, tuple[Rule, ...]] = {
    "cifar_resnet": (*_STEM, *_BLOCK_CONVS, (r"^(layer\d\.\d+)\.shortcut\.", r"\1.downsample."), (r"^fc\.", "fc.")),
    "resnet": (*_STEM, *_BLOCK_CONVS, (r"^(layer\d\.\d+)\.shortcut\.", r"\1.shortcut."), (r"^fc\.", "linear.")),
    "wrn": (
        (r"^stem\.", "conv1."),
        (r"^layer(\d)\.(\d+)\.shortcut\.", r"block\1.layer.\2.convShortcut."),
        (r"^layer(\d)\.(\d+)\.", r"block\1.layer.\2."),
        (r"^norm\.0\.", "bn1."),
        (r"^fc\.", "fc."),
    ),
    "vgg": ((r"^layer(\d)\.(\d+)\.([01])\.", _vgg_index), (r"^fc\.", "classifier.")),
    "mobilenetv2": (
        (r"^stem\.([01])\.", r"conv1.\1."),
        (r"^(blocks\.\d\.\d+\.conv)\.([012])\.([01])\.", lambda m: f"{m[1]}.{3 * int(m[2]) + int(m[3])}."),
        (r"^conv_head\.([01])\.", r"conv2.\1."),
        (r"^fc\.", "classifier.0."),
    ),
    "shufflenetv1": (*_STEM, *_BLOCK_CONVS, (r"^fc\.", "linear.")),
    "shufflenetv2": (
        *_STEM,
        (r"^(layer\d\.\d+)\.(shortcut_branch|branch)\.(\d)\.([01])\.", _shufflev2_unit),
        (r"^conv_head\.0\.", "conv2."),
        (r"^conv_head\.1\.", "bn2."),
        (r"^fc\.", "linear."),
    ),
}


def _family(arch: str) -> str | None:
    if arch in ("resnet18", "resnet34", "resnet50"):
        return "resnet"
    if re.fullmatch(r"resnet\d+(x4)?", arch):
        return "cifar_resnet"
    if arch.startswith("wrn_"):
        return "wrn"
    if arch.startswith("vgg"):
        return "vgg"
    return arch if arch in _FAMILY_RULES else None


def has_mdistiller_layout(arch: str) -> bool:
    """Whether ``cifar/<arch>`` has an mdistiller counterpart (every zoo model but ``smallcnn``)."""
    return _family(arch) is not None


def _rename(key: str, rules: tuple[Rule, ...]) -> str:
    for pattern, replacement in rules:
        renamed, count = re.subn(pattern, replacement, key, count=1)
        if count:
            return renamed
    raise KeyError(key)  # every key of our models matches a rule (tested over the whole zoo)


@functools.cache
def key_map(arch: str) -> dict[str, str]:
    """{our key: mdistiller key} for ``cifar/<arch>``, in our state_dict order (built on the meta device: no weights
    are allocated)."""
    from unikd.models.cifar import CIFAR_MODELS

    with torch.device("meta"):
        keys = list(CIFAR_MODELS[arch](num_classes=1).state_dict())
    rules = _FAMILY_RULES[_family(arch)]
    return {key: _rename(key, rules) for key in keys}


def _vgg_conv_bias_keys(arch: str) -> dict[str, str]:
    """{mdistiller conv bias key: mdistiller running-mean key of the BatchNorm right after it} for a VGG."""
    pairs = {}
    for their_key in key_map(arch).values():
        match = re.fullmatch(r"(block\d)\.(\d+)\.running_mean", their_key)
        if match:
            pairs[f"{match[1]}.{int(match[2]) - 1}.bias"] = their_key
    return pairs


def from_mdistiller(state_dict: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """An mdistiller / CRD state_dict of ``arch`` in our key names (VGG conv biases folded, see module docstring).

    Keys that are not mdistiller's names for ``arch`` are kept as they are, so that loading reports them.
    """
    ours_by_theirs = {their: ours for ours, their in key_map(arch).items()}
    state_dict = dict(state_dict)
    if _family(arch) == "vgg":
        for bias_key, mean_key in _vgg_conv_bias_keys(arch).items():
            if bias_key in state_dict and mean_key in state_dict:
                bias = state_dict.pop(bias_key)
                state_dict[mean_key] = state_dict[mean_key] - bias.to(state_dict[mean_key].dtype)
    return {ours_by_theirs.get(key, key): value for key, value in state_dict.items()}


def to_mdistiller(state_dict: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """Our state_dict of ``cifar/<arch>`` in mdistiller's key names and order (VGG: zero conv biases added), so that
    it loads with ``strict=True`` into mdistiller's model."""
    theirs = {}
    bias_keys = _vgg_conv_bias_keys(arch) if _family(arch) == "vgg" else {}
    conv_of_bias = {bias_key.rsplit(".", 1)[0] + ".weight": bias_key for bias_key in bias_keys}
    for ours, their_key in key_map(arch).items():
        theirs[their_key] = state_dict[ours]
        if their_key in conv_of_bias:
            weight = state_dict[ours]
            theirs[conv_of_bias[their_key]] = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    return theirs
