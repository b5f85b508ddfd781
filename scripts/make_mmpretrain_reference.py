"""Dev-only: write tests/data/mmpretrain_reference.{json,npz} with mmpretrain itself. Not run by tests or CI.

For each paper model this builds mmpretrain's ImageClassifier from its released config (the CIFAR ResNets from
mmpretrain's ResNet_CIFAR model configs with cls_KD's 100-class head), gives every parameter and buffer the value
``tests/test_mmpretrain.py::synthetic_tensor`` computes from its key name, runs ``synthetic_images`` through it in
float64 and eval mode, and stores the state_dict's key names, shapes, dtypes and per-tensor sums (so that the tests
can check that they rebuild the same weights) and the logits. Images go in as our RGB pipeline normalises them; a
config that feeds BGR (``to_rgb=False``, RegNet) gets them channel-reversed, which is what its own data preprocessor
would produce from the same picture.

Needs a side virtualenv outside the repository (tests/data/REFERENCE.md, "mmpretrain reference logits", has the
exact commands):

    /tmp/mmvenv/bin/python scripts/make_mmpretrain_reference.py --cls-kd-mobilenet-v1 /tmp/clskd_mobilenet_v1.py

``--cls-kd-mobilenet-v1`` is a local copy of cls_KD's ``mmcls/models/backbones/mobilenet_v1.py`` with its imports
pointed at mmpretrain's registry (cls_KD is not on PyPI); none of it enters this repository.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
RGB_MEAN, RGB_STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]

# name -> (config under mmpretrain's configs/ or None for a dict below, backbone overrides, image size).
# The names are mmpretrain's config / model-zoo names; cls_KD's own configs get a "cls_kd_" prefix, except the CIFAR
# ones, whose cls_KD names (configs/resnet/resnet{18,34}_8xb16_cifar100.py) follow mmpretrain's pattern.
REFERENCE_MODELS = {
    "resnet18_8xb32_in1k": ("resnet/resnet18_8xb32_in1k.py", {}, 72),
    "resnet34_8xb32_in1k": ("resnet/resnet34_8xb32_in1k.py", {}, 72),
    "resnet50_8xb32_in1k": ("resnet/resnet50_8xb32_in1k.py", {}, 72),
    "resnet101_8xb32_in1k": ("resnet/resnet101_8xb32_in1k.py", {}, 72),
    "mobilenet-v2_8xb32_in1k": ("mobilenet_v2/mobilenet-v2_8xb32_in1k.py", {}, 72),
    "shufflenet-v2-1x_16xb64_in1k": ("shufflenet_v2/shufflenet-v2-1x_16xb64_in1k.py", {}, 72),
    "regnetx-1.6gf_8xb128_in1k": ("regnet/regnetx-1.6gf_8xb128_in1k.py", {}, 72),
    "deit-tiny_4xb256_in1k": ("deit/deit-tiny_4xb256_in1k.py", {}, 224),
    "deit-small_4xb256_in1k": ("deit/deit-small_4xb256_in1k.py", {}, 224),
    "swin-tiny_16xb64_in1k": ("swin_transformer/swin-tiny_16xb64_in1k.py", {}, 224),
    # cls_KD's configs/swin_transformer/swin-tiny_16xb64_in1k.py: mmpretrain's, with a LayerNorm on every stage's
    # output (out_indices=(0, 1, 2, 3)) so that USKD's weak head can read stage 3.
    "cls_kd_swin-tiny_16xb64_in1k": ("swin_transformer/swin-tiny_16xb64_in1k.py", {"out_indices": (0, 1, 2, 3)}, 224),
    # cls_KD's configs/mobilenet_v1/mobilenet_v1.py (_base_/models/mobilenet_v1_1x.py): its own MobileNetV1.
    "cls_kd_mobilenet_v1": (None, {}, 72),
    # ResNet_CIFAR. cls_KD's resnet{18,34}_8xb16_cifar100.py are mmpretrain's _base_/models/resnet{18,34}_cifar.py
    # with a 100-class head (and its CIFAR-100 data and schedule); resnet50_8xb16_cifar100.py is mmpretrain's own.
    "resnet18_8xb16_cifar100": ("_base_/models/resnet18_cifar.py", {}, 32),
    "resnet34_8xb16_cifar100": ("_base_/models/resnet34_cifar.py", {}, 32),
    "resnet50_8xb16_cifar100": ("resnet/resnet50_8xb16_cifar100.py", {}, 32),
}
CIFAR100_HEAD = {"num_classes": 100}
CLS_KD_MOBILENET_V1 = dict(
    type="ImageClassifier",
    backbone=dict(type="MobileNetV1"),
    neck=dict(type="GlobalAveragePooling"),
    head=dict(type="LinearClsHead", num_classes=1000, in_channels=1024),
)
BATCH = 2


def build_classifier(config: str | None, backbone_overrides: dict) -> tuple[torch.nn.Module, bool]:
    """mmpretrain's classifier for ``config`` and whether its data preprocessor feeds BGR images."""
    import mmpretrain
    from mmengine.config import Config
    from mmpretrain.models import build_classifier as mm_build

    if config is None:
        model_cfg, preprocessor = dict(CLS_KD_MOBILENET_V1), {"to_rgb": True, "mean": RGB_MEAN, "std": RGB_STD}
    else:
        cfg = Config.fromfile(str(Path(mmpretrain.__file__).parent / ".mim" / "configs" / config))
        model_cfg, preprocessor = cfg.model, cfg.get("data_preprocessor")
    model_cfg["backbone"] = {**model_cfg["backbone"], **backbone_overrides}
    if model_cfg["backbone"]["type"] == "ResNet_CIFAR":
        # mmpretrain's CIFAR datasets decode the pickled arrays to RGB and their preprocessor (to_rgb=False) keeps
        # them so: RGB in, whatever the normalisation. A model-only base config gets cls_KD's 100-class head.
        model_cfg["head"] = {**model_cfg["head"], **CIFAR100_HEAD}
        if preprocessor is not None and preprocessor.get("to_rgb", False):
            raise SystemExit(f"{config}: unexpected CIFAR preprocessor {preprocessor}")
        return mm_build(model_cfg).eval(), False
    bgr = not preprocessor.get("to_rgb", False)
    # Reversing normalised RGB is normalising BGR only when the BGR config's mean/std are the RGB ones reversed.
    expected = (RGB_MEAN[::-1], RGB_STD[::-1]) if bgr else (RGB_MEAN, RGB_STD)
    if (list(preprocessor["mean"]), list(preprocessor["std"])) != expected:
        raise SystemExit(f"{config}: unexpected normalisation {preprocessor}")
    return mm_build(model_cfg).eval(), bgr


def head_classes(model: torch.nn.Module) -> int:
    """The classifier's class count: the output width of its head's last linear layer."""
    return [module for module in model.head.modules() if isinstance(module, torch.nn.Linear)][-1].out_features


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cls-kd-mobilenet-v1", type=Path, required=True, help="cls_KD's MobileNetV1 backbone file")
    args = parser.parse_args()
    load_module("clskd_mobilenet_v1", args.cls_kd_mobilenet_v1)  # registers MobileNetV1 in mmpretrain's MODELS
    sys.path.insert(0, str(REPO))  # the test module imports unikd
    tests = load_module("test_mmpretrain", REPO / "tests" / "test_mmpretrain.py")
    synthetic_images, synthetic_tensor = tests.synthetic_images, tests.synthetic_tensor

    torch.manual_seed(0)
    reference, arrays = {"mmpretrain": __import__("mmpretrain").__version__, "batch": BATCH, "models": {}}, {}
    for name, (config, overrides, size) in REFERENCE_MODELS.items():
        model, bgr = build_classifier(config, overrides)
        state = model.state_dict()
        synthetic = {key: synthetic_tensor(key, tuple(value.shape), value.dtype) for key, value in state.items()}
        for key, value in state.items():  # mmpretrain must build the index unikd computes for timm
            if key.endswith("relative_position_index") and not torch.equal(value, synthetic[key]):
                raise SystemExit(f"{name}: {key} differs from unikd's relative_position_index")
        model.load_state_dict(synthetic, strict=True)
        images = synthetic_images(BATCH, size)
        with torch.no_grad():
            logits = model.double()(images.flip(1) if bgr else images, mode="tensor")
        reference["models"][name] = {
            "config": config or "cls_KD configs/mobilenet_v1/mobilenet_v1.py",
            "backbone_overrides": overrides,
            "image_size": size,
            "num_classes": int(head_classes(model)),
            "input_channels": "bgr" if bgr else "rgb",
            "keys": [[key, list(value.shape), str(value.dtype).removeprefix("torch.")] for key, value in state.items()],
        }
        arrays[f"{name}/logits"] = logits.numpy()
        arrays[f"{name}/sums"] = np.array([float(synthetic[key].double().sum()) for key in state])
        print(f"{name}: {len(state)} tensors, logits std {logits.std():.3f}, max |logit| {logits.abs().max():.3f}")
    (DATA / "mmpretrain_reference.json").write_text(json.dumps(reference, indent=1) + "\n")
    np.savez_compressed(DATA / "mmpretrain_reference.npz", **arrays)


if __name__ == "__main__":
    main()
