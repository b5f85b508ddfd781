"""Weights files in the layouts the field ships load into unikd's models and compute what the original computes.

CRD / mdistiller CIFAR files are written here in their real on-disk layouts (legacy serialisation, CUDA location
tags, ``{"epoch", "model", "accuracy", "optimizer"}``; ``{"model"}``; whole distillers under ``module.student.`` /
``module.teacher.``) from our models through the inverse key mapping; the reference logits come from
``mdistiller_forward`` (mdistiller's arithmetic on mdistiller's key names), and the key lists from
``tests/data/mdistiller_state_dicts.json`` (see tests/data/REFERENCE.md).
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import safetensors
import torch
from mdistiller_forward import mdistiller_logits
from torch import nn
from torch_files import save

from unikd._serialization import UnreadableFileError
from unikd.models import (
    FORMATS,
    LAYOUTS,
    ModelError,
    create_model,
    export_state_dict,
    init_student_from_file,
    list_models,
    load_model_weights,
    load_teacher,
    resolve_model_name,
)
from unikd.models._mdistiller import MDISTILLER_MODELS, from_mdistiller, key_map, to_mdistiller
from unikd.models._mmpretrain import MMPRETRAIN_MODELS, to_mmpretrain

REFERENCE = json.loads((Path(__file__).parent / "data" / "mdistiller_state_dicts.json").read_text())["models"]
TEACHERS = ("resnet56", "resnet110", "resnet32x4", "wrn_40_2", "vgg13", "ResNet50")
STUDENTS = (
    "resnet20",
    "resnet32",
    "resnet8x4",
    "wrn_16_2",
    "wrn_40_1",
    "vgg8",
    "MobileNetV2",
    "ShuffleV1",
    "ShuffleV2",
)
NUM_CLASSES = 100


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_reference_lists_the_fifteen_models_of_the_tables():
    assert set(REFERENCE) == set(TEACHERS) | set(STUDENTS)


def _arch(name: str) -> str:
    return MDISTILLER_MODELS[name]


def trained_looking(name: str, seed: int = 0) -> nn.Module:
    """Our model for mdistiller's ``name`` with every BatchNorm's statistics and affine parameters randomised (a
    fresh model has identical BatchNorms, which would hide two swapped ones)."""
    torch.manual_seed(seed)
    model = create_model(f"cifar/{_arch(name)}", NUM_CLASSES).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.2, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0.0, 0.1, generator=generator)
                module.num_batches_tracked.fill_(1000)
    return model


def mdistiller_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state_dict in mdistiller's names as its training leaves one: VGG conv biases are not zero."""
    state_dict = to_mdistiller(trained_looking(name, seed).state_dict(), _arch(name))
    generator = torch.Generator().manual_seed(seed + 1)
    for key, value in state_dict.items():
        if key.endswith(".bias") and state_dict[key.removesuffix("bias") + "weight"].dim() == 4:
            state_dict[key] = 0.1 * torch.randn(value.shape, generator=generator)
    return state_dict


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_mapped_key_names_shapes_and_order_equal_the_reference_exactly(name):
    with torch.device("meta"):
        ours = create_model(f"cifar/{_arch(name)}", NUM_CLASSES).state_dict()
    theirs = to_mdistiller(ours, _arch(name))
    assert [(key, list(value.shape)) for key, value in theirs.items()] == [(k, s) for k, s in REFERENCE[name]]


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_round_trip_through_the_mdistiller_layout_is_exact(name):
    ours = trained_looking(name).state_dict()
    back = from_mdistiller(to_mdistiller(ours, _arch(name)), _arch(name))
    assert list(back) == list(ours)
    assert all(torch.equal(back[key], ours[key]) for key in ours)


PINNED = [  # (model, mdistiller key, our key): layers checked by hand against mdistiller's model files
    ("resnet8x4", "conv1.weight", "stem.0.weight"),  # first conv
    ("resnet8x4", "layer1.0.downsample.0.weight", "layer1.0.shortcut.0.weight"),  # 32 -> 64 shortcut
    ("resnet8x4", "layer3.0.bn2.running_var", "layer3.0.conv2.1.running_var"),  # last BN
    ("resnet8x4", "fc.weight", "fc.weight"),
    ("ResNet50", "layer2.0.shortcut.1.running_mean", "layer2.0.shortcut.1.running_mean"),
    ("ResNet50", "layer4.2.bn3.weight", "layer4.2.conv3.1.weight"),
    ("ResNet50", "linear.bias", "fc.bias"),
    ("wrn_40_2", "block2.layer.0.convShortcut.weight", "layer2.0.shortcut.weight"),
    ("wrn_40_2", "bn1.running_mean", "norm.0.running_mean"),  # the final pre-pool BN
    ("vgg13", "block1.3.weight", "layer2.2.0.weight"),  # stage 2 opens with a max-pool: our index 2 is its conv 3
    ("vgg13", "block4.4.running_var", "layer5.1.1.running_var"),
    ("vgg13", "classifier.weight", "fc.weight"),
    ("MobileNetV2", "blocks.1.0.conv.3.weight", "blocks.1.0.conv.1.0.weight"),  # the depthwise conv
    ("MobileNetV2", "conv2.1.bias", "conv_head.1.bias"),
    ("MobileNetV2", "classifier.0.weight", "fc.weight"),
    ("ShuffleV1", "layer1.0.conv1.weight", "layer1.0.conv1.0.weight"),  # dense after the stem (groups 1)
    ("ShuffleV1", "linear.weight", "fc.weight"),
    ("ShuffleV2", "layer1.0.conv1.weight", "layer1.0.shortcut_branch.0.0.weight"),  # DownBlock left: dw 3x3/2
    ("ShuffleV2", "layer1.0.conv3.weight", "layer1.0.branch.0.0.weight"),  # DownBlock right: 1x1 first
    ("ShuffleV2", "layer1.1.bn3.running_mean", "layer1.1.branch.2.1.running_mean"),
    ("ShuffleV2", "bn2.weight", "conv_head.1.weight"),
]


@pytest.mark.parametrize(("name", "theirs", "ours"), PINNED, ids=[f"{n}:{t}" for n, t, _ in PINNED])
def test_hand_checked_layers_land_in_place(name, theirs, ours):
    assert key_map(_arch(name))[ours] == theirs
    state_dict = mdistiller_state_dict(name)
    torch.testing.assert_close(from_mdistiller(state_dict, _arch(name))[ours], state_dict[theirs], rtol=0, atol=0)


def test_pinned_shapes_say_what_the_layers_are():
    shapes = {name: dict(entries) for name, entries in REFERENCE.items()}
    assert shapes["ShuffleV2"]["layer1.0.conv1.weight"] == [24, 1, 3, 3]  # depthwise on the block input
    assert shapes["ShuffleV2"]["layer1.0.conv3.weight"] == [58, 24, 1, 1]  # 1x1 on the block input
    assert shapes["MobileNetV2"]["blocks.1.0.conv.3.weight"] == [48, 1, 3, 3]
    assert shapes["resnet8x4"]["layer1.0.downsample.0.weight"] == [64, 32, 1, 1]


def _checked_against_mdistiller(name: str, model: nn.Module, state_dict: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        expected = mdistiller_logits(name, state_dict, images())
        logits = model(images())
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    return (logits - expected).abs().max().item()


@pytest.mark.parametrize("name", TEACHERS)
def test_crd_teacher_files_legacy_from_cuda_load_and_compute_mdistillers_logits(tmp_path, name):
    state_dict = mdistiller_state_dict(name)
    path = tmp_path / name / "ckpt_epoch_240.pth"
    path.parent.mkdir()
    crd_file = {"epoch": 240, "model": state_dict, "accuracy": torch.tensor(72.5), "optimizer": {"state": {}}}
    save(crd_file, path, legacy=True, cuda=True)
    teacher, report = load_model_weights(f"mdistiller/{name}", NUM_CLASSES, path, role="teacher")
    assert report.describe() == (
        f"{path}: torch legacy file; CRD teacher file, epoch 240, accuracy 72.50; mdistiller layout"
    )
    _checked_against_mdistiller(name, teacher, state_dict)
    frozen = load_teacher(f"cifar/{_arch(name)}", NUM_CLASSES, path)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())


@pytest.mark.parametrize("name", STUDENTS)
def test_mdistiller_student_best_files_load_and_compute_mdistillers_logits(tmp_path, name):
    state_dict = mdistiller_state_dict(name)
    save({"model": state_dict}, tmp_path / "student_best")
    model, report = load_model_weights(f"mdistiller/{name}", NUM_CLASSES, tmp_path / "student_best")
    assert (report.container, report.layout, report.serialization) == (
        "mdistiller student checkpoint",
        "mdistiller",
        "torch zip",
    )
    _checked_against_mdistiller(name, model, state_dict)


def test_vgg_conv_bias_folding_is_exact_in_train_mode_too():
    state_dict = mdistiller_state_dict("vgg8")
    model = create_model("cifar/vgg8", NUM_CLASSES)
    model.load_state_dict(from_mdistiller(state_dict, "vgg8"))
    batch = images(8)
    theirs = {key: value.clone() for key, value in state_dict.items()}
    expected = mdistiller_logits("vgg8", theirs, batch, train=True)  # updates theirs' running statistics
    logits = model.train()(batch)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
    # The folded running mean stays its running mean minus the conv bias after the update.
    torch.testing.assert_close(
        from_mdistiller(theirs, "vgg8")["layer1.0.1.running_mean"], model.state_dict()["layer1.0.1.running_mean"]
    )
    assert not torch.equal(theirs["block0.1.running_mean"], state_dict["block0.1.running_mean"])  # it did update


def _distiller_checkpoint(teacher: str, student: str) -> dict:
    """mdistiller's best / latest: the whole DataParallel-wrapped distiller (here a FitNet with its regressor)."""
    model = {f"module.teacher.{key}": value for key, value in mdistiller_state_dict(teacher, 1).items()}
    model.update({f"module.student.{key}": value for key, value in mdistiller_state_dict(student, 2).items()})
    model["module.conv_reg.weight"] = torch.ones(8, 4, 1, 1)
    return {"epoch": 240, "model": model, "optimizer": {"state": {}}, "best_acc": 74.1}


def test_whole_distiller_checkpoint_gives_the_half_the_role_asks_for(tmp_path):
    save(_distiller_checkpoint("resnet32x4", "resnet8x4"), tmp_path / "best")
    teacher, teacher_report = load_model_weights(
        "mdistiller/resnet32x4", NUM_CLASSES, tmp_path / "best", role="teacher"
    )
    student, student_report = load_model_weights("mdistiller/resnet8x4", NUM_CLASSES, tmp_path / "best")
    assert (teacher_report.half, student_report.half) == ("module.teacher.", "module.student.")
    assert "module.conv_reg.weight" not in teacher_report.ignored  # prefixes are reported stripped
    assert "conv_reg.weight" in teacher_report.ignored and "conv_reg.weight" in student_report.ignored
    assert student_report.describe() == (
        f"{tmp_path / 'best'}: torch zip file; mdistiller checkpoint, epoch 240; mdistiller layout; the student half "
        f"(module.student.* keys); {len(student_report.ignored)} other keys ignored"
    )
    _checked_against_mdistiller("resnet32x4", teacher, mdistiller_state_dict("resnet32x4", 1))
    _checked_against_mdistiller("resnet8x4", student, mdistiller_state_dict("resnet8x4", 2))
    assert isinstance(load_teacher("cifar/resnet32x4", NUM_CLASSES, tmp_path / "best"), nn.Module)


def test_layout_override_and_bad_names(tmp_path):
    save({"model": mdistiller_state_dict("resnet20")}, tmp_path / "student_best")
    _, report = load_model_weights("cifar/resnet20", NUM_CLASSES, tmp_path / "student_best", layout="mdistiller")
    assert report.layout == "mdistiller"
    with pytest.raises(ModelError) as error:
        load_model_weights("cifar/resnet20", NUM_CLASSES, tmp_path / "student_best", layout="native")
    assert str(error.value).startswith(
        f"{tmp_path / 'student_best'} (torch zip file; mdistiller student checkpoint) fits no weights layout of "
        "cifar/resnet20; tried native (126 missing, 126 unexpected). Closest, native: missing keys (126): "
        "stem.0.weight, stem.1.weight, stem.1.bias, ...; unexpected keys (126): conv1.weight, bn1.weight, bn1.bias, "
        "..."
    )
    with pytest.raises(ModelError, match=r"^unknown weights format 'crd'; choose one of auto, native, mdistiller, mm"):
        load_model_weights("cifar/resnet20", NUM_CLASSES, tmp_path / "student_best", layout="crd")
    assert ("auto", *LAYOUTS) == FORMATS and LAYOUTS == ("native", "mdistiller", "mmpretrain")


def test_another_architecture_names_the_closest_layout_in_its_own_key_names(tmp_path):
    save({"model": mdistiller_state_dict("resnet20")}, tmp_path / "student_best")
    with pytest.raises(ModelError) as error:
        load_teacher("cifar/resnet32", NUM_CLASSES, tmp_path / "student_best")
    assert str(error.value) == (
        f"{tmp_path / 'student_best'} (torch zip file; mdistiller student checkpoint) fits no weights layout of "
        "cifar/resnet32; tried native (198 missing, 126 unexpected), mdistiller (72 missing, 0 unexpected), "
        "mmpretrain (not applicable: no backbone./head. keys). Closest, mdistiller: missing keys (72): "
        "layer1.3.conv1.weight, layer1.3.bn1.weight, layer1.3.bn1.bias, .... Check that the file holds a "
        "cifar/resnet32, or name its format (one of native, mdistiller, mmpretrain)"
    )


def test_a_teacher_for_another_class_count_is_refused_with_the_fix(tmp_path):
    save({"epoch": 240, "model": mdistiller_state_dict("resnet20"), "accuracy": 69.1}, tmp_path / "t.pth", legacy=True)
    with pytest.raises(ModelError) as error:
        load_teacher("cifar/resnet20", 10, tmp_path / "t.pth")
    assert str(error.value) == (
        f"{tmp_path / 't.pth'} (CRD teacher file, epoch 240, accuracy 69.10; mdistiller layout), loaded into "
        "cifar/resnet20 with 10 classes, does not fit the model: shape mismatches (2): fc.weight: checkpoint "
        "(100, 64) vs model (10, 64), fc.bias: checkpoint (100,) vs model (10,); the classifier differs: use weights "
        "trained on a dataset with that many classes"
    )


def test_student_initialised_from_a_file_of_another_class_count_gets_a_fresh_classifier(tmp_path):
    state_dict = mdistiller_state_dict("resnet8x4")
    save({"model": state_dict}, tmp_path / "student_best")
    torch.manual_seed(3)
    student = create_model("cifar/resnet8x4", 10)
    fresh_classifier = student.fc.weight.detach().clone()
    report = init_student_from_file(student, "cifar/resnet8x4", tmp_path / "student_best")
    assert report.reinitialized == ["fc.bias", "fc.weight"]
    assert report.describe().endswith("; re-initialised (class count differs): fc.bias, fc.weight")
    torch.testing.assert_close(student.fc.weight, fresh_classifier, rtol=0, atol=0)
    torch.testing.assert_close(student.stem[0].weight, state_dict["conv1.weight"], rtol=0, atol=0)
    same_classes = create_model("cifar/resnet8x4", NUM_CLASSES)
    assert init_student_from_file(same_classes, "mdistiller/resnet8x4", tmp_path / "student_best").reinitialized == []
    torch.testing.assert_close(same_classes.fc.weight, state_dict["fc.weight"], rtol=0, atol=0)
    with pytest.raises(ModelError, match=r"fits no weights layout of cifar/resnet20"):
        init_student_from_file(create_model("cifar/resnet20", 10), "cifar/resnet20", tmp_path / "student_best")


def test_unikd_checkpoint_as_student_init_reports_the_method_state(tmp_path):
    source = create_model("cifar/resnet8", 10)
    checkpoint = {"format": "unikd-checkpoint", "version": 1, "model_name": "cifar/resnet8", "num_classes": 10,
                  "model": source.state_dict(), "method": {"weak_head.weight": torch.ones(10, 32)},
                  "epoch": 5}  # fmt: skip
    torch.save(checkpoint, tmp_path / "last.pt")
    report = init_student_from_file(create_model("cifar/resnet8", 10), "cifar/resnet8", tmp_path / "last.pt")
    assert report.container == "unikd training checkpoint, epoch 5" and report.layout == "native"
    assert report.metadata == {"model_name": "cifar/resnet8", "num_classes": 10, "epoch": 5}
    assert list(report.method_state) == ["weak_head.weight"]


# --- mmpretrain / cls_KD files (the key mapping is unikd.models._mmpretrain, tested in test_mmpretrain.py) ------


class _FakeHistoryBuffer:  # pickled as mmengine's class (see _mmengine_names); only its path matters
    def __init__(self) -> None:
        self._log_history = np.array([2.5, 2.25])
        self.max_length = 1000


@pytest.fixture
def _mmengine_names(monkeypatch):
    """Make mmengine.logging.history_buffer.HistoryBuffer picklable while writing a file, as mmengine itself would."""
    module = types.ModuleType("mmengine.logging.history_buffer")
    _FakeHistoryBuffer.__module__, _FakeHistoryBuffer.__qualname__ = module.__name__, "HistoryBuffer"
    module.HistoryBuffer = _FakeHistoryBuffer
    for name in ("mmengine", "mmengine.logging"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    yield
    monkeypatch.undo()


def _mmengine_checkpoint(state_dict: dict) -> dict:
    return {
        "meta": {"epoch": 100, "iter": 500400, "mmengine_version": "0.10.7"},
        "state_dict": state_dict,
        "message_hub": {"log_scalars": {"train/loss": _FakeHistoryBuffer()}, "runtime_info": {"iter": np.int64(9)}},
    }


def test_mmpretrain_checkpoint_with_message_hub_loads_by_its_mmpretrain_name(tmp_path, _mmengine_names):
    torch.manual_seed(0)
    source = create_model("timm/resnet18", 10).eval()
    save(_mmengine_checkpoint(to_mmpretrain(source.state_dict(), "timm/resnet18")), tmp_path / "epoch_100.pth")
    for name in sys.modules.copy():
        if name.startswith("mmengine"):
            sys.modules.pop(name)
    model, report = load_model_weights("mmpretrain/resnet18_8xb32_in1k", 10, tmp_path / "epoch_100.pth")
    assert (report.container, report.layout) == ("mmengine checkpoint", "mmpretrain")
    batch = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(batch), source(batch), rtol=0, atol=0)


def test_cls_kd_distiller_checkpoint_gives_the_half_the_role_asks_for(tmp_path, _mmengine_names):
    torch.manual_seed(0)
    teacher, student = create_model("timm/resnet34", 10).eval(), create_model("timm/resnet18", 10).eval()
    with torch.no_grad():  # trained BatchNorm statistics: an untrained teacher half is refused
        for module in teacher.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(10)
    distiller = {f"teacher.{k}": v for k, v in to_mmpretrain(teacher.state_dict(), "timm/resnet34").items()}
    distiller.update({f"student.{k}": v for k, v in to_mmpretrain(student.state_dict(), "timm/resnet18").items()})
    distiller["distill_losses.loss_uskd.fc.weight"] = torch.ones(10, 256)
    save(_mmengine_checkpoint(distiller), tmp_path / "latest.pth")
    loaded_teacher = load_teacher("mmpretrain/resnet34_8xb32_in1k", 10, tmp_path / "latest.pth")
    loaded_student, report = load_model_weights("timm/resnet18", 10, tmp_path / "latest.pth")
    assert report.half == "student." and "distill_losses.loss_uskd.fc.weight" in report.ignored
    batch = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded_teacher(batch), teacher(batch), rtol=0, atol=0)
        torch.testing.assert_close(loaded_student(batch), student(batch), rtol=0, atol=0)


def test_mmpretrain_file_for_a_backbone_we_map_differently_is_refused(tmp_path):
    save({"meta": {}, "state_dict": to_mmpretrain(create_model("timm/resnet18", 10).state_dict(), "timm/resnet18")},
         tmp_path / "r18.pth")  # fmt: skip
    with pytest.raises(ModelError) as error:
        load_teacher("timm/resnet34", 10, tmp_path / "r18.pth")
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'r18.pth'} (mmengine checkpoint; mmpretrain layout): the mmpretrain ")
    assert "timm/resnet34" in message and "\n" not in message


def test_cls_kd_mobilenetv1_needs_relu_and_its_alias_gives_it(tmp_path):
    name, kwargs = MMPRETRAIN_MODELS["mobilenet_v1"]
    assert (name, kwargs) == ("timm/mobilenetv1_100", {"act_layer": "relu"})
    source = create_model("mmpretrain/mobilenet_v1", 10).eval()
    assert not any(isinstance(module, nn.ReLU6) for module in source.modules())
    save({"meta": {}, "state_dict": to_mmpretrain(source.state_dict(), name)}, tmp_path / "mv1.pth")
    with pytest.raises(ModelError) as error:
        load_teacher("timm/mobilenetv1_100", 10, tmp_path / "mv1.pth")
    assert str(error.value) == (
        f"{tmp_path / 'mv1.pth'} (mmengine checkpoint; mmpretrain layout) computes what timm/mobilenetv1_100 computes "
        "only with act_layer='relu'; pass act_layer='relu' or use the name mmpretrain/mobilenet_v1"
    )
    model = load_teacher("mmpretrain/mobilenet_v1", 10, tmp_path / "mv1.pth")
    batch = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(batch), source(batch), rtol=0, atol=0)
    # A student initialised from the file (the trainer passes the keywords it built the student with) is checked too.
    with pytest.raises(ModelError, match=re.escape("computes what timm/mobilenetv1_100 computes only with act_layer")):
        init_student_from_file(create_model(name, 10), name, tmp_path / "mv1.pth", model_kwargs={})
    for student_name, student_kwargs in ((name, {"act_layer": "relu"}), ("mmpretrain/mobilenet_v1", {})):
        student = create_model(student_name, 10, **student_kwargs)
        init_student_from_file(student, student_name, tmp_path / "mv1.pth", model_kwargs=student_kwargs)
        with torch.no_grad():
            torch.testing.assert_close(student.eval()(batch), source(batch), rtol=0, atol=0)


# --- bad files through the loaders ------------------------------------------------------------------------------


def test_unreadable_and_malicious_files_through_load_teacher(tmp_path):
    save({"model": mdistiller_state_dict("resnet20")}, tmp_path / "ok.pth", legacy=True)
    content = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(content[: len(content) // 3])
    (tmp_path / "noise.pth").write_bytes(os.urandom(256))
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    save({"model": mdistiller_state_dict("resnet20"), "x": Payload()}, tmp_path / "evil.pth", legacy=True)
    for filename, start in [
        ("cut.pth", f"cannot read {tmp_path / 'cut.pth'}: the legacy torch file is truncated ("),
        ("noise.pth", f"cannot read {tmp_path / 'noise.pth'}: not a PyTorch or safetensors file"),
        ("evil.pth", f"refused to load {tmp_path / 'evil.pth'}: its pickle calls posix.system, which would run code"),
    ]:
        with pytest.raises(UnreadableFileError) as error:
            load_teacher("cifar/resnet20", NUM_CLASSES, tmp_path / filename)
        assert str(error.value).startswith(start) and "\n" not in str(error.value)
    assert not marker.exists()


# --- names ----------------------------------------------------------------------------------------------------


def test_mdistiller_names_resolve_case_insensitively_and_are_listed():
    listed = list_models("mdistiller")
    assert {f"mdistiller/{name}" for name in REFERENCE} <= set(listed)
    assert set(listed) <= set(list_models())
    for name in REFERENCE:
        assert resolve_model_name(f"mdistiller/{name}") == f"cifar/{_arch(name)}"
    assert resolve_model_name("mdistiller/vgg13_bn") == resolve_model_name("cifar/VGG13_BN") == "cifar/vgg13"
    assert resolve_model_name("cifar/ShuffleV1") == resolve_model_name("mdistiller/shufflev1") == "cifar/shufflenetv1"
    assert (
        resolve_model_name("cifar/MobileNetV2") == resolve_model_name("mdistiller/mobile_half") == "cifar/mobilenetv2"
    )
    assert resolve_model_name("mdistiller/RESNET8X4") == "cifar/resnet8x4"
    assert resolve_model_name("TIMM/ResNet18".lower()) == "timm/resnet18" and resolve_model_name("timm/ResNet18")
    with pytest.raises(ModelError, match=r"^unknown model 'mdistiller/ShuffleV3': mdistiller/ has no model 'Shuf.*V2"):
        create_model("mdistiller/ShuffleV3", 10)
    with pytest.raises(ModelError, match=r"Did you mean: cifar/shufflenetv2, mdistiller/ShuffleV2\?$"):
        create_model("ShuffleV2", 10)


def test_mmpretrain_names_resolve_to_the_models_that_compute_the_same():
    for alias, (target, _) in MMPRETRAIN_MODELS.items():
        assert resolve_model_name(f"mmpretrain/{alias}") == target
    assert resolve_model_name("mmpretrain/ResNet50_8xb32_in1k") == "timm/resnet50"
    assert "mmpretrain/swin-tiny_16xb64_in1k" in list_models("mmpretrain")


# --- export metadata ------------------------------------------------------------------------------------------


def test_export_records_model_name_classes_and_channels_and_loaders_use_them(tmp_path):
    model = create_model("cifar/resnet8", 10, in_chans=1)
    checkpoint = {"format": "unikd-checkpoint", "version": 1, "model_name": "cifar/resnet8", "num_classes": 10,
                  "model": model.state_dict()}  # fmt: skip
    path = export_state_dict(checkpoint, tmp_path / "student.safetensors")
    with safetensors.safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "unikd", "model_name": "cifar/resnet8", "num_classes": "10", "in_chans": "1"}
    teacher, report = load_model_weights("cifar/resnet8", 10, path)  # in_chans=1 from the metadata
    assert teacher.stem[0].in_channels == 1 and report.container == "unikd export of cifar/resnet8"
    explicit = export_state_dict(model, tmp_path / "m.safetensors", metadata={"model_name": "cifar/resnet8"})
    with safetensors.safe_open(explicit, framework="pt") as f:
        assert f.metadata() == {"format": "unikd", "model_name": "cifar/resnet8", "in_chans": "1"}
    with pytest.raises(ModelError, match=r"^export metadata: unknown keys \['classes'\]; use model_name, num_class"):
        export_state_dict(model, tmp_path / "x.safetensors", metadata={"classes": 10})


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_exported_files_have_ordinary_permissions(tmp_path, umask):
    previous = os.umask(umask)
    try:
        for suffix in (".safetensors", ".pt"):
            path = export_state_dict({"w": torch.ones(2)}, tmp_path / f"w{suffix}")
            assert stat.S_IMODE(path.stat().st_mode) == 0o644 & ~umask
    finally:
        os.umask(previous)
