"""Logits plus an intermediate feature (USKD, Eq. 8) or per-location logits (Zipf's LS), in one forward pass.

No model code is edited and the model is never copied: timm models and the CIFAR zoo give stage outputs through
``forward_intermediates`` (traceable by ``torch.compile`` without graph breaks); every other case (torchvision,
a module name that is not a stage, a model wrapped in DistributedDataParallel, which must run through its wrapper)
taps the module's output with a forward hook that is removed before returning.

Which feature ``layer="mid"`` picks reproduces the released USKD code (yzd-v/cls_KD):
- CNNs: the global-average-pooled output of the penultimate stage (ResNet18 ``layer3`` -> 256, ResNet50 -> 1024,
  RegNetX-1.6GF ``s3`` -> 408, MobileNetV1 stride-16 stage -> 512, Swin-T stage 3 -> 384). Where a 1x1 head conv
  follows the last stage (MobileNetV2's 320 -> 1280, the CIFAR ShuffleNetV2's 464 -> 1024) that conv counts as the
  last stage, so the feature is the last block's output (MobileNetV2 -> 320, as released).
- ViTs: the class token after block ``depth // 2 - 1`` counting from 0 ("block 6 of 12"), before the final norm
  (DeiT-Tiny -> 192), as in cls_KD's ``vision_transformer.py`` (``i == int(0.5 * len(self.layers)) - 1``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from unikd.models._factory import ModelError, did_you_mean

Layer = str | int

# torchvision models carry no feature_info: their stages (module names, shallow to deep; the last one outputs the
# final feature map that is pooled) and the classifier applied to the pooled features.
_TORCHVISION_STAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "ResNet": (("relu", "layer1", "layer2", "layer3", "layer4"), "fc"),
    "ShuffleNetV2": (("conv1", "stage2", "stage3", "stage4", "conv5"), "fc"),
    "MobileNetV2": (
        ("features.1", "features.3", "features.6", "features.13", "features.17", "features.18"),
        "classifier",
    ),
}


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DistributedDataParallel / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _is_vit(model: nn.Module) -> bool:
    return isinstance(model, VisionTransformer)


def _torchvision_entry(model: nn.Module) -> tuple[tuple[str, ...], str] | None:
    """(stage names, classifier name) for a torchvision model in the table, else None."""
    if type(model).__module__.startswith("torchvision."):
        return _TORCHVISION_STAGES.get(type(model).__name__)
    return None


def _stage_names(model: nn.Module) -> list[str]:
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info:
        return [stage["module"] for stage in info]
    entry = _torchvision_entry(model)
    return list(entry[0]) if entry else []


def _mid_stage_index(model: nn.Module, stages: list[str]) -> int:
    if _is_vit(model):
        return len(model.blocks) // 2 - 1
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info:
        # The last listed stage is the final feature map unless a head conv follows it (channel count differs).
        return len(info) - 2 if info[-1]["num_chs"] == getattr(model, "num_features", None) else len(info) - 1
    if stages:  # torchvision: the table ends with the final feature map
        return len(stages) - 2
    raise ModelError(
        f"{type(model).__name__} has no known stages, so layer='mid' is undefined for it; pass layer=<module name> "
        f"(one of model.named_modules(), e.g. {', '.join(_top_level_names(model))})"
    )


def _top_level_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_children()]


@dataclass(frozen=True)
class _Tap:
    """Where the feature comes from: a module's output, and its position among the stages (None if not a stage)."""

    module: str
    stage_index: int | None


def _resolve_layer(model: nn.Module, layer: Layer) -> _Tap:
    stages = _stage_names(model)
    if isinstance(layer, bool) or not isinstance(layer, (str, int)):
        raise ModelError(f"layer must be 'mid', a stage index or a module name, got {layer!r}")
    if layer == "mid":
        index = _mid_stage_index(model, stages)
        return _Tap(stages[index], index)
    if isinstance(layer, int):
        if not -len(stages) <= layer < len(stages):
            listing = ", ".join(f"{i}={name}" for i, name in enumerate(stages)) or "none known"
            raise ModelError(f"stage index {layer} is out of range for {type(model).__name__}; stages: {listing}")
        index = layer % len(stages)
        return _Tap(stages[index], index)
    if layer in stages:
        return _Tap(layer, stages.index(layer))
    module_names = [name for name, _ in model.named_modules() if name]
    if layer in module_names:
        return _Tap(layer, None)
    raise ModelError(
        f"layer {layer!r} is not a module of {type(model).__name__}.{did_you_mean(layer, module_names)} "
        f"Use 'mid', a stage index, or a name from model.named_modules(); stages: {', '.join(stages) or 'none known'}"
    )


@contextlib.contextmanager
def _capture(model: nn.Module, module_name: str, *, module_input: bool = False) -> Iterator[list[torch.Tensor]]:
    """Collect the output (or the first input) of ``model.<module_name>`` while the block runs; hook removed after."""
    captured: list[torch.Tensor] = []
    module = model.get_submodule(module_name)
    if module_input:
        handle = module.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    else:
        handle = module.register_forward_hook(
            lambda _module, _args, output: captured.append(output[0] if isinstance(output, tuple) else output)
        )
    try:
        yield captured
    finally:
        handle.remove()


def _single(captured: list[torch.Tensor], module_name: str) -> torch.Tensor:
    if len(captured) != 1:
        raise ModelError(
            f"module {module_name!r} ran {len(captured)} times in one forward pass; pick a module that runs once"
        )
    return captured[0]


def _pool(feature: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Stage output -> (N, D): mean over space for maps, the class token for ViT token sequences."""
    if feature.ndim == 4:
        channels_last = getattr(model, "output_fmt", "NCHW") == "NHWC"  # timm's Swin keeps NHWC inside
        return feature.mean(dim=(1, 2) if channels_last else (2, 3))
    if feature.ndim == 3:  # (N, tokens, D)
        return feature[:, 0] if getattr(model, "num_prefix_tokens", 0) > 0 else feature.mean(dim=1)
    return feature.flatten(1)


def _locations(feature: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Stage output -> (N, L, D), the locations whose mean is ``_pool``'s feature: a map's h*w positions, a ViT's
    class token alone (L = 1; its pooled feature is that token), the tokens of a model without prefix tokens."""
    if feature.ndim == 4:
        channels_last = getattr(model, "output_fmt", "NCHW") == "NHWC"
        return feature.flatten(1, 2) if channels_last else feature.flatten(2).transpose(1, 2)
    if feature.ndim == 3:
        return feature[:, :1] if getattr(model, "num_prefix_tokens", 0) > 0 else feature
    return feature.flatten(1)[:, None]


def forward_with_feature(
    model: nn.Module, images: torch.Tensor, layer: Layer = "mid", *, pool: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, C) and the pooled intermediate feature (N, D) of USKD Eq. 8, from one forward pass.

    The feature is not detached (USKD's weak loss trains the backbone through it). ``layer`` is ``"mid"`` (the
    released default, see the module docstring), a stage index into the model's stages, or a module name.
    ``pool=False`` returns the feature before pooling, as locations x channels (N, L, D), whose mean over L is the
    pooled feature (a CNN's or Swin's h*w positions; a ViT's class token, L = 1): for a per-location LayerNorm before
    pooling, as mmpretrain's Swin applies to the stage the released weak head reads.
    A model wrapped in DistributedDataParallel runs through the wrapper (hooks) so that gradients stay synced.
    """
    inner = unwrap(model)
    tap = _resolve_layer(inner, layer)
    if inner is model and tap.stage_index is not None and hasattr(inner, "forward_intermediates"):
        extra = {"return_prefix_tokens": True} if _is_vit(inner) else {}
        final, (intermediate,) = inner.forward_intermediates(images, indices=[tap.stage_index], **extra)
        if _is_vit(inner):
            spatial, prefix_tokens = intermediate
            if prefix_tokens.shape[1]:
                feature = prefix_tokens[:, 0] if pool else prefix_tokens[:, :1]
            else:
                feature = spatial.mean(dim=(2, 3)) if pool else spatial.flatten(2).transpose(1, 2)
        else:  # intermediates are NCHW
            feature = intermediate.mean(dim=(2, 3)) if pool else intermediate.flatten(2).transpose(1, 2)
        return inner.forward_head(final), feature
    with _capture(inner, tap.module) as captured:
        logits = model(images)
    feature = _single(captured, tap.module)
    return logits, _pool(feature, inner) if pool else _locations(feature, inner)


def _final_feature_map(model: nn.Module) -> tuple[str, bool]:
    """The module whose input (True) or output (False) is the last feature map, the one the head pools."""
    modules = dict(model.named_modules())
    for name in ("global_pool", "head.global_pool"):  # timm and the CIFAR zoo pool in a module of this name
        if isinstance(modules.get(name), nn.Module):
            return name, True
    entry = _torchvision_entry(model)
    if entry:
        return entry[0][-1], False
    raise ModelError(f"dense logits are not supported for {type(model).__name__}: its pooled feature map is unknown")


def forward_with_dense_logits(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, C) and dense logits (N, L, C): the classifier head applied at each of the L = h*w locations of
    the last feature map (before global pooling), as Zipf's label smoothing needs. One forward pass.

    For a linear head after average pooling, ``dense_logits.mean(1)`` equals ``logits``. ViTs have no spatial
    map of class scores (their head reads the class token), so they raise a ``ModelError``.
    """
    inner = unwrap(model)
    if _is_vit(inner):
        raise ModelError(
            f"dense logits do not apply to {type(inner).__name__}: a ViT classifies its class token and has no "
            "spatial feature map of class scores; Zipf's label smoothing needs a CNN (or Swin) student"
        )
    timm_style = hasattr(inner, "forward_features") and hasattr(inner, "forward_head")  # timm and the CIFAR zoo
    if inner is model and timm_style:
        features = inner.forward_features(images)
        logits = inner.forward_head(features)
    else:
        module_name, module_input = _final_feature_map(inner)
        with _capture(inner, module_name, module_input=module_input) as captured:
            logits = model(images)
        features = _single(captured, module_name)
    channels_last = getattr(inner, "output_fmt", "NCHW") == "NHWC"
    if not channels_last:
        features = features.permute(0, 2, 3, 1)
    n, h, w, c = features.shape
    per_location = features.reshape(n * h * w, c)
    if timm_style:  # the head pools first, so a 1x1 map per location gives that location's logits
        dense = inner.forward_head(per_location[:, None, None, :] if channels_last else per_location[:, :, None, None])
    else:
        dense = inner.get_submodule(_torchvision_entry(inner)[1])(per_location)
    return logits, dense.reshape(n, h * w, -1)


def feature_dim(model: nn.Module, layer: Layer = "mid") -> int:
    """D of ``forward_with_feature(model, images, layer)``'s feature, known before training (to build the weak
    head ``nn.Linear(D, num_classes)``). Read from ``feature_info`` where possible, else one small dummy forward
    in eval mode under ``no_grad`` (training flags restored, no BatchNorm statistic touched)."""
    inner = unwrap(model)
    tap = _resolve_layer(inner, layer)
    info = getattr(inner, "feature_info", None)
    if tap.stage_index is not None and isinstance(info, list):
        return int(info[tap.stage_index]["num_chs"])
    first_param = next(inner.parameters())
    first_conv = next((m for m in inner.modules() if isinstance(m, nn.Conv2d)), None)
    in_chans = first_conv.in_channels if first_conv is not None else 3
    patch_embed = getattr(inner, "patch_embed", None)
    size = tuple(getattr(patch_embed, "img_size", None) or (32, 32))
    dummy = torch.zeros(2, in_chans, *size, device=first_param.device, dtype=first_param.dtype)
    training = {module: module.training for module in inner.modules()}
    inner.eval()
    try:
        with torch.no_grad():
            _, feature = forward_with_feature(inner, dummy, tap.module)
    finally:
        for module, mode in training.items():
            module.training = mode
    return feature.shape[1]
