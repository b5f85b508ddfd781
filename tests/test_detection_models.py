"""Detectors and the RoI distillation: torchvision compatibility, backbones and their weights files, the composed
training step against torchvision's own forward, the teacher on the student's RoIs, background targets, teachers."""

from __future__ import annotations

import pytest
import torch
import torchvision
from test_detection_support import fashion_mnist_idx, mosaics_root, teacher_checkpoint  # noqa: F401 (fixtures)
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from unikd._errors import ConfigError
from unikd.detection.config import DetectionDataConfig, TeacherConfig
from unikd.detection.distill import DISTILLATION_METHODS, TrainableDetector, method_defaults, roi_distillation_loss
from unikd.detection.models import create_backbone, create_detector, load_teacher_detector
from unikd.losses import dkd_loss, kd_loss, nkd_loss, wsld_loss
from unikd.models import ModelError, create_model, export_state_dict

SMALL = {"channels": [8, 16, 32, 64], "stem_width": 8}
TINY_DETECTOR = {
    "backbone": "timm/resnet18",
    "backbone_kwargs": SMALL,
    "fpn_channels": 16,
    "representation_size": 32,
    "anchor_sizes": [8, 16, 32, 64, 128],
    "min_size": 64,
    "max_size": 64,
    "box_batch_size_per_image": 32,
    "rpn_pre_nms_top_n_train": 100,
    "rpn_post_nms_top_n_train": 50,
}


def tiny(arch: str = "faster_rcnn", num_classes: int = 3, **kwargs) -> nn.Module:
    return create_detector(arch, num_classes, **{**TINY_DETECTOR, **kwargs})


def batch(masks: bool = False) -> tuple[list[torch.Tensor], list[dict]]:
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=generator), torch.rand(3, 48, 64, generator=generator)]
    boxes = [torch.tensor([[4.0, 6.0, 30.0, 40.0], [30.0, 20.0, 60.0, 60.0]]), torch.tensor([[10.0, 8.0, 40.0, 44.0]])]
    targets = [{"boxes": b, "labels": torch.tensor([1, 3][: len(b)])} for b in boxes]
    if masks:
        for target, image in zip(targets, images):
            target["masks"] = torch.zeros(len(target["boxes"]), *image.shape[1:], dtype=torch.uint8)
            for index, (x0, y0, x1, y1) in enumerate(target["boxes"].int().tolist()):
                target["masks"][index, y0:y1, x0:x1] = 1
    return images, targets


# ---- the factory ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["faster_rcnn", "mask_rcnn"])
def test_default_sizes_have_torchvisions_parameter_names_and_shapes(arch):
    ours = create_detector(arch, 90, backbone="tv/resnet50").state_dict()
    builder = (
        torchvision.models.detection.fasterrcnn_resnet50_fpn
        if arch == "faster_rcnn"
        else (torchvision.models.detection.maskrcnn_resnet50_fpn)
    )
    reference = builder(weights=None, weights_backbone=None, num_classes=91).state_dict()
    assert sorted(ours) == sorted(reference)
    assert all(ours[key].shape == reference[key].shape for key in ours)


@pytest.mark.parametrize(
    ("backbone", "channels"),
    [
        ("tv/resnet18", [64, 128, 256, 512]),
        ("tv/resnet34", [64, 128, 256, 512]),
        ("tv/resnet50", [256, 512, 1024, 2048]),
        ("tv/resnet101", [256, 512, 1024, 2048]),
        ("timm/resnet18", [8, 16, 32, 64]),
    ],
)
def test_resnet_backbones_feed_an_fpn_from_their_four_stages(backbone, channels):
    kwargs = SMALL if backbone.startswith("timm/") else {}
    body_fpn = create_backbone(backbone, kwargs=kwargs, fpn_channels=8)
    lateral = [block[0].in_channels for block in body_fpn.fpn.inner_blocks]
    assert lateral == channels
    features = body_fpn(torch.zeros(1, 3, 64, 64))
    assert list(features) == ["0", "1", "2", "3", "pool"] and all(f.shape[1] == 8 for f in features.values())
    assert all(p.requires_grad for p in body_fpn.parameters())  # random initialisation: everything trains


def test_a_network_without_resnet_stages_is_refused_with_the_choices():
    with pytest.raises(ModelError) as error:
        create_backbone("tv/mobilenet_v2")
    assert str(error.value) == (
        "tv/mobilenet_v2 is not a ResNet-style network (a conv1 stem, then stages layer1..layer4; it lacks conv1, "
        "layer1, layer2, layer3, layer4); use tv/resnet18, tv/resnet34, tv/resnet50, tv/resnet101 or a timm ResNet"
    )


# ---- backbone weights -------------------------------------------------------------------------------------------


def classifier(name: str = "timm/resnet18", in_chans: int = 3, num_classes: int = 10) -> nn.Module:
    torch.manual_seed(1)
    kwargs = {"in_chans": in_chans, **SMALL} if name.startswith("timm/") else {}
    model = create_model(name, num_classes, **kwargs)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that freezing them is visible
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize(
    ("layout", "name"),
    [
        ("timm classifier", "timm/resnet18"),
        ("unikd export", "timm/resnet18"),
        ("mmpretrain classifier", "tv/resnet18"),  # unikd.models checks it against the standard widths
        ("torchvision detector", "timm/resnet18"),
        ("backbone only", "timm/resnet18"),
    ],
)
def test_backbone_weights_load_from_the_fields_layouts_with_the_head_left_out(tmp_path, layout, name):
    source = classifier(name)
    state_dict = source.state_dict()
    body_state = {key: value for key, value in state_dict.items() if not key.startswith("fc.")}
    path = tmp_path / "weights.pt"
    if layout == "timm classifier":
        torch.save(state_dict, path)
    elif layout == "unikd export":
        path = export_state_dict(source, tmp_path / "weights.safetensors")
    elif layout == "mmpretrain classifier":  # {"state_dict": {"backbone.<name>", "head.fc.<name>"}, "meta": ...}
        entries = {f"backbone.{k}": v for k, v in body_state.items()}
        entries.update({f"head.{k}": v for k, v in state_dict.items() if k.startswith("fc.")})
        torch.save({"state_dict": entries, "meta": {"epoch": 100}}, path)
    elif layout == "torchvision detector":
        detector = tiny()
        detector.backbone.body.load_state_dict(body_state)
        torch.save(detector.state_dict(), path)
    else:
        torch.save(body_state, path)
    kwargs = SMALL if name.startswith("timm/") else {}
    body = create_backbone(name, kwargs=kwargs, weights=path).body
    assert torch.equal(body.layer3[0].conv1.weight, state_dict["layer3.0.conv1.weight"])
    assert isinstance(body.bn1, FrozenBatchNorm2d) and torch.equal(body.bn1.running_var, state_dict["bn1.running_var"])
    trained = {name.split(".")[0] for name, p in body.named_parameters() if p.requires_grad}
    frozen = {name.split(".")[0] for name, p in body.named_parameters() if not p.requires_grad}
    assert trained == {"layer2", "layer3", "layer4"} and frozen == {"conv1", "layer1"}  # MMDetection's frozen_stages=1


def test_a_grey_stem_is_spread_over_rgb_with_the_same_response(tmp_path):
    grey = classifier(in_chans=1).eval()
    path = export_state_dict(grey, tmp_path / "fmnist_resnet18.safetensors")
    body = create_backbone("timm/resnet18", kwargs=SMALL, weights=path).body.eval()
    image = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        expected = grey.forward_intermediates(image, intermediates_only=True)[-1]
        rgb = body(image.expand(-1, 3, -1, -1))["3"]
    torch.testing.assert_close(rgb, expected, rtol=1e-5, atol=1e-5)


def test_weights_of_another_architecture_are_refused_naming_the_key_and_the_file(tmp_path):
    classifier_file, backbone_file = tmp_path / "resnet34.pt", tmp_path / "resnet34_backbone.pt"
    state_dict = create_model("tv/resnet34", 10).state_dict()
    torch.save(state_dict, classifier_file)
    torch.save({k: v for k, v in state_dict.items() if not k.startswith("fc.")}, backbone_file)
    with pytest.raises(ModelError) as error:
        create_backbone("tv/resnet18", weights=classifier_file, weights_key="model.student.backbone_weights")
    assert str(error.value).startswith(f"model.student.backbone_weights: {classifier_file} (")  # unikd.models' reader
    with pytest.raises(ModelError) as error:
        create_backbone("tv/resnet18", weights=backbone_file, weights_key="model.student.backbone_weights")
    message = str(error.value)
    assert message.startswith(
        f"model.student.backbone_weights: {backbone_file} does not fit the model: unexpected entries (96): "
        "layer1.2.conv1.weight, "
    )


# ---- the training step ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["faster_rcnn", "mask_rcnn"])
def test_the_composed_step_gives_torchvisions_own_losses(arch):
    torch.manual_seed(0)
    student = tiny(arch).train()
    images, targets = batch(masks=arch == "mask_rcnn")
    torch.manual_seed(5)  # the RPN's and the RoI sampler's draws
    expected = student(images, targets)
    torch.manual_seed(5)
    ours = TrainableDetector(student)(images, targets)
    assert set(ours) == set(expected)
    for name in expected:
        assert torch.equal(ours[name], expected[name]), name


def capture(module: nn.Module, store: list, part: str):
    def hook(_module, inputs, output):
        store.append(inputs if part == "inputs" else output)

    return module.register_forward_hook(hook)


@pytest.mark.parametrize("method", ["kd", "dkd", "nkd", "wsld"])
def test_the_teacher_scores_the_students_rois_on_the_same_images(method):
    torch.manual_seed(0)
    student, teacher = tiny().train(), tiny(representation_size=48).eval().requires_grad_(False)
    images, targets = batch()
    student_pool, teacher_pool, student_logits, teacher_logits, backbone_inputs, rpn_inputs = [], [], [], [], [], []
    hooks = [
        capture(student.roi_heads.box_roi_pool, student_pool, "inputs"),
        capture(teacher.roi_heads.box_roi_pool, teacher_pool, "inputs"),
        capture(student.roi_heads.box_predictor, student_logits, "output"),
        capture(teacher.roi_heads.box_predictor, teacher_logits, "output"),
        capture(student.backbone, backbone_inputs, "inputs"),
        capture(teacher.backbone, backbone_inputs, "inputs"),
        capture(student.rpn, rpn_inputs, "inputs"),
    ]
    losses = TrainableDetector(student, method)(images, targets, teacher)
    for hook in hooks:
        hook.remove()
    assert torch.equal(backbone_inputs[0][0], backbone_inputs[1][0])  # the student's transformed batch, once
    student_rois, teacher_rois = student_pool[0][1], teacher_pool[0][1]
    assert all(torch.equal(s, t) for s, t in zip(student_rois, teacher_rois))
    # The sampled RoIs' labels, recomputed from the transformed targets: the matched class or 0 (background).
    transformed = rpn_inputs[0][2]
    _, labels = student.roi_heads.assign_targets_to_proposals(
        student_rois, [t["boxes"] for t in transformed], [t["labels"] for t in transformed]
    )
    target = torch.cat(labels)
    assert (target == 0).any() and (target > 0).any()
    expected = roi_distillation_loss(method, student_logits[0][0], teacher_logits[0][0], target)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", f"loss_{method}"}
    torch.testing.assert_close(losses[f"loss_{method}"], expected)
    losses[f"loss_{method}"].backward()
    assert student.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_background_rois_distil_towards_class_zero_and_foreground_only_drops_them():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 4, generator=generator), torch.randn(6, 4, generator=generator)
    target = torch.tensor([0, 2, 0, 1, 3, 0])
    assert torch.equal(roi_distillation_loss("nkd", student, teacher, target), nkd_loss(student, teacher, target))
    keep = target > 0
    torch.testing.assert_close(
        roi_distillation_loss("nkd", student, teacher, target, rois="foreground", weight=2.0),
        2.0 * nkd_loss(student[keep], teacher[keep], target[keep]),
    )
    assert roi_distillation_loss("dkd", student, teacher, torch.zeros(6, dtype=torch.long), rois="foreground") == 0
    for name, loss_fn, needs_target in (("kd", kd_loss, False), ("dkd", dkd_loss, True), ("wsld", wsld_loss, True)):
        hyper = DISTILLATION_METHODS[name].hyperparameters
        arguments = (student, teacher, target) if needs_target else (student, teacher)
        assert torch.equal(roi_distillation_loss(name, student, teacher, target, **hyper), loss_fn(*arguments, **hyper))


def test_detection_defaults_of_each_method():
    assert method_defaults("baseline") == {}
    assert method_defaults("dkd") == {"weight": 1.0, "rois": "all", "temperature": 1.0, "alpha": 1.0, "beta": 0.25}
    assert method_defaults("nkd") == {"weight": 1.0, "rois": "all", "temperature": 1.0, "gamma": 1.5}
    assert method_defaults("kd") == {"weight": 1.0, "rois": "all", "temperature": 1.0}
    with pytest.raises(ValueError, match="method 'nkd' needs the teacher detector"):
        TrainableDetector(tiny(), "nkd")(*batch())


# ---- teachers ---------------------------------------------------------------------------------------------------


def data_config(**kwargs) -> DetectionDataConfig:
    return DetectionDataConfig(min_size=[64], max_size=64, **kwargs)


def categories(count: int) -> list[dict]:
    return [{"id": index + 1, "name": f"c{index}"} for index in range(count)]


def test_a_teacher_rebuilds_from_its_checkpoint_frozen(teacher_checkpoint, mosaics_root):  # noqa: F811
    from unikd.detection.mosaics import FASHION_MNIST_CLASSES

    names = [{"id": index + 1, "name": name} for index, name in enumerate(FASHION_MNIST_CLASSES)]
    data = data_config()  # the teacher was trained with the default (ImageNet) normalisation
    teacher = load_teacher_detector(TeacherConfig(checkpoint=str(teacher_checkpoint)), names, data)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.roi_heads.box_predictor.cls_score.out_features == 11
    with pytest.raises(ConfigError) as error:
        load_teacher_detector(TeacherConfig(checkpoint=str(teacher_checkpoint), backbone="tv/resnet101"), names, data)
    assert str(error.value) == (
        f"model.teacher.backbone: the checkpoint {teacher_checkpoint} holds a faster_rcnn on timm/resnet18, not "
        "tv/resnet101; set model.teacher.backbone=timm/resnet18 or leave it out"
    )
    with pytest.raises(ConfigError, match="was trained on the categories"):
        load_teacher_detector(TeacherConfig(checkpoint=str(teacher_checkpoint)), categories(10), data)
    with pytest.raises(ConfigError, match=r"was trained with data.image_mean=\[0.485, 0.456, 0.406\], this run uses"):
        load_teacher_detector(
            TeacherConfig(checkpoint=str(teacher_checkpoint)), names, data_config(image_mean=[0.3] * 3)
        )


def test_a_teacher_with_another_class_count_is_refused(tmp_path):
    path = export_state_dict(tiny(num_classes=5), tmp_path / "teacher.safetensors")
    teacher_cfg = TeacherConfig(
        checkpoint=str(path),
        arch="faster_rcnn",
        **{key: value for key, value in TINY_DETECTOR.items() if key in TeacherConfig.__dataclass_fields__},
    )
    teacher_cfg.detector_kwargs = {"box_batch_size_per_image": 32}
    with pytest.raises(ConfigError) as error:
        load_teacher_detector(teacher_cfg, categories(3), data_config())
    assert str(error.value) == (
        f"model.teacher.checkpoint: the teacher in {path} predicts 5 classes (+ background) but the dataset has 3 "
        "categories; distil from a teacher trained on the same categories"
    )
    assert (
        load_teacher_detector(teacher_cfg, categories(5), data_config()).roi_heads.box_predictor.cls_score.out_features
        == 6
    )
    with pytest.raises(ConfigError, match="is a plain weights file, which does not record the detector it holds"):
        load_teacher_detector(TeacherConfig(checkpoint=str(path)), categories(5), data_config())
