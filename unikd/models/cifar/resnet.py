"""ResNets for 32x32 inputs, as in the CIFAR-100 KD benchmark (CRD, DKD).

Two families share the blocks: the 3-stage CIFAR ResNets of He et al. (2016, Sec. 4.2; depth 6n+2: resnet8..110,
and the 4x-wide resnet8x4/resnet32x4 of CRD) and the 4-stage ImageNet ResNet18/34/50 with a 3x3 stride-1 stem
and no max-pool, so that a 32x32 input reaches the last stage at 4x4.
"""

from __future__ import annotations

import torch
from torch import nn

from unikd.models.cifar._base import CifarNet, conv_bn, stage_info


def _shortcut(in_chs: int, out_chs: int, stride: int) -> nn.Module:
    if stride == 1 and in_chs == out_chs:
        return nn.Identity()
    return conv_bn(in_chs, out_chs, kernel_size=1, stride=stride, relu=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_chs: int, chs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn(in_chs, chs, stride=stride)
        self.conv2 = conv_bn(chs, chs, relu=False)
        self.shortcut = _shortcut(in_chs, chs, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_chs: int, chs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn(in_chs, chs, kernel_size=1)
        self.conv2 = conv_bn(chs, chs, stride=stride)
        self.conv3 = conv_bn(chs, chs * self.expansion, kernel_size=1, relu=False)
        self.shortcut = _shortcut(in_chs, chs * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv3(self.conv2(self.conv1(x))) + self.shortcut(x))


class ResNet(CifarNet):
    """Stem (3x3 conv-bn-relu) -> stages ``layer1..layerK`` (the first at stride 1, then stride 2) -> pool -> fc.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        depths: blocks per stage.
        widths: per-stage width (bottleneck width for ``Bottleneck``; its output is ``expansion`` times wider).
        stem_width: channels of the stem conv.
        init: "kaiming" (default), "mdistiller" (the same for ResNets) or "mmpretrain" (``CIFAR_INITS``).
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        depths: tuple[int, ...],
        widths: tuple[int, ...],
        stem_width: int,
        num_classes: int = 100,
        in_chans: int = 3,
        init: str = "kaiming",
    ) -> None:
        super().__init__()
        self.stem = conv_bn(in_chans, stem_width)
        self.feature_info = [stage_info("stem", stem_width, 1)]
        in_chs = stem_width
        for index, (depth, width) in enumerate(zip(depths, widths)):
            first_stride = 1 if index == 0 else 2
            blocks = []
            for block_index in range(depth):
                blocks.append(block(in_chs, width, first_stride if block_index == 0 else 1))
                in_chs = width * block.expansion
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
            self.feature_info.append(stage_info(f"layer{index + 1}", in_chs, 2**index))
        self.trunk = tuple(stage["module"] for stage in self.feature_info)
        self._init_head(in_chs, num_classes, init)

    def _init_weights(self, init: str) -> None:
        if init != "mmpretrain":
            return super()._init_weights(init)
        self._init_trunk("kaiming", "normal")
        for block in self.modules():  # zero_init_residual: each residual branch starts at zero
            if isinstance(block, (BasicBlock, Bottleneck)):
                last_norm = (block.conv3 if isinstance(block, Bottleneck) else block.conv2)[1]
                nn.init.zeros_(last_norm.weight)
                nn.init.zeros_(last_norm.bias)


def cifar_resnet(depth: int, widths: tuple[int, int, int, int], **kwargs) -> ResNet:
    """A 3-stage CIFAR ResNet of depth 6n+2; ``widths`` = (stem, stage1, stage2, stage3)."""
    blocks_per_stage = (depth - 2) // 6
    return ResNet(BasicBlock, (blocks_per_stage,) * 3, widths[1:], stem_width=widths[0], **kwargs)


def imagenet_style_resnet(block: type[BasicBlock | Bottleneck], depths: tuple[int, ...], **kwargs) -> ResNet:
    """ResNet18/34/50 layout (widths 64..512) with a CIFAR stem."""
    return ResNet(block, depths, (64, 128, 256, 512), stem_width=64, **kwargs)
