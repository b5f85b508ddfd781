"""Wide ResNets (Zagoruyko & Komodakis, 2016): depth 6n+4, widths (16, 16k, 32k, 64k), pre-activation blocks."""

from __future__ import annotations

import torch
from torch import nn

from unikd.models.cifar._base import CifarNet, stage_info


def _conv3x3(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, 3, stride, padding=1, bias=False)


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice; a width change projects the *activated* input with a 1x1 conv."""

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv1 = _conv3x3(in_chs, out_chs, stride)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.conv2 = _conv3x3(out_chs, out_chs)
        self.shortcut = None if in_chs == out_chs else nn.Conv2d(in_chs, out_chs, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = torch.relu(self.bn1(x))
        out = self.conv2(torch.relu(self.bn2(self.conv1(activated))))
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(CifarNet):
    """WRN-depth-k: stem conv -> ``layer1..3`` (strides 1, 2, 2) -> BN-ReLU (``norm``) -> pool -> fc."""

    mdistiller_init = ("kaiming", "zero_bias")

    def __init__(
        self, depth: int, widen_factor: int, num_classes: int = 100, in_chans: int = 3, init: str = "kaiming"
    ) -> None:
        super().__init__()
        blocks_per_stage = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.stem = _conv3x3(in_chans, widths[0])
        self.feature_info = [stage_info("stem", widths[0], 1)]
        for index in range(3):
            stride = 1 if index == 0 else 2
            blocks = [
                PreActBlock(widths[index] if i == 0 else widths[index + 1], widths[index + 1], stride if i == 0 else 1)
                for i in range(blocks_per_stage)
            ]
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
            self.feature_info.append(stage_info(f"layer{index + 1}", widths[index + 1], 2**index))
        self.norm = nn.Sequential(nn.BatchNorm2d(widths[3]), nn.ReLU(inplace=True))
        self.trunk = ("stem", "layer1", "layer2", "layer3", "norm")
        self._init_head(widths[3], num_classes, init)
