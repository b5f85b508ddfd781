"""mmpretrain (mmcls 1.x) and cls_KD checkpoints <-> unikd's timm / torchvision models, tensor by tensor.

The paper's ImageNet teachers and the authors' released students are mmpretrain ``ImageClassifier`` state_dicts
(``backbone.`` / ``neck.`` / ``head.`` keys), or cls_KD ``ClassificationDistiller`` state_dicts that hold a
``student.`` and a ``teacher.`` classifier side by side (cls_KD's ``pth_transfer.py`` keeps the ``student.`` half
without its prefix, an mmpretrain layout again). Each supported backbone maps to the one unikd model that computes
what mmpretrain's classifier computes in eval mode (tests/test_mmpretrain.py compares the logits):

    state_dict = strip_distiller(checkpoint["state_dict"], "student")    # unchanged if already mmpretrain's layout
    model = create_model("timm/resnet18", num_classes=1000)
    model.load_state_dict(from_mmpretrain(state_dict, "timm/resnet18"))

| mmpretrain backbone    | unikd model (kwargs)                    | beyond renaming keys                              |
| ResNet-18/34/50/101    | timm/resnetN (tv/resnetN: same keys)    | nothing                                           |
| MobileNetV2 1.0x       | timm/mobilenetv2_100                    | nothing                                           |
| ShuffleNetV2 1.0x      | tv/shufflenet_v2_x1_0                   | nothing                                           |
| RegNetX-1.6GF          | timm/regnetx_016                        | stem conv input channels reversed: mmpretrain's   |
|                        |                                         | RegNet configs feed BGR images (to_rgb=False)     |
| DeiT-Tiny / DeiT-Small | timm/deit_{tiny,small}_patch16_224      | nothing                                           |
| Swin-Tiny              | timm/swin_tiny_patch4_window7_224       | patch merging's 4C axis permuted (mmcv unfolds    |
|                        |                                         | channel-major, timm quadrant-major); relative     |
|                        |                                         | position indices dropped (timm computes them)     |
| MobileNetV1 (cls_KD)   | timm/mobilenetv1_100 (act_layer="relu") | nothing: cls_KD uses ReLU, timm defaults to ReLU6 |
| ResNet_CIFAR-18/34/50  | cifar/resnetN                           | nothing (our stem is a Sequential: stem.0, stem.1)|

A checkpoint whose backbone differs from the model it would load into (depth, widths, stem, shortcut, heads,
window, head layout, ...) is refused with the difference named. What a state_dict cannot show is taken to be what
the released configs say: ResNet ``style='pytorch'`` (stride on the 3x3 conv), the activations above, and the
number of ViT attention heads (DeiT-Tiny 3, DeiT-Small 6). A ResNet whose stem is one 3x3 conv is mmpretrain's
``ResNet_CIFAR`` (the only mmpretrain ResNet with that stem): stride 1 and no max-pool, which is what the CIFAR
zoo's ``cifar/resnet18/34/50`` compute (a 32x32 image reaches the last stage at 4x4); a 7x7 stem is ImageNet's
``ResNet`` (stride 2, then a stride-2 max-pool), which only timm's and torchvision's ResNets compute. Loading a
CIFAR checkpoint to train on needs no keyword, but the released init of ResNet_CIFAR is ``init="mmpretrain"``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from unikd.models._factory import ModelError

StateDict = dict[str, torch.Tensor]
_FIELD = re.compile(r"\{(\w+)([+-]\d+)?\}")
ROLES = ("student", "teacher")


class _KeyPattern:
    """A key template such as ``backbone.layer{i+1}.{j}.conv.0.``: ``{name}`` fields hold integers, ``{i+1}`` writes
    field i plus one, and a trailing dot makes it a prefix whose rest (``weight``, ``running_var``) is carried over.
    Matching one template of a pair and formatting the other renames a key in either direction.
    """

    def __init__(self, text: str):
        self.text, self.offsets, parts, end = text, {}, [], 0
        for found in _FIELD.finditer(text):
            parts += [re.escape(text[end : found.start()]), rf"(?P<{found[1]}>\d+)"]
            self.offsets[found[1]] = int(found[2] or 0)
            end = found.end()
        parts.append(re.escape(text[end:]) + ("(?P<leaf>.+)" if text.endswith(".") else ""))
        self.regex = re.compile("".join(parts))

    def match(self, key: str) -> tuple[dict[str, int], str] | None:
        found = self.regex.fullmatch(key)
        if found is None:
            return None
        fields = {name: int(found[name]) - offset for name, offset in self.offsets.items()}
        return None if min(fields.values(), default=0) < 0 else (fields, found.groupdict().get("leaf") or "")

    def format(self, fields: dict[str, int], leaf: str) -> str:
        return _FIELD.sub(lambda found: str(fields[found[1]] + int(found[2] or 0)), self.text) + leaf


def _rules(*pairs: tuple[str, str]) -> tuple[tuple[_KeyPattern, _KeyPattern], ...]:
    return tuple((_KeyPattern(mm), _KeyPattern(ours)) for mm, ours in pairs)


def _rename(key: str, rules: tuple[tuple[_KeyPattern, _KeyPattern], ...], to_ours: bool) -> str | None:
    """The key's name on the other side: the first rule whose template on this side matches it, or None."""
    for mm, ours in rules:
        source, destination = (mm, ours) if to_ours else (ours, mm)
        found = source.match(key)
        if found is not None:
            return destination.format(*found)
    return None


def _depths(state_dict: Mapping[str, torch.Tensor], pattern: str) -> tuple[int, ...]:
    """Blocks per stage: ``pattern`` captures (stage, block) numbers, e.g. ``backbone\\.layer(\\d+)\\.(\\d+)\\.``."""
    blocks: dict[int, set[int]] = {}
    for key in state_dict:
        found = re.match(pattern, key)
        if found:
            blocks.setdefault(int(found[1]), set()).add(int(found[2]))
    return tuple(len(blocks[stage]) for stage in sorted(blocks))


def _any(state_dict: Mapping[str, torch.Tensor], pattern: str) -> str:
    return "yes" if any(re.match(pattern, key) for key in state_dict) else "no"


def _out(state_dict: Mapping[str, torch.Tensor], key: str, dim: int = 0) -> int | None:
    """Size ``dim`` of a tensor (output channels by default), or None where the checkpoint lacks it."""
    return int(state_dict[key].shape[dim]) if key in state_dict else None


# --- what each mmpretrain backbone's state_dict shows of its architecture --------------------------------------------


def _resnet_facts(sd: Mapping[str, torch.Tensor]) -> dict[str, object]:
    conv1, conv2 = sd.get("backbone.conv1.weight"), sd["backbone.layer1.0.conv2.weight"]
    return {
        "stem": "three 3x3 convs (ResNetV1c/V1d)"
        if conv1 is None
        else f"{conv1.shape[-2]}x{conv1.shape[-1]} conv with {conv1.shape[0]} channels",
        "block": "Bottleneck" if "backbone.layer1.0.conv3.weight" in sd else "BasicBlock",
        "blocks per stage": _depths(sd, r"backbone\.layer(\d+)\.(\d+)\."),
        "first-stage width": int(conv2.shape[0]),
        "3x3 conv groups": int(conv2.shape[0] // conv2.shape[1]),
        "shortcut": "average pool + 1x1 conv (ResNetV1d)"
        if _any(sd, r"backbone\.layer\d+\.\d+\.downsample\.2\.") == "yes"
        else "1x1 conv",
        "squeeze-excitation": _any(sd, r"backbone\.layer\d+\.\d+\.se\."),
    }


def _regnet_facts(sd: Mapping[str, torch.Tensor]) -> dict[str, object]:
    depths, conv1 = _depths(sd, r"backbone\.layer(\d+)\.(\d+)\."), sd["backbone.conv1.weight"]
    return {
        "stem": f"{conv1.shape[-2]}x{conv1.shape[-1]} conv with {conv1.shape[0]} channels",
        "blocks per stage": depths,
        "stage widths": tuple(_out(sd, f"backbone.layer{stage}.0.conv3.weight") for stage in range(1, len(depths) + 1)),
        "group width": int(sd["backbone.layer1.0.conv2.weight"].shape[1]),
        "squeeze-excitation": _any(sd, r"backbone\.layer\d+\.\d+\.se\."),
    }


def _mobilenetv2_facts(sd: Mapping[str, torch.Tensor]) -> dict[str, object]:
    depths = _depths(sd, r"backbone\.layer(\d+)\.(\d+)\.")

    def stage_channels(stage: int) -> int | None:  # the last conv of the stage's first block
        convs = [key for key in sd if re.fullmatch(rf"backbone\.layer{stage}\.0\.conv\.\d+\.conv\.weight", key)]
        return _out(sd, max(convs, key=lambda key: int(key.split(".")[4]))) if convs else None

    return {
        "stem channels": _out(sd, "backbone.conv1.conv.weight"),
        "blocks per stage": depths,
        "stage channels": tuple(stage_channels(stage) for stage in range(1, len(depths) + 1)),
        "head conv channels": _out(sd, "backbone.conv2.conv.weight"),
    }


def _shufflenetv2_facts(sd: Mapping[str, torch.Tensor]) -> dict[str, object]:
    depths = _depths(sd, r"backbone\.layers\.(\d+)\.(\d+)\.")
    stage_channels = tuple(
        (_out(sd, f"backbone.layers.{stage}.0.branch1.1.conv.weight") or 0)
        + (_out(sd, f"backbone.layers.{stage}.0.branch2.2.conv.weight") or 0)
        for stage in range(len(depths))
    )
    return {
        "stem channels": _out(sd, "backbone.conv1.conv.weight"),
        "blocks per stage": depths,
        "stage channels": stage_channels,
        "head conv channels": _out(sd, f"backbone.layers.{len(depths)}.conv.weight"),
    }


def _vit_facts(sd: Mapping[str, torch.Tensor]) -> dict[str, object]:
    output = "class token after a final LayerNorm"
    if "backbone.ln2.weight" in sd:
        output = "mean of the patch tokens after a LayerNorm (out_type='avg_featmap')"
    elif "backbone.ln1.weight" not in sd:
        output = "class token without a final LayerNorm"
    return {
        "embedding width": int(sd["backbone.cls_token"].shape[-1]),
        "blocks": len({key.split(".")[2] for key in sd if key.startswith("backbone.layers.")}),
        "MLP width": _out(sd, "backbone.layers.0.ffn.layers.0.0.weight"),
        "patch size": _out(sd, "backbone.patch_embed.projection.weight", -1),
        "position embeddings": _out(sd, "backbone.pos_embed", 1),
        "extra tokens": "class and distillation tokens" if "backbone.dist_token" in sd else "class token",
        "output": output,
        "LayerNorm before the blocks": _any(sd, r"backbone\.pre_norm\."),
        "layer scale": _any(sd, r"backbone\.layers\.\d+\.(attn|ffn)\.gamma"),
        "head": "hidden layer, then linear" if _any(sd, r"head\.layers\.pre_logits\.") == "yes" else "one linear layer",
    }


def _swin_facts(sd: Mapping[str, torch.Tensor]) -> dict[str, object]:
    depths = _depths(sd, r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.")
    tables = [sd.get(f"backbone.stages.{stage}.blocks.0.attn.w_msa.relative_position_bias_table") for stage in range(4)]
    indices = [value for key, value in sd.items() if key.endswith("attn.w_msa.relative_position_index")]
    window = round((tables[0].shape[0] ** 0.5 + 1) / 2) if tables[0] is not None else None
    return {
        "embedding width": _out(sd, "backbone.patch_embed.projection.weight"),
        "patch size": _out(sd, "backbone.patch_embed.projection.weight", -1),
        "blocks per stage": depths,
        "heads per stage": tuple(int(table.shape[1]) if table is not None else None for table in tables[: len(depths)]),
        "window size": window,
        "MLP ratio": (_out(sd, "backbone.stages.0.blocks.0.ffn.layers.0.0.weight") or 0)
        // (_out(sd, "backbone.patch_embed.projection.weight") or 1),
        "absolute position embedding": _any(sd, r"backbone\.absolute_pos_embed"),
        "relative position index": "the Swin paper's"
        if window is not None and all(torch.equal(index, relative_position_index(window)) for index in indices)
        else "another one",
    }


def _mobilenetv1_facts(sd: Mapping[str, torch.Tensor]) -> dict[str, object]:
    blocks = [f"model.{block}" for block in range(1, 12)] + ["s4.0", "s4.1"]
    return {
        "stem channels": _out(sd, "backbone.model.0.0.weight"),
        "pointwise conv channels": tuple(_out(sd, f"backbone.{block}.3.weight") for block in blocks),
    }


def relative_position_index(window: int) -> torch.Tensor:
    """(window², window²) int64 index into a Swin relative position bias table, as mmpretrain and timm build it."""
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()])  # (2, window²)
    offsets = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (2, window², window²) in [0, 2 window - 2]
    return offsets[0] * (2 * window - 1) + offsets[1]


def _patch_merging_order(channels4: int) -> torch.Tensor:
    """timm's patch-merging feature t = (2 w + h) C + c is mmcv's unfold feature 4 c + 2 h + w (h, w: offsets)."""
    channels = channels4 // 4
    quadrant, channel = torch.arange(channels4).div(channels, rounding_mode="floor"), torch.arange(channels4) % channels
    return 4 * channel + 2 * (quadrant % 2) + quadrant // 2


def _swin_to_ours(key: str, value: torch.Tensor) -> torch.Tensor:
    if re.fullmatch(r"layers\.\d+\.downsample\.(reduction\.weight|norm\.(weight|bias))", key):
        return value.index_select(-1, _patch_merging_order(value.shape[-1]))
    return value


def _swin_from_ours(key: str, value: torch.Tensor) -> torch.Tensor:
    if re.fullmatch(r"layers\.\d+\.downsample\.(reduction\.weight|norm\.(weight|bias))", key):
        return value.index_select(-1, torch.argsort(_patch_merging_order(value.shape[-1])))
    return value


def _swin_buffers(mm_state: StateDict) -> StateDict:
    """mmpretrain stores each block's relative position index after its bias table: write them back in place."""
    out: StateDict = {}
    for key, value in mm_state.items():
        out[key] = value
        if key.endswith("attn.w_msa.relative_position_bias_table"):
            window = round((value.shape[0] ** 0.5 + 1) / 2)
            out[key.replace("bias_table", "index")] = relative_position_index(window)
    return out


# --- the backbones: key rules, facts, value changes ---------------------------------------------------------------


def _unchanged(key: str, value: torch.Tensor) -> torch.Tensor:
    return value


@dataclass(frozen=True)
class _Backbone:
    name: str  # mmpretrain's backbone class, as error messages name it
    rules: tuple[tuple[_KeyPattern, _KeyPattern], ...]  # (mmpretrain, unikd) key templates; first match wins
    facts: Callable[[Mapping[str, torch.Tensor]], dict[str, object]]
    stem_conv: str  # unikd key of the first conv, whose input channels a BGR checkpoint reverses
    bgr: bool = False  # mmpretrain's released configs for this backbone feed BGR images
    skip: str = r"(?!)"  # mmpretrain keys that never reach the logits, or that our model computes itself
    to_ours: Callable[[str, torch.Tensor], torch.Tensor] = _unchanged  # value change, by unikd key
    from_ours: Callable[[str, torch.Tensor], torch.Tensor] = _unchanged
    buffers: Callable[[StateDict], StateDict] = dict  # mmpretrain buffers to_mmpretrain writes back (Swin)


_RESNET = _Backbone(
    "ResNet",
    _rules(
        ("backbone.conv1.", "conv1."),
        ("backbone.bn1.", "bn1."),
        ("backbone.layer{i}.{j}.conv{k}.", "layer{i}.{j}.conv{k}."),
        ("backbone.layer{i}.{j}.bn{k}.", "layer{i}.{j}.bn{k}."),
        ("backbone.layer{i}.{j}.downsample.{k}.", "layer{i}.{j}.downsample.{k}."),
        ("head.fc.", "fc."),
    ),
    _resnet_facts,
    stem_conv="conv1.weight",
)
# mmpretrain's ResNet_CIFAR has ResNet's keys; our CIFAR zoo keeps each conv with its BatchNorm (and ReLU) in one
# Sequential: conv{k} -> conv{k}.0, bn{k} -> conv{k}.1, the stem in ``stem``, the 1x1-conv shortcut in ``shortcut``.
_RESNET_CIFAR = _Backbone(
    "ResNet",
    _rules(
        ("backbone.conv1.", "stem.0."),
        ("backbone.bn1.", "stem.1."),
        ("backbone.layer{i}.{j}.conv{k}.", "layer{i}.{j}.conv{k}.0."),
        ("backbone.layer{i}.{j}.bn{k}.", "layer{i}.{j}.conv{k}.1."),
        ("backbone.layer{i}.{j}.downsample.0.", "layer{i}.{j}.shortcut.0."),
        ("backbone.layer{i}.{j}.downsample.1.", "layer{i}.{j}.shortcut.1."),
        ("head.fc.", "fc."),
    ),
    _resnet_facts,
    stem_conv="stem.0.weight",
)
_REGNET = _Backbone(
    "RegNet",
    _rules(
        ("backbone.conv1.", "stem.conv."),
        ("backbone.bn1.", "stem.bn."),
        ("backbone.layer{i}.{j}.conv{k}.", "s{i}.b{j+1}.conv{k}.conv."),
        ("backbone.layer{i}.{j}.bn{k}.", "s{i}.b{j+1}.conv{k}.bn."),
        ("backbone.layer{i}.{j}.downsample.0.", "s{i}.b{j+1}.downsample.conv."),
        ("backbone.layer{i}.{j}.downsample.1.", "s{i}.b{j+1}.downsample.bn."),
        ("head.fc.", "head.fc."),
    ),
    _regnet_facts,
    stem_conv="stem.conv.weight",
    bgr=True,
)
_MOBILENETV2 = _Backbone(
    "MobileNetV2",
    _rules(
        ("backbone.conv1.conv.", "conv_stem."),
        ("backbone.conv1.bn.", "bn1."),
        # The first stage does not expand: depthwise then pointwise, timm's DepthwiseSeparableConv.
        ("backbone.layer1.{j}.conv.0.conv.", "blocks.0.{j}.conv_dw."),
        ("backbone.layer1.{j}.conv.0.bn.", "blocks.0.{j}.bn1."),
        ("backbone.layer1.{j}.conv.1.conv.", "blocks.0.{j}.conv_pw."),
        ("backbone.layer1.{j}.conv.1.bn.", "blocks.0.{j}.bn2."),
        ("backbone.layer{i+1}.{j}.conv.0.conv.", "blocks.{i}.{j}.conv_pw."),
        ("backbone.layer{i+1}.{j}.conv.0.bn.", "blocks.{i}.{j}.bn1."),
        ("backbone.layer{i+1}.{j}.conv.1.conv.", "blocks.{i}.{j}.conv_dw."),
        ("backbone.layer{i+1}.{j}.conv.1.bn.", "blocks.{i}.{j}.bn2."),
        ("backbone.layer{i+1}.{j}.conv.2.conv.", "blocks.{i}.{j}.conv_pwl."),
        ("backbone.layer{i+1}.{j}.conv.2.bn.", "blocks.{i}.{j}.bn3."),
        ("backbone.conv2.conv.", "conv_head."),
        ("backbone.conv2.bn.", "bn2."),
        ("head.fc.", "classifier."),
    ),
    _mobilenetv2_facts,
    stem_conv="conv_stem.weight",
)
# torchvision's branches are flat Sequentials (conv, bn[, relu], ...); mmpretrain's are ConvModules (conv, bn).
_SHUFFLENET_BRANCHES = {"branch1": (0, 2), "branch2": (0, 3, 5)}
_SHUFFLENETV2 = _Backbone(
    "ShuffleNetV2",
    _rules(
        ("backbone.conv1.conv.", "conv1.0."),
        ("backbone.conv1.bn.", "conv1.1."),
        *(
            pair
            for branch, starts in _SHUFFLENET_BRANCHES.items()
            for module, start in enumerate(starts)
            for pair in (
                (f"backbone.layers.{{i}}.{{j}}.{branch}.{module}.conv.", f"stage{{i+2}}.{{j}}.{branch}.{start}."),
                (f"backbone.layers.{{i}}.{{j}}.{branch}.{module}.bn.", f"stage{{i+2}}.{{j}}.{branch}.{start + 1}."),
            )
        ),
        ("backbone.layers.3.conv.", "conv5.0."),
        ("backbone.layers.3.bn.", "conv5.1."),
        ("head.fc.", "fc."),
    ),
    _shufflenetv2_facts,
    stem_conv="conv1.0.weight",
)
_VIT = _Backbone(
    "VisionTransformer",
    _rules(
        ("backbone.cls_token", "cls_token"),
        ("backbone.pos_embed", "pos_embed"),
        ("backbone.patch_embed.projection.", "patch_embed.proj."),
        ("backbone.layers.{i}.ln1.", "blocks.{i}.norm1."),
        ("backbone.layers.{i}.attn.qkv.", "blocks.{i}.attn.qkv."),
        ("backbone.layers.{i}.attn.proj.", "blocks.{i}.attn.proj."),
        ("backbone.layers.{i}.ln2.", "blocks.{i}.norm2."),
        ("backbone.layers.{i}.ffn.layers.0.0.", "blocks.{i}.mlp.fc1."),
        ("backbone.layers.{i}.ffn.layers.1.", "blocks.{i}.mlp.fc2."),
        ("backbone.ln1.", "norm."),
        ("head.layers.head.", "head."),
    ),
    _vit_facts,
    stem_conv="patch_embed.proj.weight",
)
_SWIN = _Backbone(
    "SwinTransformer",
    _rules(
        ("backbone.patch_embed.projection.", "patch_embed.proj."),
        ("backbone.patch_embed.norm.", "patch_embed.norm."),
        ("backbone.stages.{i}.blocks.{j}.norm{k}.", "layers.{i}.blocks.{j}.norm{k}."),
        (
            "backbone.stages.{i}.blocks.{j}.attn.w_msa.relative_position_bias_table",
            "layers.{i}.blocks.{j}.attn.relative_position_bias_table",
        ),
        ("backbone.stages.{i}.blocks.{j}.attn.w_msa.qkv.", "layers.{i}.blocks.{j}.attn.qkv."),
        ("backbone.stages.{i}.blocks.{j}.attn.w_msa.proj.", "layers.{i}.blocks.{j}.attn.proj."),
        ("backbone.stages.{i}.blocks.{j}.ffn.layers.0.0.", "layers.{i}.blocks.{j}.mlp.fc1."),
        ("backbone.stages.{i}.blocks.{j}.ffn.layers.1.", "layers.{i}.blocks.{j}.mlp.fc2."),
        # mmpretrain merges patches at the end of a stage, timm at the start of the next one.
        ("backbone.stages.{i}.downsample.", "layers.{i+1}.downsample."),
        ("backbone.norm3.", "norm."),
        ("backbone.norm.", "norm."),  # mmcls 0.x name of the last stage's norm (mmpretrain renames it on load)
        ("head.fc.", "head.fc."),
    ),
    _swin_facts,
    stem_conv="patch_embed.proj.weight",
    # Relative position indices (checked by the facts) and mmcls 0.x attention masks are computed by timm; the
    # LayerNorms on earlier stages' outputs (cls_KD's out_indices=(0, 1, 2, 3)) never reach the logits.
    skip=r"backbone\.stages\.\d+\.blocks\.\d+\.attn\.w_msa\.relative_position_index|.*attn_mask|backbone\.norm[0-2]\.",
    to_ours=_swin_to_ours,
    from_ours=_swin_from_ours,
    buffers=_swin_buffers,
)
# cls_KD's MobileNetV1: model.0 is the stem, model.1-11 and s4.0-1 the depthwise-separable blocks (dw conv, BN,
# ReLU, pw conv, BN, ReLU); timm groups the same blocks into stages of 1, 2, 2, 6 and 2.
_MOBILENETV1_BLOCKS = [f"model.{block}" for block in range(1, 12)] + ["s4.0", "s4.1"]
_TIMM_MOBILENETV1_BLOCKS = [f"{stage}.{block}" for stage, depth in enumerate((1, 2, 2, 6, 2)) for block in range(depth)]
_MOBILENETV1 = _Backbone(
    "MobileNetV1 (cls_KD)",
    _rules(
        ("backbone.model.0.0.", "conv_stem."),
        ("backbone.model.0.1.", "bn1."),
        *(
            pair
            for mm, ours in zip(_MOBILENETV1_BLOCKS, _TIMM_MOBILENETV1_BLOCKS)
            for pair in (
                (f"backbone.{mm}.0.", f"blocks.{ours}.conv_dw."),
                (f"backbone.{mm}.1.", f"blocks.{ours}.bn1."),
                (f"backbone.{mm}.3.", f"blocks.{ours}.conv_pw."),
                (f"backbone.{mm}.4.", f"blocks.{ours}.bn2."),
            )
        ),
        ("head.fc.", "classifier."),
    ),
    _mobilenetv1_facts,
    stem_conv="conv_stem.weight",
)
_BACKBONES = {backbone.name: backbone for backbone in (_RESNET, _REGNET, _MOBILENETV2, _SHUFFLENETV2, _VIT, _SWIN)}
_BACKBONES[_MOBILENETV1.name] = _MOBILENETV1


def mmpretrain_backbone(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The mmpretrain backbone class an mmpretrain state_dict holds ("ResNet", "SwinTransformer", ...), or None.

    Variants that share a class's keys (ResNetV1c/V1d, ResNeXt, SEResNet, ResNet_CIFAR) count as "ResNet": the
    facts ``from_mmpretrain`` compares name what differs.
    """
    keys = state_dict.keys()
    if "backbone.cls_token" in keys:
        return "VisionTransformer"
    if any(".attn.w_msa." in key for key in keys):
        return "SwinTransformer"
    if "backbone.model.0.0.weight" in keys and any(key.startswith("backbone.s4.") for key in keys):
        return _MOBILENETV1.name
    if "backbone.layers.0.0.branch2.0.conv.weight" in keys:
        return "ShuffleNetV2"
    if "backbone.layer1.0.conv.0.conv.weight" in keys:
        return "MobileNetV2"
    if "backbone.layer1.0.conv2.weight" in keys:
        stem, conv2 = state_dict.get("backbone.conv1.weight"), state_dict["backbone.layer1.0.conv2.weight"]
        grouped = conv2.shape[0] != conv2.shape[1]
        regnet = stem is not None and stem.shape[-1] == 3 and grouped and "backbone.layer1.0.conv3.weight" in keys
        return "RegNet" if regnet else "ResNet"
    return None


# --- the unikd models they map to ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    backbone: _Backbone
    facts: dict[str, object]
    kwargs: dict[str, object] = field(default_factory=dict)  # create_model keywords that make it compute the same


def _resnet(block: str, depths: tuple[int, ...], backbone: _Backbone = _RESNET) -> _Target:
    facts = {
        "stem": "3x3 conv with 64 channels" if backbone is _RESNET_CIFAR else "7x7 conv with 64 channels",
        "block": block,
        "blocks per stage": depths,
        "first-stage width": 64,
        "3x3 conv groups": 1,
        "shortcut": "1x1 conv",
        "squeeze-excitation": "no",
    }
    return _Target(backbone, facts)


def _deit(width: int) -> _Target:
    facts = {
        "embedding width": width,
        "blocks": 12,
        "MLP width": 4 * width,
        "patch size": 16,
        "position embeddings": 197,
        "extra tokens": "class token",
        "output": "class token after a final LayerNorm",
        "LayerNorm before the blocks": "no",
        "layer scale": "no",
        "head": "one linear layer",
    }
    return _Target(_VIT, facts)


_RESNETS = {18: ("BasicBlock", (2, 2, 2, 2)), 34: ("BasicBlock", (3, 4, 6, 3)), 50: ("Bottleneck", (3, 4, 6, 3))}
_RESNETS[101] = ("Bottleneck", (3, 4, 23, 3))
_TARGETS: dict[str, _Target] = {
    **{f"{ns}/resnet{depth}": _resnet(*spec) for depth, spec in _RESNETS.items() for ns in ("timm", "tv")},
    "timm/mobilenetv2_100": _Target(
        _MOBILENETV2,
        {
            "stem channels": 32,
            "blocks per stage": (1, 2, 3, 4, 3, 3, 1),
            "stage channels": (16, 24, 32, 64, 96, 160, 320),
            "head conv channels": 1280,
        },
    ),
    "tv/shufflenet_v2_x1_0": _Target(
        _SHUFFLENETV2,
        {
            "stem channels": 24,
            "blocks per stage": (4, 8, 4),
            "stage channels": (116, 232, 464),
            "head conv channels": 1024,
        },
    ),
    "timm/regnetx_016": _Target(
        _REGNET,
        {
            "stem": "3x3 conv with 32 channels",
            "blocks per stage": (2, 4, 10, 2),
            "stage widths": (72, 168, 408, 912),
            "group width": 24,
            "squeeze-excitation": "no",
        },
    ),
    "timm/deit_tiny_patch16_224": _deit(192),
    "timm/deit_small_patch16_224": _deit(384),
    "timm/swin_tiny_patch4_window7_224": _Target(
        _SWIN,
        {
            "embedding width": 96,
            "patch size": 4,
            "blocks per stage": (2, 2, 6, 2),
            "heads per stage": (3, 6, 12, 24),
            "window size": 7,
            "MLP ratio": 4,
            "absolute position embedding": "no",
            "relative position index": "the Swin paper's",
        },
    ),
    "timm/mobilenetv1_100": _Target(
        _MOBILENETV1,
        {"stem channels": 32, "pointwise conv channels": (64, 128, 128, 256, 256, *(512,) * 6, 1024, 1024)},
        kwargs={"act_layer": "relu"},
    ),
    **{f"cifar/resnet{depth}": _resnet(*_RESNETS[depth], _RESNET_CIFAR) for depth in (18, 34, 50)},
}

# mmpretrain config / model-zoo names, the stems of the released files (mmcls 0.x names, e.g.
# swin_tiny_224_b16x64_300e_imagenet_20210616_090925-66df6be6.pth) and the mmcls 0.x configs cls_KD cites -> the
# unikd model and the create_model keywords that compute the same classifier.
_ALIASES = {
    "timm/resnet18": ("resnet18_8xb32_in1k", "resnet18_b32x8_imagenet"),
    "timm/resnet34": ("resnet34_8xb32_in1k", "resnet34_b32x8_imagenet"),
    "timm/resnet50": ("resnet50_8xb32_in1k", "resnet50_b32x8_imagenet"),
    "timm/resnet101": ("resnet101_8xb32_in1k", "resnet101_b32x8_imagenet"),
    "timm/mobilenetv2_100": ("mobilenet-v2_8xb32_in1k", "mobilenet_v2_batch256_imagenet"),
    "tv/shufflenet_v2_x1_0": ("shufflenet-v2-1x_16xb64_in1k", "shufflenet_v2_batch1024_imagenet"),
    "timm/regnetx_016": ("regnetx-1.6gf_8xb128_in1k",),
    "timm/deit_tiny_patch16_224": ("deit-tiny_4xb256_in1k", "deit-tiny_pt-4xb256_in1k"),
    "timm/deit_small_patch16_224": ("deit-small_4xb256_in1k", "deit-small_pt-4xb256_in1k"),
    "timm/swin_tiny_patch4_window7_224": ("swin-tiny_16xb64_in1k", "swin_tiny_224_b16x64_300e_imagenet"),
    "timm/mobilenetv1_100": ("mobilenet_v1",),  # cls_KD's configs/mobilenet_v1/mobilenet_v1.py
    # ResNet_CIFAR: mmpretrain's CIFAR-10 configs, its resnet50_8xb16_cifar100 and cls_KD's
    # configs/resnet/resnet{18,34}_8xb16_cifar100.py (the CIFAR-100 self-KD and KD students and teacher).
    "cifar/resnet18": ("resnet18_8xb16_cifar100", "resnet18_8xb16_cifar10"),
    "cifar/resnet34": ("resnet34_8xb16_cifar100", "resnet34_8xb16_cifar10"),
    "cifar/resnet50": ("resnet50_8xb16_cifar100", "resnet50_8xb16_cifar10"),
}
MMPRETRAIN_MODELS: dict[str, tuple[str, dict[str, object]]] = {
    alias: (name, dict(_TARGETS[name].kwargs)) for name, aliases in _ALIASES.items() for alias in aliases
}
# cls_KD's distiller configs (configs/distillers/imagenet/ and cifar100/) -> (student, teacher) mmpretrain config
# names; the self-KD ones build an untrained teacher of the student's architecture.
CLS_KD_DISTILLERS: dict[str, tuple[str, str | None]] = {
    "res34_distill_res18_img": ("resnet18_8xb32_in1k", "resnet34_8xb32_in1k"),
    "res50_distill_mv1_img": ("mobilenet_v1", "resnet50_8xb32_in1k"),
    "res18_sd_img": ("resnet18_8xb32_in1k", None),
    "res50_sd_img": ("resnet50_8xb32_in1k", None),
    "res101_sd_img": ("resnet101_8xb32_in1k", None),
    "mv1_sd_img": ("mobilenet_v1", None),
    "mv2_sd_img": ("mobilenet-v2_8xb32_in1k", None),
    "shuffv2_sd_img": ("shufflenet-v2-1x_16xb64_in1k", None),
    "regnet-1.6gf_sd_img": ("regnetx-1.6gf_8xb128_in1k", None),
    "deit-t_sd_img": ("deit-tiny_4xb256_in1k", None),
    "swin-t_sd_img": ("swin-tiny_16xb64_in1k", None),
    "res34_distill_res18_cifar": ("resnet18_8xb16_cifar100", "resnet34_8xb16_cifar100"),
    "res18_sd_cifar": ("resnet18_8xb16_cifar100", None),
}


def _target(model_name: str) -> _Target:
    if model_name not in _TARGETS:
        raise ModelError(
            f"no mmpretrain mapping for {model_name!r}: mmpretrain checkpoints load into {', '.join(_TARGETS)}"
        )
    return _TARGETS[model_name]


def matching_models(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """The unikd models that compute what this mmpretrain state_dict's classifier computes (timm first)."""
    backbone = mmpretrain_backbone(state_dict)
    if backbone is None:
        return []
    facts = _BACKBONES[backbone].facts(state_dict)
    return [name for name, target in _TARGETS.items() if target.backbone.name == backbone and target.facts == facts]


def _check_architecture(state_dict: Mapping[str, torch.Tensor], model_name: str, target: _Target) -> None:
    if is_distiller_state_dict(state_dict):
        raise ModelError(
            "a cls_KD distiller state_dict (student./teacher. keys) holds two classifiers: take one with "
            "strip_distiller(state_dict, 'student' or 'teacher') first"
        )
    if not is_mmpretrain_state_dict(state_dict):
        first = next(iter(state_dict), None)
        raise ModelError(
            f"not an mmpretrain state_dict: its keys do not all start with backbone./neck./head. (first key {first!r})"
        )
    backbone = mmpretrain_backbone(state_dict)

    def fits() -> str:
        names = [name for name in matching_models(state_dict) if name != model_name]
        return f"; it fits {' or '.join(names)}" if names else ""

    if backbone != target.backbone.name:
        found = f"a {backbone}" if backbone else "no backbone unikd can read"
        raise ModelError(
            f"the mmpretrain checkpoint holds {found}, not the {target.backbone.name} of {model_name}{fits()}"
        )
    facts = target.backbone.facts(state_dict)
    for fact, expected in target.facts.items():
        if facts[fact] != expected:
            raise ModelError(
                f"the mmpretrain {backbone} checkpoint differs from {model_name} in {fact}: {facts[fact]} in the "
                f"checkpoint, {expected} in {model_name}{fits()}"
            )


def _reverse_stem_channels(key: str, value: torch.Tensor, backbone: _Backbone, bgr: bool) -> torch.Tensor:
    return value.flip(1) if bgr and key == backbone.stem_conv else value


def is_mmpretrain_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for an mmpretrain classifier's state_dict: every key under ``backbone.`` / ``neck.`` / ``head.``."""
    keys = list(state_dict)
    return any(key.startswith("backbone.") for key in keys) and all(
        key.startswith(("backbone.", "neck.", "head.")) for key in keys
    )


def is_distiller_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for a cls_KD ``ClassificationDistiller`` state_dict: ``student.`` / ``teacher.`` classifiers side by side,
    plus the distillation losses' own weights (``distill_losses.``, e.g. USKD's weak head)."""
    keys = list(state_dict)
    return any(key.startswith(("student.", "teacher.")) for key in keys) and all(
        key.startswith(("student.", "teacher.", "distill_losses.")) for key in keys
    )


def _untrained_batchnorm(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Every BatchNorm as built and never run: 0 batches seen, running mean 0 and variance 1 (none: False)."""
    counters = [key.removesuffix("num_batches_tracked") for key in state_dict if key.endswith(".num_batches_tracked")]
    zero, one = torch.zeros(()), torch.ones(())
    return bool(counters) and all(
        int(state_dict[f"{bn}num_batches_tracked"]) == 0
        and bool((state_dict.get(f"{bn}running_mean", one) == 0).all())
        and bool((state_dict.get(f"{bn}running_var", zero) == 1).all())
        for bn in counters
    )


def strip_distiller(state_dict: Mapping[str, torch.Tensor], role: str) -> StateDict:
    """The mmpretrain state_dict of the ``role`` ("student" or "teacher") classifier in a cls_KD checkpoint.

    A distiller state_dict (``student.backbone...``, ``teacher.backbone...``, ``distill_losses...``) gives the half
    under ``role.``, prefix removed. An mmpretrain state_dict (what cls_KD's ``pth_transfer.py`` writes for the
    student, or any mmpretrain model-zoo file) is returned unchanged. A self-KD distiller's teacher is an untrained
    copy of the student, refused where its BatchNorm statistics show it (CNNs; ViT/Swin have no BatchNorm).
    """
    if role not in ROLES:
        raise ModelError(f"role must be 'student' or 'teacher', got {role!r}")
    if is_mmpretrain_state_dict(state_dict):
        return dict(state_dict)
    if not is_distiller_state_dict(state_dict):
        first = next(iter(state_dict), None)
        raise ModelError(
            "not a cls_KD distiller or mmpretrain state_dict: keys start neither with student./teacher. nor with "
            f"backbone./neck./head. (first key {first!r})"
        )
    prefix = f"{role}."
    half = {key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)}
    if not half:
        raise ModelError(
            f"the cls_KD distiller state_dict has no {prefix} weights; use role '{ROLES[role == 'student']}'"
        )
    if role == "teacher" and _untrained_batchnorm(half):
        raise ModelError(
            "the teacher. half of this cls_KD distiller checkpoint was never trained (its BatchNorm never saw a batch: "
            "a self-KD run builds an unused teacher); load its student instead"
        )
    return half


def from_mmpretrain(state_dict: Mapping[str, torch.Tensor], model_name: str, *, bgr: bool | None = None) -> StateDict:
    """The state_dict of ``model_name`` (e.g. "timm/resnet50") that computes what this mmpretrain classifier computes.

    ``bgr``: the checkpoint was trained on BGR images (mmpretrain ``to_rgb=False``), so the stem's input channels are
    reversed for unikd's RGB input; default: what the backbone's released configs do (RegNet yes, others no).
    Raises ModelError, naming the difference, when the backbone is not the one ``model_name`` computes.
    """
    target = _target(model_name)
    _check_architecture(state_dict, model_name, target)
    backbone, skip = target.backbone, re.compile(target.backbone.skip)
    bgr = backbone.bgr if bgr is None else bgr
    converted: StateDict = {}
    unmatched = []
    for key, value in state_dict.items():
        if skip.match(key):
            continue
        ours = _rename(key, backbone.rules, to_ours=True)
        if ours is None:
            unmatched.append(key)
        elif ours in converted:
            raise ModelError(f"the mmpretrain checkpoint holds {ours!r} of {model_name} twice (e.g. as {key!r})")
        else:
            converted[ours] = _reverse_stem_channels(ours, backbone.to_ours(ours, value), backbone, bgr)
    if unmatched:
        raise ModelError(
            f"the mmpretrain {backbone.name} checkpoint has {len(unmatched)} key(s) that {model_name} has no place "
            f"for: {', '.join(unmatched[:3])}"
        )
    return converted


def to_mmpretrain(state_dict: Mapping[str, torch.Tensor], model_name: str, *, bgr: bool | None = None) -> StateDict:
    """The mmpretrain classifier state_dict of a ``model_name`` state_dict: the exact inverse of ``from_mmpretrain``."""
    backbone = _target(model_name).backbone
    bgr = backbone.bgr if bgr is None else bgr
    mm_state: StateDict = {}
    for key, value in state_dict.items():
        mm_key = _rename(key, backbone.rules, to_ours=False)
        if mm_key is None:
            raise ModelError(f"{model_name} state_dict key {key!r} has no mmpretrain counterpart")
        mm_state[mm_key] = backbone.from_ours(key, _reverse_stem_channels(key, value, backbone, bgr))
    return backbone.buffers(mm_state)


def stage_output_norms(state_dict: Mapping[str, torch.Tensor]) -> dict[int, StateDict]:
    """The LayerNorms an mmpretrain Swin puts on stage outputs (``backbone.norm{i}``), by stage: ``{2: {"weight":
    ..., "bias": ...}}``. cls_KD's Swin has one per stage and its USKD weak head reads stage 2 through ``norm2``;
    ``from_mmpretrain`` keeps only the last stage's (timm's ``norm``), which is all the logits see."""
    norms: dict[int, StateDict] = {}
    for key, value in state_dict.items():
        found = re.fullmatch(r"backbone\.norm(\d+)\.(weight|bias)", key)
        if found:
            norms.setdefault(int(found[1]), {})[found[2]] = value
    return norms
