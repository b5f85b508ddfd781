"""A small CNN for 28x28 Fashion-MNIST-style data (not part of the CIFAR benchmark): three stages of two
conv-bn-relu blocks, widths (w, 2w, 4w), stride-2 downsampling at the start of stages 2 and 3, pool, fc."""

from __future__ import annotations

from torch import nn

from unikd.models.cifar._base import CifarNet, conv_bn, stage_info


class SmallCNN(CifarNet):
    mdistiller_init = None

    def __init__(self, width: int = 16, num_classes: int = 10, in_chans: int = 3, init: str = "kaiming") -> None:
        super().__init__()
        self.feature_info = []
        in_chs = in_chans
        for index in range(3):
            out_chs, stride = width * 2**index, 1 if index == 0 else 2
            self.add_module(
                f"layer{index + 1}", nn.Sequential(conv_bn(in_chs, out_chs, stride=stride), conv_bn(out_chs, out_chs))
            )
            self.feature_info.append(stage_info(f"layer{index + 1}", out_chs, 2**index))
            in_chs = out_chs
        self.trunk = ("layer1", "layer2", "layer3")
        self._init_head(in_chs, num_classes, init)
