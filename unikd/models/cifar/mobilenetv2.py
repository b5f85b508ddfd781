"""MobileNetV2 (Sandler et al., 2018) as used in the CIFAR-100 KD benchmark: width 0.5, expansion 6.

The benchmark variant keeps ImageNet's strides except in the second stage (stride 1), so a 32x32 input ends at
2x2; its first block keeps the 1x1 expansion conv even though its expansion ratio is 1.
"""

from __future__ import annotations

import torch
from torch import nn

from unikd.models.cifar._base import CifarNet, conv_bn, stage_info

# (expansion ratio, output channels at width 1.0, blocks, stride of the first block)
_STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection, with a residual when the shape is kept."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_chs * expand_ratio
        self.conv = nn.Sequential(
            conv_bn(in_chs, hidden, kernel_size=1),
            conv_bn(hidden, hidden, stride=stride, groups=hidden),
            conv_bn(hidden, out_chs, kernel_size=1, relu=False),
        )
        self.use_residual = stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(CifarNet):
    """Stem (stride 2) -> ``blocks.0..6`` -> 1x1 ``conv_head`` to 1280 -> pool -> fc."""

    mdistiller_init = ("kaiming", "normal")

    def __init__(
        self, width_mult: float = 0.5, num_classes: int = 100, in_chans: int = 3, init: str = "kaiming"
    ) -> None:
        super().__init__()
        in_chs = int(32 * width_mult)
        self.stem = conv_bn(in_chans, in_chs, stride=2)
        stages, reduction, self.feature_info = [], 2, []
        for index, (expand_ratio, chs, num_blocks, stride) in enumerate(_STAGES):
            out_chs = int(chs * width_mult)
            blocks = []
            for block_index in range(num_blocks):
                blocks.append(InvertedResidual(in_chs, out_chs, stride if block_index == 0 else 1, expand_ratio))
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
            reduction *= stride
            if index in (1, 2, 4, 6):  # the last stage at each resolution
                self.feature_info.append(stage_info(f"blocks.{index}", out_chs, reduction))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = conv_bn(in_chs, 1280, kernel_size=1)
        self.trunk = ("stem", *(f"blocks.{i}" for i in range(len(_STAGES))), "conv_head")
        self._init_head(1280, num_classes, init)
