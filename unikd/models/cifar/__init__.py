"""The CIFAR-100 knowledge-distillation benchmark zoo (CRD, Tian et al. 2020; DKD, Zhao et al. 2022), written in
this project's style, plus ``smallcnn`` for 28x28 Fashion-MNIST. Every model takes ``num_classes`` and
``in_chans`` (default 3; 1 for MNIST-like data) and ``init`` (``CIFAR_INITS``: whose initialisation to follow), and
accepts any input size (global average pooling)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from unikd.models.cifar._base import CIFAR_INITS, CifarNet
from unikd.models.cifar.mobilenetv2 import MobileNetV2
from unikd.models.cifar.resnet import BasicBlock, Bottleneck, cifar_resnet, imagenet_style_resnet
from unikd.models.cifar.shufflenet import ShuffleNetV1, ShuffleNetV2
from unikd.models.cifar.smallcnn import SmallCNN
from unikd.models.cifar.vgg import VGG, VGG_STAGE_WIDTHS
from unikd.models.cifar.wrn import WideResNet

_RESNET_WIDTHS = (16, 16, 32, 64)
_RESNET_X4_WIDTHS = (32, 64, 128, 256)

CIFAR_MODELS: dict[str, Callable[..., CifarNet]] = {
    **{f"resnet{depth}": partial(cifar_resnet, depth, _RESNET_WIDTHS) for depth in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": partial(cifar_resnet, 8, _RESNET_X4_WIDTHS),
    "resnet32x4": partial(cifar_resnet, 32, _RESNET_X4_WIDTHS),
    "wrn_16_2": partial(WideResNet, 16, 2),
    "wrn_40_1": partial(WideResNet, 40, 1),
    "wrn_40_2": partial(WideResNet, 40, 2),
    **{name: partial(VGG, widths) for name, widths in VGG_STAGE_WIDTHS.items()},
    "mobilenetv2": MobileNetV2,
    "shufflenetv1": ShuffleNetV1,
    "shufflenetv2": ShuffleNetV2,
    "resnet18": partial(imagenet_style_resnet, BasicBlock, (2, 2, 2, 2)),
    "resnet34": partial(imagenet_style_resnet, BasicBlock, (3, 4, 6, 3)),
    "resnet50": partial(imagenet_style_resnet, Bottleneck, (3, 4, 6, 3)),
    "smallcnn": SmallCNN,
}

__all__ = ["CIFAR_INITS", "CIFAR_MODELS", "CifarNet"]
