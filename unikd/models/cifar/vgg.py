"""VGG with batch norm for 32x32 inputs (the CRD/DKD benchmark variant).

Five stages of 3x3 conv-bn-relu; a 2x2 max-pool opens stages 2-4 only, so a 32x32 input reaches the last two
stages at 4x4; global average pooling and a single linear classifier replace VGG's three FC layers.
"""

from __future__ import annotations

from torch import nn

from unikd.models.cifar._base import CifarNet, conv_bn, stage_info

VGG_STAGE_WIDTHS = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


class VGG(CifarNet):
    mdistiller_init = ("kaiming", "normal")

    def __init__(
        self,
        stage_widths: tuple[tuple[int, ...], ...],
        num_classes: int = 100,
        in_chans: int = 3,
        init: str = "kaiming",
    ) -> None:
        super().__init__()
        self.feature_info = []
        in_chs, reduction = in_chans, 1
        for index, widths in enumerate(stage_widths):
            layers: list[nn.Module] = []
            if index in (1, 2, 3):
                layers.append(nn.MaxPool2d(2))
                reduction *= 2
            for width in widths:
                layers.append(conv_bn(in_chs, width))
                in_chs = width
            self.add_module(f"layer{index + 1}", nn.Sequential(*layers))
            self.feature_info.append(stage_info(f"layer{index + 1}", in_chs, reduction))
        self.trunk = tuple(stage["module"] for stage in self.feature_info)
        self._init_head(in_chs, num_classes, init)
