"""unikd.models: the factory, the CIFAR zoo, the USKD mid feature, dense logits, teacher loading and export."""

from __future__ import annotations

import functools
import gc
import re

import pytest
import timm
import torch
import torchvision
from torch import nn

from unikd._serialization import UnreadableFileError
from unikd.models import (
    ModelError,
    create_model,
    export_state_dict,
    feature_dim,
    forward_with_dense_logits,
    forward_with_feature,
    load_exactly,
    load_state_dict_file,
    load_teacher,
)
from unikd.models.cifar import CIFAR_MODELS

# Parameter counts of the CIFAR-100 KD benchmark zoo with num_classes=100, computed from the model definitions of
# megvii-research/mdistiller (commit e8c5bb3, mdistiller/models/cifar/{resnet,resnetv2,wrn,vgg,mobilenetv2,
# ShuffleNetv1,ShuffleNetv2}.py; the same zoo as HobbitLong/RepDistiller). They agree with the rounded counts the
# papers print, e.g. resnet56 0.86M, resnet110 1.74M, resnet8x4 1.23M, resnet32x4 7.43M, wrn_40_2 2.26M,
# vgg13 9.46M, vgg8 3.96M, MobileNetV2 0.81M, ShuffleNetV1 0.95M, ShuffleNetV2 1.36M, ResNet50 23.71M.
# Our VGG convs drop the bias that the benchmark puts before each BatchNorm (redundant there): -0.03%.
BENCHMARK_PARAMS = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "mobilenetv2": 812_836,
    "shufflenetv1": 949_258,
    "shufflenetv2": 1_355_528,
    "resnet18": 11_220_132,
    "resnet34": 21_328_292,
    "resnet50": 23_705_252,
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny inputs gain nothing from intra-op threads, and on a busy 2-core machine spinning threads cost 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _cached_model(name: str, frozen_kwargs: tuple) -> nn.Module:
    return create_model(name, 10, **dict(frozen_kwargs)).eval()


def built(name: str, **kwargs) -> nn.Module:
    """A model in eval mode, built once per test session (building dominates these tests' run time)."""
    model = _cached_model(name, tuple(sorted(kwargs.items())))
    model.zero_grad(set_to_none=True)
    return model


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def all_hooks(model: nn.Module) -> list:
    return [h for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]


def test_cifar_registry_is_the_benchmark_zoo_plus_smallcnn():
    assert set(CIFAR_MODELS) == set(BENCHMARK_PARAMS) | {"smallcnn"}


@pytest.mark.parametrize("name", sorted(BENCHMARK_PARAMS))
def test_cifar_param_count_matches_benchmark(name):
    count = num_params(create_model(f"cifar/{name}", 100))
    assert abs(count - BENCHMARK_PARAMS[name]) / BENCHMARK_PARAMS[name] < 0.005, count


@pytest.mark.parametrize("name", sorted(CIFAR_MODELS))
def test_cifar_models_take_one_channel_28x28(name):
    model = create_model(f"cifar/{name}", 10, in_chans=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_smallcnn_width_and_resnet20_as_mnist_teachers():
    narrow, wide = create_model("cifar/smallcnn", 10, in_chans=1), create_model("cifar/smallcnn", 10, width=32)
    assert [s["num_chs"] for s in narrow.feature_info] == [16, 32, 64]
    assert [s["num_chs"] for s in wide.feature_info] == [32, 64, 128]
    assert feature_dim(wide) == 64
    teacher = create_model("cifar/resnet20", 10, in_chans=1)
    assert teacher.stem[0].in_channels == 1 and teacher(torch.randn(2, 1, 28, 28)).shape == (2, 10)


# (name, kwargs, input size, D of the default "mid" feature): the released USKD choices for the families.
SWIN_64 = {"img_size": 64, "window_size": 2}
FEATURE_CASES = [
    ("timm/resnet18", {}, 32, 256),
    ("timm/resnet34", {}, 32, 256),
    ("timm/resnet50", {}, 32, 1024),
    ("timm/regnetx_016", {}, 32, 408),
    ("timm/mobilenetv1_100", {}, 32, 512),
    ("timm/mobilenetv2_100", {}, 32, 320),
    ("timm/swin_tiny_patch4_window7_224", SWIN_64, 64, 384),
    ("timm/deit_tiny_patch16_224", {"img_size": 32}, 32, 192),
    ("timm/deit3_small_patch16_224", {"img_size": 32}, 32, 384),
    ("tv/resnet18", {}, 32, 256),
    ("tv/shufflenet_v2_x1_0", {}, 32, 464),
    ("tv/mobilenet_v2", {}, 32, 320),
    ("cifar/resnet20", {}, 32, 32),
    ("cifar/resnet8x4", {}, 32, 128),
    ("cifar/wrn_40_2", {}, 32, 64),
    ("cifar/vgg8", {}, 32, 512),
    ("cifar/mobilenetv2", {}, 32, 160),
    ("cifar/shufflenetv1", {}, 32, 480),
    ("cifar/shufflenetv2", {}, 32, 464),
    ("cifar/resnet18", {}, 32, 256),
    ("cifar/smallcnn", {"in_chans": 1}, 28, 32),
]


@pytest.mark.parametrize(("name", "kwargs", "size", "dim"), FEATURE_CASES, ids=[c[0] for c in FEATURE_CASES])
def test_mid_feature_dim_single_pass_not_detached_no_hooks_left(name, kwargs, size, dim):
    model = built(name, **kwargs)
    assert feature_dim(model) == dim
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    calls = []
    counter = first_conv.register_forward_hook(lambda *_: calls.append(1))
    images = torch.randn(2, first_conv.in_channels, size, size)
    logits, feature = forward_with_feature(model, images)
    counter.remove()
    assert calls == [1]  # one forward pass
    assert all_hooks(model) == []
    assert logits.shape == (2, 10) and feature.shape == (2, dim)
    torch.testing.assert_close(logits, model(images))
    feature.sum().backward()  # not detached: the weak loss trains the backbone through the feature
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0


def test_big_models_dims_from_feature_info_without_a_forward():
    calls = []
    for name, dim in [("timm/resnet101", 1024), ("timm/deit_base_patch16_224", 768)]:
        model = create_model(name, 10)
        model.register_forward_pre_hook(lambda *_: calls.append(1))
        assert feature_dim(model) == dim
    assert calls == []


@pytest.mark.parametrize(
    ("name", "kwargs", "size"),
    [
        ("timm/resnet18", {}, 32),
        ("timm/mobilenetv2_100", {}, 32),
        ("timm/swin_tiny_patch4_window7_224", SWIN_64, 64),
        ("timm/deit_tiny_patch16_224", {"img_size": 32}, 32),
        ("cifar/mobilenetv2", {}, 32),
        ("cifar/wrn_16_2", {}, 32),
    ],
)
def test_forward_intermediates_and_hooks_through_a_wrapper_agree(name, kwargs, size):
    model = built(name, **kwargs)
    images = torch.randn(2, 3, size, size)
    logits, feature = forward_with_feature(model, images)  # forward_intermediates
    wrapper = nn.DataParallel(model)  # on CPU: plain delegation; stands in for DistributedDataParallel
    wrapper_calls = []
    wrapper.register_forward_hook(lambda *_: wrapper_calls.append(1))
    wrapped_logits, wrapped_feature = forward_with_feature(wrapper, images)  # hooks, run through the wrapper
    assert wrapper_calls == [1]
    torch.testing.assert_close(wrapped_logits, logits)
    torch.testing.assert_close(wrapped_feature, feature)


@pytest.mark.parametrize(
    ("name", "kwargs", "size", "locations"),
    [
        ("cifar/resnet8", {}, 32, 256),  # layer2 of a CIFAR ResNet: 16x16
        ("timm/resnet18", {}, 64, 16),  # layer3: 4x4
        ("timm/swin_tiny_patch4_window7_224", SWIN_64, 64, 16),  # stage 3: 4x4 tokens, NHWC inside timm's Swin
        ("timm/deit_tiny_patch16_224", {"img_size": 32}, 32, 1),  # the class token
        ("tv/resnet18", {}, 64, 16),  # hooks only
    ],
)
def test_the_unpooled_feature_is_the_locations_whose_mean_is_the_pooled_one(name, kwargs, size, locations):
    model = built(name, **kwargs)
    images = torch.randn(2, 3, size, size)
    logits, pooled = forward_with_feature(model, images)
    for runner in (model, nn.DataParallel(model)):  # forward_intermediates (where the model has it), then hooks
        map_logits, feature_map = forward_with_feature(runner, images, pool=False)
        assert feature_map.shape == (2, locations, pooled.shape[1])
        torch.testing.assert_close(map_logits, logits)
        torch.testing.assert_close(feature_map.mean(1), pooled)
    if locations > 1:  # locations in row-major order, each a vector of channels (not a reshuffle of the map)
        stage = {"cifar/resnet8": "layer2", "timm/swin_tiny_patch4_window7_224": "layers.2"}.get(name, "layer3")
        captured = []
        handle = model.get_submodule(stage).register_forward_hook(lambda m, a, out: captured.append(out))
        model(images)
        handle.remove()
        stage_map = captured[0] if "swin" in name else captured[0].permute(0, 2, 3, 1)  # (N, h, w, D)
        torch.testing.assert_close(feature_map, stage_map.flatten(1, 2))
        assert stage_map.shape[1] == stage_map.shape[2] > 1  # a square map, so a transposed order would show


def test_cifar_zoo_feature_traces_without_graph_breaks():
    model = create_model("cifar/smallcnn", 10, width=2, in_chans=1).eval()
    explanation = torch._dynamo.explain(lambda images: forward_with_feature(model, images))(torch.randn(1, 1, 8, 8))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0)


def test_deit_mid_feature_is_class_token_of_block_6_before_final_norm():
    model = built("timm/deit_tiny_patch16_224", img_size=32)
    tokens = []
    handle = model.blocks[5].register_forward_hook(lambda _m, _a, out: tokens.append(out))
    _, feature = forward_with_feature(model, torch.randn(2, 3, 32, 32))
    handle.remove()
    torch.testing.assert_close(feature, tokens[0][:, 0])
    assert not torch.allclose(feature, model.norm(tokens[0])[:, 0])


def test_layer_by_name_stage_index_and_inner_module():
    model = create_model("cifar/resnet18", 10).eval()
    images = torch.randn(2, 3, 32, 32)
    assert feature_dim(model, "layer2") == 128 and forward_with_feature(model, images, "layer2")[1].shape == (2, 128)
    assert feature_dim(model, 0) == 64 and feature_dim(model, -1) == 512 and feature_dim(model, 4) == 512
    assert feature_dim(model, "layer3.1.conv1") == 256  # not a stage: one dummy forward
    assert forward_with_feature(model, images, "layer3.1.conv1")[1].shape == (2, 256)
    torch.testing.assert_close(forward_with_feature(model, images, "layer3")[1], forward_with_feature(model, images)[1])


def test_feature_dim_dummy_forward_keeps_train_mode_and_batchnorm_statistics():
    model = create_model("tv/resnet18", 10).train()
    running_mean = model.bn1.running_mean.clone()
    assert feature_dim(model) == 256
    assert model.training and all(m.training for m in model.modules())
    torch.testing.assert_close(model.bn1.running_mean, running_mean)


def test_bad_layer_errors_name_the_fix():
    model = create_model("cifar/resnet18", 10)
    with pytest.raises(ModelError, match=r"^layer 'layr3' is not a module of ResNet\. Did you mean: layer3(, |\?)"):
        feature_dim(model, "layr3")
    stages = "0=stem, 1=layer1, 2=layer2, 3=layer3, 4=layer4"
    with pytest.raises(ModelError, match=f"^stage index 7 is out of range for ResNet; stages: {stages}$"):
        forward_with_feature(model, torch.randn(1, 3, 32, 32), 7)
    with pytest.raises(ModelError, match=r"^layer must be 'mid', a stage index or a module name, got 1\.5$"):
        feature_dim(model, 1.5)
    with pytest.raises(ModelError, match=r"^SqueezeNet has no known stages, so layer='mid' is undefined for it; pass "):
        feature_dim(create_model("tv/squeezenet1_1", 10))


@pytest.mark.parametrize(
    ("name", "kwargs", "size", "locations"),
    [
        ("cifar/resnet8", {}, 32, 64),
        ("cifar/wrn_16_2", {}, 32, 64),
        ("cifar/shufflenetv2", {}, 32, 16),
        ("timm/resnet18", {}, 64, 4),
        ("timm/swin_tiny_patch4_window7_224", SWIN_64, 64, 4),
        ("tv/resnet18", {}, 64, 4),
        ("tv/shufflenet_v2_x1_0", {}, 64, 4),
    ],
)
def test_dense_logits_average_to_the_logits(name, kwargs, size, locations):
    model = built(name, **kwargs)
    images = torch.randn(2, 3, size, size)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    calls = []
    counter = first_conv.register_forward_hook(lambda *_: calls.append(1))
    logits, dense_logits = forward_with_dense_logits(model, images)
    counter.remove()
    assert calls == [1]  # one forward pass
    assert dense_logits.shape == (2, locations, 10)
    # Average pooling and a linear head commute: the mean over locations of per-location logits is the logits.
    torch.testing.assert_close(dense_logits.mean(dim=1), logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, model(images))
    assert all_hooks(model) == []


@pytest.mark.parametrize(
    ("name", "kwargs", "size"), [("cifar/resnet8", {}, 32), ("timm/swin_tiny_patch4_window7_224", SWIN_64, 64)]
)
def test_dense_logits_through_a_wrapper_use_hooks_and_agree(name, kwargs, size):
    model = built(name, **kwargs)
    images = torch.randn(2, 3, size, size)
    logits, dense_logits = forward_with_dense_logits(model, images)
    wrapped_logits, wrapped_dense_logits = forward_with_dense_logits(nn.DataParallel(model), images)
    torch.testing.assert_close(wrapped_logits, logits)
    torch.testing.assert_close(wrapped_dense_logits, dense_logits)
    assert all_hooks(model) == []


def test_dense_logits_refuse_vits():
    model = create_model("timm/deit_tiny_patch16_224", 10, img_size=32)
    with pytest.raises(
        ModelError, match=r"^dense logits do not apply to VisionTransformer: a ViT classifies its class"
    ):
        forward_with_dense_logits(model, torch.randn(1, 3, 32, 32))


def test_no_hooks_and_no_object_growth_over_1000_calls():
    model = create_model("cifar/smallcnn", 10, width=2, in_chans=1).eval()
    images = torch.randn(1, 1, 8, 8)

    def run(calls: int) -> None:
        with torch.no_grad():
            for _ in range(calls):
                forward_with_feature(model, images)
                forward_with_dense_logits(model, images)

    run(20)
    gc.collect()
    objects_before = len(gc.get_objects())
    run(1000)
    gc.collect()
    assert len(gc.get_objects()) - objects_before < 50
    assert all_hooks(model) == []


# --- the factory ---------------------------------------------------------------------------------------------


def test_kwargs_pass_through():
    assert create_model("timm/resnet18", 10, in_chans=1).conv1.in_channels == 1
    assert create_model("timm/deit_tiny_patch16_224", 10, img_size=32).patch_embed.img_size == (32, 32)
    assert isinstance(create_model("tv/shufflenet_v2_x1_0", 7), torchvision.models.ShuffleNetV2)


def test_unknown_names_list_the_closest():
    with pytest.raises(ModelError, match=r"^unknown model 'cifar/resnet9': cifar/ has no model 'resnet9'\. Did you"):
        create_model("cifar/resnet9", 10)
    with pytest.raises(ModelError) as error:
        create_model("resnet18", 10)
    assert str(error.value) == (
        "unknown model 'resnet18': names are '<namespace>/<model>' with namespace one of timm, tv, cifar, mdistiller, "
        "mmpretrain. Did you mean: timm/resnet18, tv/resnet18, cifar/resnet18, mdistiller/ResNet18?"
    )
    with pytest.raises(
        ModelError, match=r"^unknown model 'timm/deit_tiny': timm/ has no model 'deit_tiny'\. .*deit_tiny_"
    ):
        create_model("timm/deit_tiny", 10)


def test_bad_kwargs_are_named():
    with pytest.raises(ModelError, match=r"^cifar/resnet8 does not accept the keyword arguments \['depth'\]: "):
        create_model("cifar/resnet8", 10, depth=3)


def test_pretrained_without_hub_says_to_pass_a_local_checkpoint(monkeypatch):
    huggingface_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(huggingface_constants, "HF_HUB_OFFLINE", True)  # fail at once instead of retrying
    with pytest.raises(ModelError, match=r"^could not download pretrained weights for timm/resnet18 \(") as error:
        create_model("timm/resnet18", 10, pretrained=True)
    assert str(error.value).endswith(
        "This machine has no model hub access: build the model with pretrained=False and load a local checkpoint "
        "instead (config key model.teacher_checkpoint, or unikd.models.load_teacher(name, num_classes, path))."
    )
    with pytest.raises(ModelError, match=r"^cifar/resnet8 has no pretrained weights; train it, or pass a checkpoint"):
        create_model("cifar/resnet8", 10, pretrained=True)


# --- teachers and export ---------------------------------------------------------------------------------------


def _outputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_export_round_trip_and_teacher_is_frozen(tmp_path, suffix):
    student = create_model("cifar/resnet8", 10)
    student(torch.randn(4, 3, 32, 32))  # move BatchNorm statistics away from their init
    path = export_state_dict(student, tmp_path / f"student{suffix}")
    assert [p.name for p in tmp_path.iterdir()] == [f"student{suffix}"]  # no temp file left
    fresh = create_model("cifar/resnet8", 10)
    fresh.load_state_dict(load_state_dict_file(path), strict=True)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_outputs(fresh, images), _outputs(student, images))
    teacher = load_teacher("cifar/resnet8", 10, path)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    torch.testing.assert_close(teacher(images), _outputs(student, images))


def test_exported_timm_and_torchvision_students_load_into_their_libraries(tmp_path):
    export_state_dict(create_model("timm/resnet18", 10), tmp_path / "timm.safetensors")
    timm.create_model("resnet18", num_classes=10).load_state_dict(
        load_state_dict_file(tmp_path / "timm.safetensors"), strict=True
    )
    export_state_dict(create_model("tv/shufflenet_v2_x1_0", 10), tmp_path / "tv.pt")
    torchvision.models.shufflenet_v2_x1_0(num_classes=10).load_state_dict(torch.load(tmp_path / "tv.pt"), strict=True)


def test_export_unwraps_ddp_and_compiled_models_and_unikd_checkpoints(tmp_path):
    student = create_model("cifar/resnet8", 10)
    expected = set(student.state_dict())
    for index, wrapped in enumerate([nn.DataParallel(student), torch.compile(student)]):
        export_state_dict(wrapped, tmp_path / f"w{index}.pt")
        assert set(load_state_dict_file(tmp_path / f"w{index}.pt")) == expected
    checkpoint = {
        "format": "unikd-checkpoint",
        "version": 1,
        "model": student.state_dict(),
        "method": {"w": torch.ones(1)},
    }
    export_state_dict(checkpoint, tmp_path / "from_ckpt.safetensors")
    assert set(load_state_dict_file(tmp_path / "from_ckpt.safetensors")) == expected  # no weak head


def test_load_exactly_lists_every_entry_that_does_not_fit_and_loads_only_a_state_dict_that_fits():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    state_dict = {key: value.clone() for key, value in model.state_dict().items()}
    fitting = {key: torch.full_like(value, 0.5) for key, value in state_dict.items()}
    broken = {**fitting, "1.weight": torch.zeros(5, 4), "2.bias": torch.zeros(2)}
    del broken["0.bias"]
    with pytest.raises(ModelError) as error:
        load_exactly(model, broken, "w.pt, loaded into a toy,")
    assert str(error.value) == (
        "w.pt, loaded into a toy, does not fit the model: missing entries (1): 0.bias; unexpected entries (1): 2.bias; "
        "shape mismatches (1): 1.weight: file (5, 4) vs model (2, 4)"
    )
    assert all(torch.equal(model.state_dict()[key], value) for key, value in state_dict.items())  # untouched
    load_exactly(model, fitting, "w.pt")
    assert all(torch.equal(model.state_dict()[key], value) for key, value in fitting.items())


def test_failed_export_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = export_state_dict({"w": torch.zeros(2)}, tmp_path / "weights.safetensors")

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export_state_dict({"w": torch.ones(2)}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]
    torch.testing.assert_close(load_state_dict_file(path)["w"], torch.zeros(2))
    with pytest.raises(ModelError, match=r"^export path .*weights\.bin must end in \.safetensors, \.pt or \.pth$"):
        export_state_dict({"w": torch.ones(2)}, tmp_path / "weights.bin")
    with pytest.raises(ModelError, match=r"^cannot export a dict with non-tensor values \(epoch\); pass a model, "):
        export_state_dict({"w": torch.ones(2), "epoch": 3}, tmp_path / "weights.pt")


def test_teacher_from_unikd_checkpoint_and_prefixed_state_dicts(tmp_path):
    source = create_model("cifar/resnet8", 10)
    images = torch.randn(2, 3, 32, 32)
    state = source.state_dict()
    files = {
        "unikd.pt": {"format": "unikd-checkpoint", "version": 1, "model_name": "cifar/resnet8", "num_classes": 10,
                     "model": state, "method": {}, "epoch": 3, "config": {"model": {"name": "cifar/resnet8"}}},
        "ddp.pt": {f"module.{k}": v for k, v in state.items()},
        "compiled.pt": {f"_orig_mod.{k}": v for k, v in state.items()},
        "timm_train_script.pt": {"state_dict": state, "epoch": 3},
    }  # fmt: skip
    for filename, content in files.items():
        torch.save(content, tmp_path / filename)
        teacher = load_teacher("cifar/resnet8", 10, tmp_path / filename)
        torch.testing.assert_close(teacher(images), _outputs(source, images))


def test_mismatched_checkpoint_lists_keys_and_shapes(tmp_path):
    checkpoint = {"format": "unikd-checkpoint", "version": 1, "model_name": "cifar/resnet8", "num_classes": 10,
                  "model": create_model("cifar/resnet8", 10).state_dict()}  # fmt: skip
    torch.save(checkpoint, tmp_path / "r8.pt")
    with pytest.raises(ModelError) as error:
        load_teacher("cifar/resnet8", 5, tmp_path / "r8.pt")
    assert str(error.value) == (
        f"{tmp_path / 'r8.pt'} (unikd training checkpoint, epoch ?; native layout; saved from cifar/resnet8 with 10 "
        "classes), loaded into cifar/resnet8 with 5 classes, does not fit the model: shape mismatches (2): fc.weight: "
        "checkpoint (10, 64) vs model (5, 64), fc.bias: checkpoint (10,) vs model (5,); the classifier differs: use "
        "weights trained on a dataset with that many classes"
    )
    with pytest.raises(ModelError) as error:
        load_teacher("cifar/resnet14", 10, tmp_path / "r8.pt")
    assert str(error.value) == (
        f"{tmp_path / 'r8.pt'} (torch zip file; unikd training checkpoint, epoch ?) fits no weights layout of "
        "cifar/resnet14; tried native (36 missing, 0 unexpected), mdistiller (not applicable: no mdistiller key "
        "names), mmpretrain (not applicable: no backbone./head. keys). Closest, native: missing keys (36): "
        "layer1.1.conv1.0.weight, "
        "layer1.1.conv1.1.weight, layer1.1.conv1.1.bias, .... Check that the file holds a cifar/resnet14 (recorded: "
        "cifar/resnet8), or name its format (one of native, mdistiller, mmpretrain)"
    )
    torch.save({**checkpoint["model"], "extra.weight": torch.ones(1)}, tmp_path / "extra.pt")
    with pytest.raises(ModelError, match=r"Closest, native: unexpected keys \(1\): extra\.weight\. Check that"):
        load_teacher("cifar/resnet8", 10, tmp_path / "extra.pt")


class _NotAllowedInWeightsOnly:
    pass


def test_pickled_objects_missing_and_foreign_checkpoints(tmp_path):
    torch.save({"model": _NotAllowedInWeightsOnly()}, tmp_path / "pickled.pt")
    with pytest.raises(ModelError) as error:
        load_state_dict_file(tmp_path / "pickled.pt")
    assert str(error.value) == (
        f"{tmp_path / 'pickled.pt'} pickles a whole test_models._NotAllowedInWeightsOnly object, not a state_dict, "
        "and unikd never builds pickled objects; in the project that wrote it, save model.state_dict() instead"
    )
    with pytest.raises(UnreadableFileError, match=r"^file not found: .*absent\.pt$"):
        load_teacher("cifar/resnet8", 10, tmp_path / "absent.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ModelError, match=r"list\.pt holds no state_dict: expected a dict of tensors, .*found list$"):
        load_state_dict_file(tmp_path / "list.pt")
    (tmp_path / "corrupt.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UnreadableFileError, match=r"^cannot read .*corrupt\.safetensors: not a PyTorch or safet"):
        load_teacher("cifar/resnet8", 10, tmp_path / "corrupt.safetensors")
    torch.save({"epoch": 3, "optimizer": {}}, tmp_path / "no_weights.pt")
    with pytest.raises(ModelError, match=re.escape("found dict with keys ['epoch', 'optimizer']")):
        load_state_dict_file(tmp_path / "no_weights.pt")


def test_torchvision_models_take_the_trainers_rgb_in_chans_and_reject_others():
    model = create_model("tv/shufflenet_v2_x1_0", 10, in_chans=3)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    with pytest.raises(
        ModelError, match=r"tv/shufflenet_v2_x1_0: torchvision models take 3-channel images, got in_chans=1"
    ):
        create_model("tv/shufflenet_v2_x1_0", 10, in_chans=1)


# --- initialisation (init=): which reference a fresh model follows ----------------------------------------------


def _fresh(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return create_model(f"cifar/{name}", 100, **kwargs)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("name", ["resnet20", "resnet8x4", "resnet18", "resnet50"])
def test_resnet_default_init_is_mdistillers_and_unchanged(name):
    default = _fresh(name)
    assert _same_weights(default, _fresh(name, init="kaiming")) and _same_weights(
        default, _fresh(name, init="mdistiller")
    )
    conv = default.stem[0]
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert abs(conv.weight.std().item() / (2 / fan_out) ** 0.5 - 1) < 0.15  # Kaiming normal, fan-out


def _linear_default_bound(linear: nn.Linear) -> float:
    return 1 / linear.in_features**0.5  # PyTorch's default: uniform(+-1/sqrt(fan_in)) for weight and bias


@pytest.mark.parametrize("name", ["vgg8", "vgg13", "mobilenetv2"])
def test_mdistiller_init_vgg_and_mobilenetv2_classifier_is_normal_001_with_zero_bias(name):
    model = _fresh(name, init="mdistiller")
    assert abs(model.fc.weight.std().item() - 0.01) < 0.0005 and abs(model.fc.weight.mean().item()) < 0.0005
    assert not model.fc.bias.any()
    assert model.fc.weight.abs().max().item() > 0.03  # a normal's tail, not a uniform(+-0.044) default
    default = _fresh(name)
    assert default.fc.bias.any() and default.fc.weight.abs().max().item() <= _linear_default_bound(default.fc)


def test_mdistiller_init_wrn_zeroes_only_the_classifier_bias():
    model, default = _fresh("wrn_16_2", init="mdistiller"), _fresh("wrn_16_2")
    assert not model.fc.bias.any() and default.fc.bias.any()
    torch.testing.assert_close(model.fc.weight, default.fc.weight, rtol=0, atol=0)  # same draws, default weight


@pytest.mark.parametrize("name", ["shufflenetv1", "shufflenetv2"])
def test_mdistiller_init_shufflenets_keep_pytorchs_default_convs(name):
    model, default = _fresh(name, init="mdistiller"), _fresh(name)
    conv = model.conv_head[0] if name == "shufflenetv2" else model.layer3[-1].conv3[0]
    default_conv = default.conv_head[0] if name == "shufflenetv2" else default.layer3[-1].conv3[0]
    fan_in = conv.weight[0].numel()
    # kaiming_uniform_(a=sqrt(5)), PyTorch's Conv2d default: uniform(+-1/sqrt(fan_in)); Kaiming normal exceeds it.
    assert conv.weight.abs().max().item() <= 1 / fan_in**0.5
    assert abs(conv.weight.std().item() * (3 * fan_in) ** 0.5 - 1) < 0.05
    assert default_conv.weight.abs().max().item() > 1 / fan_in**0.5


@pytest.mark.parametrize("name", ["resnet18", "resnet20", "resnet50"])
def test_mmpretrain_init_zeroes_each_residual_branchs_last_bn_and_draws_the_head_from_n001(name):
    model = _fresh(name, init="mmpretrain")
    blocks = [m for m in model.modules() if hasattr(m, "shortcut")]
    for block in blocks:
        last = (block.conv3 if hasattr(block, "conv3") else block.conv2)[1]
        assert not last.weight.any() and not last.bias.any()
        assert bool((block.conv1[1].weight == 1).all())
        if isinstance(block.shortcut, nn.Sequential):
            assert bool((block.shortcut[1].weight == 1).all())  # the downsample BN is not zeroed
    assert bool((model.stem[1].weight == 1).all())
    assert abs(model.fc.weight.std().item() - 0.01) < 0.001 and not model.fc.bias.any()


def test_init_errors_name_the_choices():
    with pytest.raises(ModelError, match=r"^init='torch' is not one of kaiming, mdistiller, mmpretrain$"):
        create_model("cifar/resnet8", 10, init="torch")
    with pytest.raises(
        ModelError, match=r"^init='mmpretrain' follows mmpretrain's ResNet_CIFAR, which has no VGG; use"
    ):
        create_model("cifar/vgg8", 10, init="mmpretrain")
    with pytest.raises(ModelError, match=r"^init='mdistiller': mdistiller has no SmallCNN; use init='kaiming'$"):
        create_model("cifar/smallcnn", 10, init="mdistiller")
