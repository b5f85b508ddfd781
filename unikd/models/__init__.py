"""Students and teachers: one factory for timm / torchvision / CIFAR-zoo models, the USKD intermediate feature
and Zipf's dense logits in one forward pass, and safe checkpoint loading and export.

    model = create_model("cifar/resnet8x4", num_classes=100)
    weak_head = nn.Linear(feature_dim(model), 100)              # D known before training
    logits, feature = forward_with_feature(model, images)       # (N, C), (N, D); USKD Eq. 8
    teacher = load_teacher("cifar/resnet32x4", 100, "resnet32x4.safetensors")
    export_state_dict(model, "student.safetensors")
"""

from unikd.models._checkpoint import export_state_dict, load_state_dict_file, load_teacher
from unikd.models._factory import ModelError, create_model, list_models
from unikd.models._features import feature_dim, forward_with_dense_logits, forward_with_feature, unwrap

__all__ = [
    "ModelError",
    "create_model",
    "export_state_dict",
    "feature_dim",
    "forward_with_dense_logits",
    "forward_with_feature",
    "list_models",
    "load_state_dict_file",
    "load_teacher",
    "unwrap",
]
