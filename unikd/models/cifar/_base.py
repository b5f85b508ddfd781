"""What every CIFAR-zoo model shares: timm's model interface and the conv-bn(-relu) unit.

The zoo models expose the parts of timm's interface that ``unikd.models`` relies on, so one code path serves
timm models and ours: ``forward_features`` (N, 3, H, W) -> (N, D, h, w), ``forward_intermediates`` (stage outputs
from the same single pass), ``forward_head`` (global average pool then ``fc``), ``feature_info`` (the stages, as
timm lists them: module name, channels, stride), ``num_features`` and ``get_classifier``.
"""

from __future__ import annotations

import torch
from torch import nn

from unikd.models._errors import ModelError

# The ``init`` keyword of every zoo model: which reference's initialisation the fresh weights follow.
#   "kaiming"    (default): Kaiming-normal fan-out convs, BatchNorm (1, 0), PyTorch's default Linear; this is
#                mdistiller's / CRD's ResNet initialisation (mdistiller/models/cifar/resnet.py, resnetv2.py).
#   "mdistiller": mdistiller's per family: ResNets as above; WRN also zeroes the classifier bias; VGG and
#                MobileNetV2 draw the classifier from N(0, 0.01) with a zero bias; ShuffleNetV1/V2 keep PyTorch's
#                default init for every layer.
#   "mmpretrain": mmpretrain's ResNet_CIFAR with LinearClsHead (the ResNets only): Kaiming-normal fan-out convs,
#                the last BatchNorm of each residual block zero (weight and bias; zero_init_residual=True) and the
#                classifier from N(0, 0.01) with a zero bias.
CIFAR_INITS = ("kaiming", "mdistiller", "mmpretrain")


def conv_bn(in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1, groups: int = 1, relu: bool = True):
    """Conv (no bias, 'same' padding) -> BatchNorm [-> ReLU]."""
    layers = [
        nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding=kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_chs),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def stage_info(module: str, num_chs: int, reduction: int) -> dict:
    """One ``feature_info`` entry in timm's format."""
    return {"module": module, "num_chs": num_chs, "reduction": reduction}


class CifarNet(nn.Module):
    """Base class: subclasses build the trunk as a chain of modules, name them in order in ``trunk``, list their
    stages in ``feature_info`` and call ``_init_head``."""

    trunk: tuple[str, ...]
    feature_info: list[dict]
    num_features: int
    # mdistiller's initialisation of this family: (convs "kaiming" | "torch", classifier "torch" | "zero_bias" |
    # "normal"), or None where mdistiller has no such model.
    mdistiller_init: tuple[str, str] | None = ("kaiming", "torch")

    def _init_head(self, num_features: int, num_classes: int, init: str = "kaiming") -> None:
        self.num_features = num_features
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc = nn.Linear(num_features, num_classes)
        self._init_weights(init)

    def _init_weights(self, init: str) -> None:
        """Initialise as ``init`` says (see ``CIFAR_INITS``)."""
        if init not in CIFAR_INITS:
            raise ModelError(f"init={init!r} is not one of {', '.join(CIFAR_INITS)}")
        if init == "mmpretrain":
            raise ModelError(
                f"init='mmpretrain' follows mmpretrain's ResNet_CIFAR, which has no {type(self).__name__}; "
                "use init='kaiming' or 'mdistiller'"
            )
        if init == "mdistiller" and self.mdistiller_init is None:
            raise ModelError(f"init='mdistiller': mdistiller has no {type(self).__name__}; use init='kaiming'")
        conv_init, classifier_init = self.mdistiller_init if init == "mdistiller" else ("kaiming", "torch")
        self._init_trunk(conv_init, classifier_init)

    def _init_trunk(self, conv_init: str, classifier_init: str) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and conv_init == "kaiming":
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if classifier_init == "normal":
            nn.init.normal_(self.fc.weight, 0.0, 0.01)
        if classifier_init in ("normal", "zero_bias"):
            nn.init.zeros_(self.fc.bias)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> last feature map (N, num_features, h, w)."""
        return self.forward_intermediates(images, indices=[])[0]

    def forward_intermediates(
        self, images: torch.Tensor, indices: list[int] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's interface: (last feature map, the NCHW outputs of the stages ``indices`` into ``feature_info``, in
        stage order; all stages when None)."""
        if indices is None:
            indices = range(len(self.feature_info))
        wanted = {self.feature_info[i]["module"] for i in indices}
        intermediates = []
        x = images
        for name in self.trunk:
            x = self.get_submodule(name)(x)
            if name in wanted:
                intermediates.append(x)
        return x, intermediates

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(N, num_features, h, w) -> logits (N, num_classes), or the pooled features (N, num_features)."""
        pooled = self.global_pool(features)
        return pooled if pre_logits else self.fc(pooled)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> logits (N, num_classes)."""
        return self.forward_head(self.forward_features(images))
