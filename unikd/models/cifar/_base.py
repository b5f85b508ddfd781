"""What every CIFAR-zoo model shares: timm's model interface and the conv-bn(-relu) unit.

The zoo models expose the parts of timm's interface that ``unikd.models`` relies on, so one code path serves
timm models and ours: ``forward_features`` (N, 3, H, W) -> (N, D, h, w), ``forward_intermediates`` (stage outputs
from the same single pass), ``forward_head`` (global average pool then ``fc``), ``feature_info`` (the stages, as
timm lists them: module name, channels, stride), ``num_features`` and ``get_classifier``.
"""

from __future__ import annotations

import torch
from torch import nn


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

    def _init_head(self, num_features: int, num_classes: int) -> None:
        self.num_features = num_features
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc = nn.Linear(num_features, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

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
