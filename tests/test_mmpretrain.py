"""mmpretrain (mmcls 1.x) and cls_KD checkpoints load into unikd's models with the logits mmpretrain computes.

``tests/data/mmpretrain_reference.json`` / ``.npz`` were made by mmpretrain 1.2.0 itself
(``scripts/make_mmpretrain_reference.py``, see tests/data/REFERENCE.md): for each paper model, the key names,
shapes and dtypes of its classifier's state_dict and the float64 logits it computes in eval mode when every tensor
holds ``synthetic_tensor(key)`` and the input is ``synthetic_images``. The tests rebuild those weights from the same
formula, write them in the real file layouts, convert them and compare our model's logits.
"""

from __future__ import annotations

import functools
import json
import re
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unikd.models import ModelError, create_model, list_models
from unikd.models._mmpretrain import (
    CLS_KD_DISTILLERS,
    MMPRETRAIN_MODELS,
    from_mmpretrain,
    is_distiller_state_dict,
    is_mmpretrain_state_dict,
    matching_models,
    mmpretrain_backbone,
    relative_position_index,
    stage_output_norms,
    strip_distiller,
    to_mmpretrain,
)

DATA = Path(__file__).parent / "data"
REFERENCE = json.loads((DATA / "mmpretrain_reference.json").read_text())
MODELS = REFERENCE["models"]


def synthetic_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The value of the tensor named ``key`` in every synthetic checkpoint: a function of the name alone.

    Uniform draws from numpy's legacy RandomState (stable across numpy releases) seeded by the name's crc32, scaled
    like a sane init: He (Kaiming-uniform) conv/linear weights, norm scales in [0.5, 1.5], BatchNorm running means
    around 0 and variances in [0.5, 2], so that every layer changes the logits. Swin's relative position index is the
    real one (a lookup table, not a weight; the reference script checks that mmpretrain builds the same).
    """
    rng = np.random.RandomState(zlib.crc32(key.encode()))
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "num_batches_tracked":
        return torch.tensor(rng.randint(1, 10**6), dtype=dtype)
    if leaf == "relative_position_index":
        return relative_position_index(round(shape[0] ** 0.5)).to(dtype)
    if leaf == "running_var":
        low, high = 0.5, 2.0
    elif leaf == "weight" and len(shape) == 1:  # BatchNorm / LayerNorm scale
        low, high = 0.5, 1.5
    elif leaf == "weight":
        high = (6.0 / int(np.prod(shape[1:]))) ** 0.5
        low = -high
    elif leaf in ("bias", "running_mean"):
        low, high = -0.3, 0.3
    else:  # class token, position embedding, relative position bias table
        low, high = -1.0, 1.0
    return torch.from_numpy(np.asarray(rng.uniform(low, high, shape), dtype=np.float64)).to(dtype)


def synthetic_images(batch: int, size: int) -> torch.Tensor:
    """(batch, 3, size, size) float64 in [-2, 2]: smooth and fine patterns that differ per image and channel."""
    n, c, h, w = np.meshgrid(*(np.arange(k) for k in (batch, 3, size, size)), indexing="ij")
    images = np.sin(0.13 * h * (c + 1) + 0.29 * w + 1.7 * n) + np.cos(0.071 * (h - w) * (n + 1) + c)
    return torch.from_numpy(images)


# --- the reference models and their synthetic checkpoints -------------------------------------------------------------


def reference_model(name: str) -> tuple[str, dict]:
    """The unikd model (and create_model keywords) an mmpretrain / cls_KD reference model maps to."""
    return MMPRETRAIN_MODELS[name.removeprefix("cls_kd_")]


@functools.lru_cache(maxsize=2)  # tests of one model follow each other; never mutate what this returns
def reference_state(name: str) -> OrderedDict[str, torch.Tensor]:
    """The mmpretrain state_dict the reference script ran, rebuilt from the stored key list and the formula."""
    return OrderedDict(
        (key, synthetic_tensor(key, tuple(shape), getattr(torch, dtype))) for key, shape, dtype in MODELS[name]["keys"]
    )


def reference_logits(name: str) -> torch.Tensor:
    with np.load(DATA / "mmpretrain_reference.npz") as arrays:
        return torch.from_numpy(arrays[f"{name}/logits"])


def logit_errors(name: str, state_dict: dict, model_name: str = "", kwargs: dict | None = None) -> tuple[float, float]:
    """Largest |our logit - mmpretrain's| relative to the largest logit, in float64 and in float32, for the unikd
    model (default: the one ``name`` maps to) loaded with ``state_dict``."""
    model_name, kwargs = (model_name, kwargs or {}) if model_name else reference_model(name)
    model = create_model(model_name, num_classes=MODELS[name]["num_classes"], **kwargs).eval()
    model.load_state_dict(state_dict, strict=True)
    images, expected = synthetic_images(REFERENCE["batch"], MODELS[name]["image_size"]), reference_logits(name)
    with torch.no_grad():
        float32 = model(images.float()).double()
        float64 = model.double()(images)
    scale = float(expected.abs().max())
    return float((float64 - expected).abs().max()) / scale, float((float32 - expected).abs().max()) / scale


def save_mmengine_checkpoint(path: Path, state_dict: dict, **extra) -> None:
    """The file layout mmengine's runner writes (meta, state_dict, and for a run in progress its optimizer)."""
    meta = {"epoch": 100, "iter": 500400, "cfg": "model = dict(type='ImageClassifier', ...)", "seed": 0}
    torch.save({"meta": meta, "state_dict": OrderedDict(state_dict), **extra}, path)


def load_checkpoint_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module", params=list(MODELS))
def reference(request) -> tuple[str, OrderedDict[str, torch.Tensor]]:
    """(name, mmpretrain state_dict), one model at a time: the tests of a model share its (large) weights."""
    return request.param, reference_state(request.param)


def test_the_formula_rebuilds_the_weights_mmpretrain_ran(reference):
    name, state = reference
    with np.load(DATA / "mmpretrain_reference.npz") as arrays:
        sums = arrays[f"{name}/sums"]
    np.testing.assert_allclose([float(value.double().sum()) for value in state.values()], sums, rtol=1e-12, atol=0)


# cls_KD's Swin converts to the very tensors mmpretrain's does (test_cls_kd_swin_stage_norms_...): no second run.
@pytest.mark.parametrize(
    "reference", [name for name in MODELS if name != "cls_kd_swin-tiny_16xb64_in1k"], indirect=True
)
def test_a_checkpoint_file_loads_with_mmpretrains_logits(reference, tmp_path):
    name, state = reference
    model_name = reference_model(name)[0]
    path = tmp_path / "epoch_100.pth"
    save_mmengine_checkpoint(path, state, param_schedulers=[{"last_epoch": 100}])
    float64, float32 = logit_errors(name, from_mmpretrain(load_checkpoint_state(path), model_name))
    # float64 shows that the computation is the same (summation order aside); float32 is what a user runs.
    assert float64 <= 1e-12 and float32 <= 1e-5


def test_round_trips_are_exact_and_the_key_list_is_mmpretrains(reference):
    name, state = reference
    model_name, kwargs = reference_model(name)
    ours = from_mmpretrain(state, model_name)
    with torch.device("meta"):
        model = create_model(model_name, num_classes=MODELS[name]["num_classes"], **kwargs)
    layout = {key: (tuple(value.shape), value.dtype) for key, value in model.state_dict().items()}
    assert {key: (tuple(value.shape), value.dtype) for key, value in ours.items()} == layout
    if name == "cls_kd_swin-tiny_16xb64_in1k":  # its per-stage output norms do not reach the logits
        assert set(state) - set(to_mmpretrain(ours, model_name)) == {
            f"backbone.norm{i}.{p}" for i in range(3) for p in ("weight", "bias")
        }
        return
    back = to_mmpretrain(ours, model_name)
    assert set(back) == set(state)
    assert all(torch.equal(back[key], value) and back[key].dtype == value.dtype for key, value in state.items())
    # From our model's own layout, the inverse writes exactly mmpretrain's key list, shapes and dtypes.
    mm_layout = {
        key: (tuple(value.shape), value.dtype) for key, value in to_mmpretrain(model.state_dict(), model_name).items()
    }
    assert mm_layout == {key: (tuple(shape), getattr(torch, dtype)) for key, shape, dtype in MODELS[name]["keys"]}
    assert matching_models(state)[0] == model_name


def test_torchvision_resnet_is_the_same_model_as_timms():
    state = reference_state("resnet18_8xb32_in1k")
    ours = from_mmpretrain(state, "tv/resnet18")
    assert ours.keys() == from_mmpretrain(state, "timm/resnet18").keys()
    assert logit_errors("resnet18_8xb32_in1k", ours, "tv/resnet18")[0] <= 1e-12


# --- weights land where they belong -----------------------------------------------------------------------------------

# timm's patch-merging feature order is the Swin paper's: quadrants (h, w) = (0, 0), (1, 0), (0, 1), (1, 1), each with
# all C channels; mmcv's nn.Unfold writes channel-major, 4 c + 2 h + w.
SWIN_QUADRANTS = [(0, 0), (1, 0), (0, 1), (1, 1)]


def unfold_to_quadrants(mm_value: torch.Tensor) -> torch.Tensor:
    channels = mm_value.shape[-1] // 4
    return mm_value[..., [4 * c + 2 * h + w for h, w in SWIN_QUADRANTS for c in range(channels)]]


PINS = [  # (reference model, unikd key, mmpretrain key, what the unikd tensor is in terms of the mmpretrain one)
    ("resnet18_8xb32_in1k", "conv1.weight", "backbone.conv1.weight", None),
    ("resnet18_8xb32_in1k", "layer3.0.downsample.0.weight", "backbone.layer3.0.downsample.0.weight", None),
    ("resnet18_8xb32_in1k", "layer3.0.downsample.1.running_var", "backbone.layer3.0.downsample.1.running_var", None),
    ("resnet18_8xb32_in1k", "layer4.1.bn2.running_mean", "backbone.layer4.1.bn2.running_mean", None),
    ("resnet18_8xb32_in1k", "fc.weight", "head.fc.weight", None),
    # mmpretrain's RegNet saw BGR: its first input channel is our third.
    ("regnetx-1.6gf_8xb128_in1k", "stem.conv.weight", "backbone.conv1.weight", lambda mm: mm[:, [2, 1, 0]]),
    ("regnetx-1.6gf_8xb128_in1k", "s3.b1.downsample.conv.weight", "backbone.layer3.0.downsample.0.weight", None),
    ("regnetx-1.6gf_8xb128_in1k", "s4.b2.conv3.bn.running_var", "backbone.layer4.1.bn3.running_var", None),
    ("regnetx-1.6gf_8xb128_in1k", "head.fc.bias", "head.fc.bias", None),
    ("mobilenet-v2_8xb32_in1k", "blocks.0.0.conv_dw.weight", "backbone.layer1.0.conv.0.conv.weight", None),
    ("mobilenet-v2_8xb32_in1k", "blocks.6.0.conv_pwl.weight", "backbone.layer7.0.conv.2.conv.weight", None),
    ("mobilenet-v2_8xb32_in1k", "bn2.running_var", "backbone.conv2.bn.running_var", None),
    ("mobilenet-v2_8xb32_in1k", "classifier.weight", "head.fc.weight", None),
    ("shufflenet-v2-1x_16xb64_in1k", "stage2.0.branch1.2.weight", "backbone.layers.0.0.branch1.1.conv.weight", None),
    ("shufflenet-v2-1x_16xb64_in1k", "stage4.3.branch2.4.bias", "backbone.layers.2.3.branch2.1.bn.bias", None),
    ("shufflenet-v2-1x_16xb64_in1k", "conv5.1.running_var", "backbone.layers.3.bn.running_var", None),
    ("shufflenet-v2-1x_16xb64_in1k", "fc.weight", "head.fc.weight", None),
    ("cls_kd_mobilenet_v1", "conv_stem.weight", "backbone.model.0.0.weight", None),
    ("cls_kd_mobilenet_v1", "blocks.3.5.conv_pw.weight", "backbone.model.11.3.weight", None),
    ("cls_kd_mobilenet_v1", "blocks.4.1.bn2.running_var", "backbone.s4.1.4.running_var", None),
    ("cls_kd_mobilenet_v1", "classifier.bias", "head.fc.bias", None),
    ("deit-tiny_4xb256_in1k", "patch_embed.proj.weight", "backbone.patch_embed.projection.weight", None),
    ("deit-tiny_4xb256_in1k", "blocks.5.mlp.fc1.bias", "backbone.layers.5.ffn.layers.0.0.bias", None),
    ("deit-tiny_4xb256_in1k", "norm.weight", "backbone.ln1.weight", None),
    ("deit-tiny_4xb256_in1k", "head.weight", "head.layers.head.weight", None),
    ("swin-tiny_16xb64_in1k", "patch_embed.norm.weight", "backbone.patch_embed.norm.weight", None),
    (
        "swin-tiny_16xb64_in1k",
        "layers.1.blocks.1.attn.relative_position_bias_table",
        "backbone.stages.1.blocks.1.attn.w_msa.relative_position_bias_table",
        None,
    ),
    (
        "swin-tiny_16xb64_in1k",
        "layers.2.downsample.reduction.weight",
        "backbone.stages.1.downsample.reduction.weight",
        unfold_to_quadrants,
    ),
    (
        "swin-tiny_16xb64_in1k",
        "layers.3.downsample.norm.bias",
        "backbone.stages.2.downsample.norm.bias",
        unfold_to_quadrants,
    ),
    ("swin-tiny_16xb64_in1k", "norm.weight", "backbone.norm3.weight", None),
    ("swin-tiny_16xb64_in1k", "head.fc.weight", "head.fc.weight", None),
    # ResNet_CIFAR: our CIFAR zoo keeps conv and BatchNorm in one Sequential.
    ("resnet18_8xb16_cifar100", "stem.0.weight", "backbone.conv1.weight", None),
    ("resnet18_8xb16_cifar100", "stem.1.running_var", "backbone.bn1.running_var", None),
    ("resnet18_8xb16_cifar100", "layer2.0.conv2.1.bias", "backbone.layer2.0.bn2.bias", None),
    ("resnet18_8xb16_cifar100", "layer3.0.shortcut.0.weight", "backbone.layer3.0.downsample.0.weight", None),
    (
        "resnet18_8xb16_cifar100",
        "layer4.0.shortcut.1.running_mean",
        "backbone.layer4.0.downsample.1.running_mean",
        None,
    ),
    ("resnet18_8xb16_cifar100", "fc.weight", "head.fc.weight", None),
    ("resnet50_8xb16_cifar100", "layer1.0.conv3.1.weight", "backbone.layer1.0.bn3.weight", None),
    ("resnet50_8xb16_cifar100", "layer1.0.shortcut.0.weight", "backbone.layer1.0.downsample.0.weight", None),
]


@pytest.mark.parametrize(("name", "ours_key", "mm_key", "expected"), PINS, ids=[f"{p[0]}:{p[1]}" for p in PINS])
def test_weights_land_where_they_belong(name, ours_key, mm_key, expected):
    state = reference_state(name)
    ours = from_mmpretrain(state, reference_model(name)[0])
    assert torch.equal(ours[ours_key], (expected or (lambda mm: mm))(state[mm_key]))


def test_swin_patch_merging_computes_what_mmcvs_unfold_merging_computes():
    """timm's PatchMerging with our weights == mmcv's (unfold 2x2, LayerNorm(4C), Linear) with mmpretrain's; and
    timm computes the relative position index mmpretrain stores (the reference script checks mmpretrain's side)."""
    state = reference_state("swin-tiny_16xb64_in1k")
    model = create_model("timm/swin_tiny_patch4_window7_224", num_classes=1000)
    model.load_state_dict(from_mmpretrain(state, "timm/swin_tiny_patch4_window7_224"))
    features = synthetic_images(2, 28).repeat(1, 32, 1, 1)[:, :96]  # (N, C=96, H, W), stage-1 width
    mm_prefix = "backbone.stages.0.downsample."
    unfolded = F.unfold(features, kernel_size=2, stride=2).transpose(1, 2).float()  # (N, L, 4C), mmcv's order
    normed = F.layer_norm(unfolded, (384,), state[mm_prefix + "norm.weight"], state[mm_prefix + "norm.bias"])
    expected = normed @ state[mm_prefix + "reduction.weight"].T  # (N, L, 2C)
    assert torch.equal(model.layers[0].blocks[0].attn.relative_position_index, relative_position_index(7))
    merging = model.layers[1].downsample
    with torch.no_grad():
        ours = merging(features.permute(0, 2, 3, 1).float()).flatten(1, 2)  # (N, H/2 W/2, 2C)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        # The same weights without the permutation compute something else.
        merging.norm.weight.copy_(state[mm_prefix + "norm.weight"])
        merging.norm.bias.copy_(state[mm_prefix + "norm.bias"])
        merging.reduction.weight.copy_(state[mm_prefix + "reduction.weight"])
        assert (merging(features.permute(0, 2, 3, 1).float()).flatten(1, 2) - expected).abs().max() > 0.1


def test_the_bgr_flip_and_relu_are_needed():
    """Without them the logits are not mmpretrain's (the patch-merging test shows the same for Swin's permutation)."""
    regnet = from_mmpretrain(reference_state("regnetx-1.6gf_8xb128_in1k"), "timm/regnetx_016", bgr=False)
    assert logit_errors("regnetx-1.6gf_8xb128_in1k", regnet, "timm/regnetx_016")[0] > 1e-3
    mobilenet = from_mmpretrain(reference_state("cls_kd_mobilenet_v1"), "timm/mobilenetv1_100")
    assert logit_errors("cls_kd_mobilenet_v1", mobilenet, "timm/mobilenetv1_100")[0] > 1e-3  # timm's default ReLU6


def test_cls_kd_swin_stage_norms_are_returned_apart_and_do_not_change_the_logits():
    cls_kd, standard = reference_state("cls_kd_swin-tiny_16xb64_in1k"), reference_state("swin-tiny_16xb64_in1k")
    name = "timm/swin_tiny_patch4_window7_224"
    ours, expected = from_mmpretrain(cls_kd, name), from_mmpretrain(standard, name)
    assert ours.keys() == expected.keys() and all(torch.equal(ours[key], expected[key]) for key in ours)
    norms = stage_output_norms(cls_kd)
    assert sorted(norms) == [0, 1, 2, 3] and [norms[i]["weight"].shape[0] for i in range(4)] == [96, 192, 384, 768]
    assert torch.equal(norms[2]["bias"], cls_kd["backbone.norm2.bias"])


def test_mmcls_0x_swin_names_load_too():
    """mmcls 0.x named the last stage's norm ``norm`` and stored attention masks (mmpretrain renames, drops them)."""
    state = reference_state("swin-tiny_16xb64_in1k")
    old = OrderedDict((key.replace("backbone.norm3.", "backbone.norm."), value) for key, value in state.items())
    old["backbone.stages.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    name = "timm/swin_tiny_patch4_window7_224"
    ours, expected = from_mmpretrain(old, name), from_mmpretrain(state, name)
    assert ours.keys() == expected.keys() and all(torch.equal(ours[key], expected[key]) for key in ours)


# --- cls_KD distiller files -------------------------------------------------------------------------------------------


def untrained(state: dict) -> OrderedDict[str, torch.Tensor]:
    """A classifier as built and never run (cls_KD's unused self-KD teacher): BatchNorm at its initial state."""
    fresh = OrderedDict()
    for key, value in state.items():
        if key.endswith("num_batches_tracked") or key.endswith("running_mean"):
            fresh[key] = torch.zeros_like(value)
        elif key.endswith("running_var"):
            fresh[key] = torch.ones_like(value)
        else:
            fresh[key] = value + 1
    return fresh


def distiller_state(student: dict, teacher: dict, losses: dict | None = None) -> OrderedDict[str, torch.Tensor]:
    """cls_KD's ClassificationDistiller.state_dict(): its modules teacher, student and distill_losses (ModuleDict)."""
    return OrderedDict(
        [(f"teacher.{key}", value) for key, value in teacher.items()]
        + [(f"student.{key}", value) for key, value in student.items()]
        + [(f"distill_losses.{key}", value) for key, value in (losses or {}).items()]
    )


def pth_transfer(checkpoint: dict) -> dict:
    """What cls_KD's pth_transfer.py writes: the student's keys without their prefix, the optimizer dropped."""
    state = OrderedDict(
        (key[8:], value) for key, value in checkpoint["state_dict"].items() if key.startswith("student.")
    )
    return {key: value for key, value in checkpoint.items() if key != "optimizer"} | {"state_dict": state}


def assert_same_logits(name: str, mm_state: dict) -> None:
    assert logit_errors(name, from_mmpretrain(mm_state, reference_model(name)[0]))[0] <= 1e-12


def test_kd_distiller_checkpoint_gives_student_and_teacher(tmp_path):
    """res34_distill_res18_img: NKD from a ResNet-34 teacher into a ResNet-18 student (NKD has no weights)."""
    student, teacher = reference_state("resnet18_8xb32_in1k"), reference_state("resnet34_8xb32_in1k")
    path = tmp_path / "epoch_100.pth"
    save_mmengine_checkpoint(path, distiller_state(student, teacher), optimizer={"state": {}, "param_groups": []})
    state = load_checkpoint_state(path)
    assert is_distiller_state_dict(state) and not is_mmpretrain_state_dict(state)
    assert_same_logits("resnet18_8xb32_in1k", strip_distiller(state, "student"))
    assert_same_logits("resnet34_8xb32_in1k", strip_distiller(state, "teacher"))
    # pth_transfer.py's output is an mmpretrain file of the student, which strip_distiller passes through.
    transferred = tmp_path / "res18_new.pth"
    torch.save(pth_transfer(torch.load(path, weights_only=True)), transferred)
    checkpoint = torch.load(transferred, weights_only=True)
    assert "optimizer" not in checkpoint and is_mmpretrain_state_dict(checkpoint["state_dict"])
    passed_through = strip_distiller(checkpoint["state_dict"], "student")
    assert passed_through.keys() == student.keys() and all(torch.equal(passed_through[k], student[k]) for k in student)


def test_self_kd_distiller_refuses_its_untrained_teacher(tmp_path):
    """mv1_sd_img: USKD on cls_KD's MobileNetV1; the teacher is built but never used, the weak head is a loss weight."""
    student = reference_state("cls_kd_mobilenet_v1")
    weak_head = {"loss_uskd.fc.weight": torch.zeros(1000, 512), "loss_uskd.fc.bias": torch.zeros(1000)}
    path = tmp_path / "epoch_100.pth"
    save_mmengine_checkpoint(path, distiller_state(student, untrained(student), weak_head))
    state = load_checkpoint_state(path)
    assert_same_logits("cls_kd_mobilenet_v1", strip_distiller(state, "student"))
    with pytest.raises(ModelError) as error:
        strip_distiller(state, "teacher")
    assert str(error.value) == (
        "the teacher. half of this cls_KD distiller checkpoint was never trained (its BatchNorm never saw a batch: a "
        "self-KD run builds an unused teacher); load its student instead"
    )


def test_strip_distiller_errors():
    student = {"student.backbone.conv1.weight": torch.zeros(1), "distill_losses.loss_uskd.fc.weight": torch.zeros(1)}
    with pytest.raises(ModelError) as error:
        strip_distiller(student, "teacher")
    assert str(error.value) == "the cls_KD distiller state_dict has no teacher. weights; use role 'student'"
    with pytest.raises(ModelError) as error:
        strip_distiller(student, "teachers")
    assert str(error.value) == "role must be 'student' or 'teacher', got 'teachers'"
    with pytest.raises(ModelError) as error:
        strip_distiller({"module.student.conv1.weight": torch.zeros(1)}, "student")
    assert str(error.value) == (
        "not a cls_KD distiller or mmpretrain state_dict: keys start neither with student./teacher. nor with "
        "backbone./neck./head. (first key 'module.student.conv1.weight')"
    )


# --- checkpoints that are not the model they would load into ----------------------------------------------------------


def refusal(state: dict, model_name: str) -> str:
    with pytest.raises(ModelError) as error:
        from_mmpretrain(state, model_name)
    return str(error.value)


def test_a_different_depth_or_width_is_refused_with_the_difference_named():
    assert refusal(reference_state("resnet34_8xb32_in1k"), "timm/resnet18") == (
        "the mmpretrain ResNet checkpoint differs from timm/resnet18 in blocks per stage: (3, 4, 6, 3) in the "
        "checkpoint, (2, 2, 2, 2) in timm/resnet18; it fits timm/resnet34 or tv/resnet34"
    )
    assert refusal(reference_state("deit-small_4xb256_in1k"), "timm/deit_tiny_patch16_224") == (
        "the mmpretrain VisionTransformer checkpoint differs from timm/deit_tiny_patch16_224 in embedding width: 384 "
        "in the checkpoint, 192 in timm/deit_tiny_patch16_224; it fits timm/deit_small_patch16_224"
    )


def test_imagenet_and_cifar_resnets_are_told_apart_by_their_stem():
    """mmpretrain's ResNet_CIFAR (3x3 stride-1 stem, no max-pool) is our cifar/resnetN, not timm's or torchvision's;
    an ImageNet ResNet (7x7 stem, max-pool) is not our CIFAR one. Same keys, so the stem's kernel decides."""
    assert refusal(reference_state("resnet18_8xb16_cifar100"), "timm/resnet18") == (
        "the mmpretrain ResNet checkpoint differs from timm/resnet18 in stem: 3x3 conv with 64 channels in the "
        "checkpoint, 7x7 conv with 64 channels in timm/resnet18; it fits cifar/resnet18"
    )
    assert refusal(reference_state("resnet18_8xb32_in1k"), "cifar/resnet18") == (
        "the mmpretrain ResNet checkpoint differs from cifar/resnet18 in stem: 7x7 conv with 64 channels in the "
        "checkpoint, 3x3 conv with 64 channels in cifar/resnet18; it fits timm/resnet18 or tv/resnet18"
    )
    assert refusal(reference_state("resnet34_8xb16_cifar100"), "cifar/resnet18") == (
        "the mmpretrain ResNet checkpoint differs from cifar/resnet18 in blocks per stage: (3, 4, 6, 3) in the "
        "checkpoint, (2, 2, 2, 2) in cifar/resnet18; it fits cifar/resnet34"
    )


def test_the_released_cifar_self_kd_student_loads_by_its_cls_kd_name(tmp_path):
    """res18_sd_cifar: cls_KD's CIFAR-100 USKD ResNet18, as pth_transfer.py writes it, loads through the factory's
    weight loader under the name of its config and computes mmpretrain's logits."""
    from unikd.models import load_model_weights

    assert CLS_KD_DISTILLERS["res18_sd_cifar"] == ("resnet18_8xb16_cifar100", None)
    assert MMPRETRAIN_MODELS["resnet18_8xb16_cifar100"] == ("cifar/resnet18", {})
    student = reference_state("resnet18_8xb16_cifar100")
    weak_head = {"loss_uskd.fc.weight": torch.zeros(100, 256), "loss_uskd.fc.bias": torch.zeros(100)}
    path = tmp_path / "epoch_200.pth"
    save_mmengine_checkpoint(path, distiller_state(student, untrained(student), weak_head))
    model, report = load_model_weights("mmpretrain/resnet18_8xb16_cifar100", 100, path)
    assert report.layout == "mmpretrain" and report.half == "student."
    images, expected = synthetic_images(REFERENCE["batch"], 32), reference_logits("resnet18_8xb16_cifar100")
    with torch.no_grad():
        logits = model.double()(images)
    assert float((logits - expected).abs().max()) <= 1e-12 * float(expected.abs().max())


def test_another_backbone_is_refused():
    assert refusal(reference_state("swin-tiny_16xb64_in1k"), "timm/resnet50") == (
        "the mmpretrain checkpoint holds a SwinTransformer, not the ResNet of timm/resnet50; it fits "
        "timm/swin_tiny_patch4_window7_224"
    )
    assert refusal({"backbone.stem.weight": torch.zeros(1)}, "timm/resnet50") == (
        "the mmpretrain checkpoint holds no backbone unikd can read, not the ResNet of timm/resnet50"
    )


def test_variants_with_the_same_classes_but_other_layers_are_refused():
    state = reference_state("resnet50_8xb32_in1k")
    # ResNetV1d: a deep stem and an average pool before each shortcut's 1x1 conv.
    v1d = OrderedDict(
        (re.sub(r"downsample\.(\d)", lambda m: f"downsample.{int(m[1]) + 1}", k), v) for k, v in state.items()
    )
    assert refusal(v1d, "timm/resnet50") == (
        "the mmpretrain ResNet checkpoint differs from timm/resnet50 in shortcut: average pool + 1x1 conv (ResNetV1d) "
        "in the checkpoint, 1x1 conv in timm/resnet50"
    )
    v1d["backbone.stem.0.conv.weight"] = v1d.pop("backbone.conv1.weight")[:32, :, :3, :3]
    assert "in stem: three 3x3 convs (ResNetV1c/V1d) in the checkpoint, 7x7 conv with 64 channels" in refusal(
        v1d, "timm/resnet50"
    )
    deit = OrderedDict(reference_state("deit-tiny_4xb256_in1k"))
    deit["backbone.dist_token"] = torch.zeros(1, 1, 192)
    assert "in extra tokens: class and distillation tokens in the checkpoint, class token in" in refusal(
        deit, "timm/deit_tiny_patch16_224"
    )
    deit = OrderedDict(
        (k.replace("backbone.ln1.", "backbone.ln2."), v) for k, v in reference_state("deit-tiny_4xb256_in1k").items()
    )
    assert (
        "in output: mean of the patch tokens after a LayerNorm (out_type='avg_featmap') in the checkpoint"
        in refusal(deit, "timm/deit_tiny_patch16_224")
    )


def test_swin_with_another_relative_position_index_is_refused():
    state = OrderedDict(reference_state("swin-tiny_16xb64_in1k"))
    key = "backbone.stages.0.blocks.0.attn.w_msa.relative_position_index"
    state[key] = state[key].T.contiguous()
    assert refusal(state, "timm/swin_tiny_patch4_window7_224") == (
        "the mmpretrain SwinTransformer checkpoint differs from timm/swin_tiny_patch4_window7_224 in relative "
        "position index: another one in the checkpoint, the Swin paper's in timm/swin_tiny_patch4_window7_224"
    )


def test_keys_without_a_place_and_unknown_models_are_refused():
    state = OrderedDict(reference_state("resnet18_8xb32_in1k"))
    state["neck.fc.weight"] = torch.zeros(1)
    assert refusal(state, "timm/resnet18") == (
        "the mmpretrain ResNet checkpoint has 1 key(s) that timm/resnet18 has no place for: neck.fc.weight"
    )
    assert refusal(state, "timm/efficientnet_b0").startswith(
        "no mmpretrain mapping for 'timm/efficientnet_b0': mmpretrain checkpoints load into timm/resnet18, tv/resnet18,"
    )
    assert refusal({"student.backbone.conv1.weight": torch.zeros(1)}, "timm/resnet18") == (
        "a cls_KD distiller state_dict (student./teacher. keys) holds two classifiers: take one with "
        "strip_distiller(state_dict, 'student' or 'teacher') first"
    )
    assert refusal({"conv1.weight": torch.zeros(1)}, "timm/resnet18") == (
        "not an mmpretrain state_dict: its keys do not all start with backbone./neck./head. (first key 'conv1.weight')"
    )
    with pytest.raises(ModelError) as error:
        to_mmpretrain({"extra.weight": torch.zeros(1)}, "timm/resnet18")
    assert str(error.value) == "timm/resnet18 state_dict key 'extra.weight' has no mmpretrain counterpart"


# --- names ------------------------------------------------------------------------------------------------------------


def test_every_mmpretrain_name_maps_to_a_model_the_factory_builds():
    valid = set(list_models())
    for alias, (model_name, kwargs) in MMPRETRAIN_MODELS.items():
        assert model_name in valid and set(kwargs) <= {"act_layer"}, alias
    with torch.device("meta"):
        relu = create_model(
            *MMPRETRAIN_MODELS["mobilenet_v1"][:1], num_classes=10, **MMPRETRAIN_MODELS["mobilenet_v1"][1]
        )
    assert {type(module) for module in relu.modules()} & {torch.nn.ReLU, torch.nn.ReLU6} == {torch.nn.ReLU}
    for student, teacher in CLS_KD_DISTILLERS.values():
        assert student in MMPRETRAIN_MODELS and (teacher is None or teacher in MMPRETRAIN_MODELS)


BACKBONES = {
    "resnet18_8xb32_in1k": "ResNet",
    "resnet34_8xb32_in1k": "ResNet",
    "resnet50_8xb32_in1k": "ResNet",
    "resnet101_8xb32_in1k": "ResNet",
    "mobilenet-v2_8xb32_in1k": "MobileNetV2",
    "shufflenet-v2-1x_16xb64_in1k": "ShuffleNetV2",
    "regnetx-1.6gf_8xb128_in1k": "RegNet",
    "deit-tiny_4xb256_in1k": "VisionTransformer",
    "deit-small_4xb256_in1k": "VisionTransformer",
    "swin-tiny_16xb64_in1k": "SwinTransformer",
    "cls_kd_swin-tiny_16xb64_in1k": "SwinTransformer",
    "cls_kd_mobilenet_v1": "MobileNetV1 (cls_KD)",
    "resnet18_8xb16_cifar100": "ResNet",
    "resnet34_8xb16_cifar100": "ResNet",
    "resnet50_8xb16_cifar100": "ResNet",
}


def test_the_backbone_class_is_recognised():
    assert BACKBONES.keys() == MODELS.keys()
    for name, entry in MODELS.items():
        layout = {key: torch.empty(shape, device="meta") for key, shape, _ in entry["keys"]}
        assert mmpretrain_backbone(layout) == BACKBONES[name], name
