"""What mdistiller's CIFAR models compute, evaluated straight from a state_dict in mdistiller's key names.

An independent statement of the forward passes of megvii-research/mdistiller ``mdistiller/models/cifar``
(resnet.py, resnetv2.py, wrn.py, vgg.py, mobilenetv2.py, ShuffleNetv1.py, ShuffleNetv2.py) at 32x32, written here
with ``torch.nn.functional`` from reading those files, so that tests compare our models against the reference
layout's own arithmetic: a swapped pair of same-shaped tensors, a dropped conv bias or a misplaced ReLU in the key
mapping changes these logits. BatchNorm runs in eval mode unless ``train=True`` (then, like nn.BatchNorm2d, it
updates the running statistics in ``state_dict`` in place).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Weights = dict[str, torch.Tensor]


class _Net:
    def __init__(self, weights: Weights, train: bool) -> None:
        self.weights, self.train = weights, train

    def has(self, prefix: str) -> bool:
        return f"{prefix}.weight" in self.weights

    def conv(self, x: torch.Tensor, name: str, stride: int = 1) -> torch.Tensor:
        weight = self.weights[f"{name}.weight"]
        groups = x.shape[1] // weight.shape[1]  # depthwise and grouped convs: in_channels / weight's in-depth
        padding = weight.shape[-1] // 2
        return F.conv2d(x, weight, self.weights.get(f"{name}.bias"), stride, padding, groups=groups)

    def bn(self, x: torch.Tensor, name: str) -> torch.Tensor:
        w = self.weights
        return F.batch_norm(
            x, w[f"{name}.running_mean"], w[f"{name}.running_var"], w[f"{name}.weight"], w[f"{name}.bias"],
            training=self.train, momentum=0.1, eps=1e-5,
        )  # fmt: skip

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(
            F.adaptive_avg_pool2d(x, 1).flatten(1), self.weights[f"{name}.weight"], self.weights[f"{name}.bias"]
        )


def _shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


def _blocks(net: _Net, stage: str):
    index = 0
    while any(key.startswith(f"{stage}.{index}.") for key in net.weights):
        yield index, f"{stage}.{index}"
        index += 1


def cifar_resnet(net: _Net, x: torch.Tensor) -> torch.Tensor:  # resnet.py: resnet8..110, resnet8x4, resnet32x4
    x = F.relu(net.bn(net.conv(x, "conv1"), "bn1"))
    for stage in (1, 2, 3):
        for index, p in _blocks(net, f"layer{stage}"):
            stride = 2 if stage > 1 and index == 0 else 1
            out = net.bn(
                net.conv(F.relu(net.bn(net.conv(x, f"{p}.conv1", stride), f"{p}.bn1")), f"{p}.conv2"), f"{p}.bn2"
            )
            res = (
                net.bn(net.conv(x, f"{p}.downsample.0", stride), f"{p}.downsample.1")
                if net.has(f"{p}.downsample.0")
                else x
            )
            x = F.relu(out + res)
    return net.linear(x, "fc")


def resnet_v2(net: _Net, x: torch.Tensor) -> torch.Tensor:  # resnetv2.py: ResNet18/34/50 (stride on the 3x3 conv)
    x = F.relu(net.bn(net.conv(x, "conv1"), "bn1"))
    for stage in (1, 2, 3, 4):
        for index, p in _blocks(net, f"layer{stage}"):
            stride = 2 if stage > 1 and index == 0 else 1
            if net.has(f"{p}.conv3"):
                out = F.relu(net.bn(net.conv(x, f"{p}.conv1"), f"{p}.bn1"))
                out = F.relu(net.bn(net.conv(out, f"{p}.conv2", stride), f"{p}.bn2"))
                out = net.bn(net.conv(out, f"{p}.conv3"), f"{p}.bn3")
            else:
                out = F.relu(net.bn(net.conv(x, f"{p}.conv1", stride), f"{p}.bn1"))
                out = net.bn(net.conv(out, f"{p}.conv2"), f"{p}.bn2")
            res = net.bn(net.conv(x, f"{p}.shortcut.0", stride), f"{p}.shortcut.1") if net.has(f"{p}.shortcut.0") else x
            x = F.relu(out + res)
    return net.linear(x, "linear")


def wrn(net: _Net, x: torch.Tensor) -> torch.Tensor:  # wrn.py: pre-activation; the shortcut reads the activated input
    x = net.conv(x, "conv1")
    for stage in (1, 2, 3):
        for index, p in _blocks(net, f"block{stage}.layer"):
            stride = 2 if stage > 1 and index == 0 else 1
            activated = F.relu(net.bn(x, f"{p}.bn1"))
            out = net.conv(F.relu(net.bn(net.conv(activated, f"{p}.conv1", stride), f"{p}.bn2")), f"{p}.conv2")
            x = (net.conv(activated, f"{p}.convShortcut", stride) if net.has(f"{p}.convShortcut") else x) + out
    return net.linear(F.relu(net.bn(x, "bn1")), "fc")


def vgg(net: _Net, x: torch.Tensor) -> torch.Tensor:  # vgg.py (batch_norm=True): conv(+bias)-bn-relu; pools after 0-2
    for stage in range(5):
        unit = 0
        while net.has(f"block{stage}.{3 * unit}"):
            x = F.relu(net.bn(net.conv(x, f"block{stage}.{3 * unit}"), f"block{stage}.{3 * unit + 1}"))
            unit += 1
        if stage < 3:  # pool3 only runs for 64x64 inputs
            x = F.max_pool2d(x, 2)
    return net.linear(x, "classifier")


def mobilenetv2(net: _Net, x: torch.Tensor) -> torch.Tensor:  # mobilenetv2.py (mobile_half: T=6, width 0.5)
    x = F.relu(net.bn(net.conv(x, "conv1.0", 2), "conv1.1"))
    for stage, first_stride in enumerate((1, 1, 2, 2, 1, 2, 1)):
        for index, p in _blocks(net, f"blocks.{stage}"):
            stride = first_stride if index == 0 else 1
            out = F.relu(net.bn(net.conv(x, f"{p}.conv.0"), f"{p}.conv.1"))
            out = F.relu(net.bn(net.conv(out, f"{p}.conv.3", stride), f"{p}.conv.4"))
            out = net.bn(net.conv(out, f"{p}.conv.6"), f"{p}.conv.7")
            x = x + out if stride == 1 and x.shape == out.shape else out
    x = F.relu(net.bn(net.conv(x, "conv2.0"), "conv2.1"))
    return net.linear(x, "classifier.0")


def shufflenet_v1(net: _Net, x: torch.Tensor) -> torch.Tensor:  # ShuffleNetv1.py (g=3)
    x = F.relu(net.bn(net.conv(x, "conv1"), "bn1"))
    for stage in (1, 2, 3):
        for index, p in _blocks(net, f"layer{stage}"):
            stride = 2 if index == 0 else 1
            groups = x.shape[1] // net.weights[f"{p}.conv1.weight"].shape[1]
            out = _shuffle(F.relu(net.bn(net.conv(x, f"{p}.conv1"), f"{p}.bn1")), groups)
            out = F.relu(net.bn(net.conv(out, f"{p}.conv2", stride), f"{p}.bn2"))
            out = net.bn(net.conv(out, f"{p}.conv3"), f"{p}.bn3")
            x = F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1) if stride == 2 else out + x)
    return net.linear(x, "linear")


def shufflenet_v2(net: _Net, x: torch.Tensor) -> torch.Tensor:  # ShuffleNetv2.py (net_size 1)
    x = F.relu(net.bn(net.conv(x, "conv1"), "bn1"))
    for stage in (1, 2, 3):
        for index, p in _blocks(net, f"layer{stage}"):
            if index == 0:  # DownBlock: left = dw3x3/2 -> 1x1, right = 1x1 -> dw3x3/2 -> 1x1
                left = F.relu(
                    net.bn(net.conv(net.bn(net.conv(x, f"{p}.conv1", 2), f"{p}.bn1"), f"{p}.conv2"), f"{p}.bn2")
                )
                right = F.relu(net.bn(net.conv(x, f"{p}.conv3"), f"{p}.bn3"))
                right = net.bn(net.conv(right, f"{p}.conv4", 2), f"{p}.bn4")
                right = F.relu(net.bn(net.conv(right, f"{p}.conv5"), f"{p}.bn5"))
                x = _shuffle(torch.cat([left, right], 1), 2)
            else:  # BasicBlock: keep the first half, transform the second
                kept, out = x.chunk(2, dim=1)
                out = F.relu(net.bn(net.conv(out, f"{p}.conv1"), f"{p}.bn1"))
                out = net.bn(net.conv(out, f"{p}.conv2"), f"{p}.bn2")
                out = F.relu(net.bn(net.conv(out, f"{p}.conv3"), f"{p}.bn3"))
                x = _shuffle(torch.cat([kept, out], 1), 2)
    x = F.relu(net.bn(net.conv(x, "conv2"), "bn2"))
    return net.linear(x, "linear")


FORWARD = {
    **{name: cifar_resnet for name in ("resnet20", "resnet32", "resnet56", "resnet110", "resnet8x4", "resnet32x4")},
    "ResNet50": resnet_v2,
    **{name: wrn for name in ("wrn_16_2", "wrn_40_1", "wrn_40_2")},
    "vgg8": vgg,
    "vgg13": vgg,
    "MobileNetV2": mobilenetv2,
    "ShuffleV1": shufflenet_v1,
    "ShuffleV2": shufflenet_v2,
}


def mdistiller_logits(name: str, weights: Weights, images: torch.Tensor, *, train: bool = False) -> torch.Tensor:
    """(N, 3, 32, 32) -> (N, num_classes): mdistiller's model ``name`` (a cifar_model_dict key) with ``weights``."""
    return FORWARD[name](_Net(weights, train), images)
