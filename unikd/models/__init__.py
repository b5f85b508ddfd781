"""Students and teachers: one factory for timm / torchvision / CIFAR-zoo models (and the names mdistiller and
mmpretrain give them), the USKD intermediate feature and Zipf's dense logits in one forward pass, and reading the
field's weight files safely in every layout they come in.

    model = create_model("cifar/resnet8x4", num_classes=100)
    weak_head = nn.Linear(feature_dim(model), 100)              # D known before training
    logits, feature = forward_with_feature(model, images)       # (N, C), (N, D); USKD Eq. 8
    teacher = load_teacher("cifar/resnet32x4", 100, "resnet32x4_vanilla/ckpt_epoch_240.pth")  # CRD's file
    model, report = load_model_weights("mmpretrain/resnet18_8xb32_in1k", 1000, "res18.pth")  # any weights
    export_state_dict(model, "student.safetensors", metadata={"model_name": "cifar/resnet8x4", "num_classes": 100})
"""

from unikd.models._checkpoint import (
    export_state_dict,
    init_student_from_file,
    load_exactly,
    load_model_weights,
    load_state_dict_file,
    load_teacher,
    read_model_weights,
)
from unikd.models._errors import ModelError
from unikd.models._factory import NAMESPACES, create_model, list_models, resolve_model_name
from unikd.models._features import feature_dim, forward_with_dense_logits, forward_with_feature, unwrap
from unikd.models._formats import FORMATS, LAYOUTS, ROLES, WeightsReport
from unikd.models.cifar import CIFAR_INITS

__all__ = [
    "CIFAR_INITS",
    "FORMATS",
    "LAYOUTS",
    "NAMESPACES",
    "ROLES",
    "ModelError",
    "WeightsReport",
    "create_model",
    "export_state_dict",
    "feature_dim",
    "forward_with_dense_logits",
    "forward_with_feature",
    "init_student_from_file",
    "list_models",
    "load_exactly",
    "load_model_weights",
    "load_state_dict_file",
    "load_teacher",
    "read_model_weights",
    "resolve_model_name",
    "unwrap",
]
