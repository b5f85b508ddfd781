"""ShuffleNetV1 (Zhang et al., 2018; g=3) and ShuffleNetV2 1.0x (Ma et al., 2018) in the CIFAR-100 KD benchmark's
variant: a 1x1 stem without stride or max-pool, so a 32x32 input reaches the last stage at 4x4."""

from __future__ import annotations

import torch
from torch import nn

from unikd.models.cifar._base import CifarNet, conv_bn, stage_info

_STEM_WIDTH = 24


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, C, H, W) -> same shape, channels interleaved across ``groups``."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleV1Block(nn.Module):
    """Grouped 1x1 -> shuffle -> 3x3 depthwise -> grouped 1x1; stride 2 concatenates an avg-pooled shortcut."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, groups: int) -> None:
        super().__init__()
        branch_chs = out_chs - in_chs if stride == 2 else out_chs
        mid_chs = branch_chs // 4
        # The stem has too few channels to group (paper, Sec. 3.3), so the first 1x1 conv after it is dense.
        self.shuffle_groups = 1 if in_chs == _STEM_WIDTH else groups
        self.conv1 = conv_bn(in_chs, mid_chs, kernel_size=1, groups=self.shuffle_groups)
        # The benchmark's implementation applies ReLU after the depthwise conv; kept to match its results.
        self.conv2 = conv_bn(mid_chs, mid_chs, stride=stride, groups=mid_chs)
        self.conv3 = conv_bn(mid_chs, branch_chs, kernel_size=1, groups=groups, relu=False)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()
        self.concat = stride == 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(self.conv2(channel_shuffle(self.conv1(x), self.shuffle_groups)))
        shortcut = self.shortcut(x)
        return torch.relu(torch.cat([out, shortcut], dim=1) if self.concat else out + shortcut)


class ShuffleV2Block(nn.Module):
    """Stride 1: split channels in half, transform one half (1x1 -> 3x3 dw -> 1x1), concat, shuffle.
    Stride 2: transform the whole input in two branches (3x3 dw -> 1x1 | 1x1 -> 3x3 dw -> 1x1), concat, shuffle."""

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        half = out_chs // 2
        self.stride = stride
        if stride == 2:  # registered first: the benchmark's state_dict lists this (its "left") branch first
            self.shortcut_branch = nn.Sequential(
                conv_bn(in_chs, in_chs, stride=2, groups=in_chs, relu=False),
                conv_bn(in_chs, half, kernel_size=1),
            )
        branch_in = in_chs if stride == 2 else half
        self.branch = nn.Sequential(
            conv_bn(branch_in, half, kernel_size=1),
            conv_bn(half, half, stride=stride, groups=half, relu=False),
            conv_bn(half, half, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            out = torch.cat([self.shortcut_branch(x), self.branch(x)], dim=1)
        else:
            kept, transformed = x.chunk(2, dim=1)
            out = torch.cat([kept, self.branch(transformed)], dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV1(CifarNet):
    """Stem -> ``layer1..3`` (4, 8, 4 blocks; widths 240, 480, 960 for g=3) -> pool -> fc."""

    mdistiller_init = ("torch", "torch")  # mdistiller leaves PyTorch's default init

    def __init__(self, groups: int = 3, num_classes: int = 100, in_chans: int = 3, init: str = "kaiming") -> None:
        super().__init__()
        self.stem = conv_bn(in_chans, _STEM_WIDTH, kernel_size=1)
        self.feature_info = [stage_info("stem", _STEM_WIDTH, 1)]
        in_chs = _STEM_WIDTH
        for index, (out_chs, num_blocks) in enumerate(zip((240, 480, 960), (4, 8, 4))):
            blocks = []
            for block_index in range(num_blocks):
                blocks.append(ShuffleV1Block(in_chs, out_chs, 2 if block_index == 0 else 1, groups))
                in_chs = out_chs
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
            self.feature_info.append(stage_info(f"layer{index + 1}", out_chs, 2 ** (index + 1)))
        self.trunk = ("stem", "layer1", "layer2", "layer3")
        self._init_head(in_chs, num_classes, init)


class ShuffleNetV2(CifarNet):
    """Stem -> ``layer1..3`` (a stride-2 block then 3, 7, 3 blocks; widths 116, 232, 464) -> 1x1 ``conv_head``
    to 1024 -> pool -> fc."""

    mdistiller_init = ("torch", "torch")  # mdistiller leaves PyTorch's default init

    def __init__(self, num_classes: int = 100, in_chans: int = 3, init: str = "kaiming") -> None:
        super().__init__()
        self.stem = conv_bn(in_chans, _STEM_WIDTH, kernel_size=1)
        self.feature_info = [stage_info("stem", _STEM_WIDTH, 1)]
        in_chs = _STEM_WIDTH
        for index, (out_chs, num_blocks) in enumerate(zip((116, 232, 464), (3, 7, 3))):
            blocks = [ShuffleV2Block(in_chs, out_chs, stride=2)]
            blocks += [ShuffleV2Block(out_chs, out_chs, stride=1) for _ in range(num_blocks)]
            in_chs = out_chs
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
            self.feature_info.append(stage_info(f"layer{index + 1}", out_chs, 2 ** (index + 1)))
        self.conv_head = conv_bn(in_chs, 1024, kernel_size=1)
        self.trunk = ("stem", "layer1", "layer2", "layer3", "conv_head")
        self._init_head(1024, num_classes, init)
