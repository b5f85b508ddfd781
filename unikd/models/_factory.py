"""One model factory for three namespaces: ``timm/<name>``, ``tv/<name>`` (torchvision) and ``cifar/<name>``, plus
the names users already type in the field's other tools.

The factory returns the library's own model object, never a wrapper, so a state_dict saved from it loads with
``strict=True`` into ``timm.create_model(name)`` / ``torchvision.models.get_model(name)`` as well.

Names are matched case-insensitively. Two alias namespaces resolve to those models: ``mdistiller/<name>`` takes
mdistiller's / CRD's CIFAR zoo names (``mdistiller/ResNet50``, ``mdistiller/ShuffleV1``, ``mdistiller/vgg13_bn``;
they work under ``cifar/`` too: ``cifar/ShuffleV1``) and ``mmpretrain/<name>`` takes mmpretrain's model / config
names (``mmpretrain/resnet18_8xb32_in1k``, ``mmpretrain/mobilenet_v1``: cls_KD's, timm's with ReLU), from
``unikd.models._mmpretrain.MMPRETRAIN_MODELS``. ``resolve_model_name`` gives the canonical name.
"""

from __future__ import annotations

import difflib
import functools

import timm
import torchvision
from torch import nn

from unikd.models._errors import ModelError
from unikd.models._mdistiller import MDISTILLER_MODELS
from unikd.models.cifar import CIFAR_MODELS

MODEL_NAMESPACES = ("timm", "tv", "cifar")
ALIAS_NAMESPACES = ("mdistiller", "mmpretrain")
NAMESPACES = MODEL_NAMESPACES + ALIAS_NAMESPACES


@functools.cache
def _names(namespace: str) -> tuple[str, ...]:
    if namespace == "timm":
        return tuple(timm.list_models())
    if namespace == "tv":
        return tuple(torchvision.models.list_models())
    if namespace == "cifar":
        return tuple(CIFAR_MODELS)
    return tuple(_aliases(namespace))


def _aliases(namespace: str) -> dict[str, tuple[str, dict]]:
    """{alias: (canonical name, constructor keywords it implies)} of an alias namespace."""
    if namespace == "mdistiller":
        return {name: (f"cifar/{arch}", {}) for name, arch in MDISTILLER_MODELS.items()}
    from unikd.models._mmpretrain import MMPRETRAIN_MODELS  # here: that module imports this one

    return MMPRETRAIN_MODELS


@functools.cache
def _lowercase_index(namespace: str) -> dict[str, str]:
    """{lowercased name: canonical name} of a namespace (mdistiller's spellings count as cifar/ names too)."""
    index = {name.lower(): f"{namespace}/{name}" for name in _names(namespace)}
    if namespace in ALIAS_NAMESPACES:
        index = {alias.lower(): target for alias, (target, _) in _aliases(namespace).items()}
    elif namespace == "cifar":
        index.update({alias.lower(): f"cifar/{arch}" for alias, arch in MDISTILLER_MODELS.items()})
    return index


def list_models(namespace: str | None = None) -> list[str]:
    """All valid ``create_model`` names (``"cifar/resnet8"``, ``"mdistiller/ResNet50"``, ...), optionally of one
    namespace."""
    namespaces = NAMESPACES if namespace is None else (namespace,)
    return [f"{ns}/{name}" for ns in namespaces for name in _names(ns)]


def did_you_mean(word: str, choices: list[str] | tuple[str, ...], n: int = 5) -> str:
    """' Did you mean: a, b?' for the closest choices (difflib), or '' when none is close."""
    # Names that extend the word (deit_tiny -> deit_tiny_patch16_224) first: difflib undervalues long names.
    extensions = [choice for choice in choices if choice.startswith(word)]
    close = sorted(extensions, key=len)[:n] or difflib.get_close_matches(word, choices, n=n, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def _unknown_name_error(name: str) -> ModelError:
    namespace, _, arch = name.partition("/")
    if namespace in NAMESPACES:
        hint = did_you_mean(arch, _names(namespace))
        return ModelError(f"unknown model {name!r}: {namespace}/ has no model {arch!r}.{hint}")
    word = (arch or namespace).lower()
    same_arch = [_lowercase_index(ns)[word] for ns in MODEL_NAMESPACES if word in _lowercase_index(ns)]
    same_arch += [f"{ns}/{alias}" for ns in ALIAS_NAMESPACES for alias in _names(ns) if alias.lower() == word]
    hint = f" Did you mean: {', '.join(same_arch)}?" if same_arch else did_you_mean(name, list_models())
    return ModelError(
        f"unknown model {name!r}: names are '<namespace>/<model>' with namespace one of {', '.join(NAMESPACES)}.{hint}"
    )


def implied_kwargs(name: str) -> dict:
    """Constructor keywords an alias implies (cls_KD's MobileNetV1 is timm's with ReLU: act_layer="relu")."""
    namespace, _, arch = name.partition("/")
    if namespace not in ALIAS_NAMESPACES:
        return {}
    aliases = _aliases(namespace).items()
    return next((dict(kwargs) for alias, (_, kwargs) in aliases if alias.lower() == arch.lower()), {})


def resolve_model_name(name: str) -> str:
    """The canonical ``timm/`` / ``tv/`` / ``cifar/`` name of ``name`` (exact, then case-insensitive, then an alias),
    or ``ModelError`` with the closest names."""
    namespace, _, arch = name.partition("/")
    if namespace in MODEL_NAMESPACES and arch in _names(namespace):
        return name
    if namespace in NAMESPACES and arch.lower() in _lowercase_index(namespace):
        return _lowercase_index(namespace)[arch.lower()]
    raise _unknown_name_error(name)


def create_model(name: str, num_classes: int, *, pretrained: bool = False, **kwargs) -> nn.Module:
    """Build ``name`` = ``timm/<model>``, ``tv/<model>`` or ``cifar/<model>`` (or an alias: ``mdistiller/ResNet50``,
    ``mmpretrain/resnet18_8xb32_in1k``) with a ``num_classes``-way classifier.

    ``kwargs`` go to the constructor (``in_chans=1``, ``img_size=32`` for a ViT, ``width=32`` for
    ``cifar/smallcnn``, ``init="mdistiller"`` for the CIFAR zoo: see ``unikd.models.CIFAR_INITS``); an alias adds the
    keywords it implies (``mmpretrain/mobilenet_v1``: ``act_layer="relu"``). ``pretrained=True`` downloads through
    timm's / torchvision's own loaders, which need the network; offline, load a local checkpoint with
    ``load_teacher`` instead.
    """
    kwargs = {**implied_kwargs(name), **kwargs}
    name = resolve_model_name(name)
    namespace, _, arch = name.partition("/")
    if pretrained and namespace == "cifar":
        raise ModelError(
            f"{name} has no pretrained weights; train it, or pass a checkpoint to load_teacher "
            "(config key model.teacher_checkpoint)"
        )
    try:
        if namespace == "timm":
            return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, **kwargs)
        if namespace == "tv":
            # torchvision's constructors have no in_chans: accept the RGB default the trainer always passes.
            if kwargs.get("in_chans", 3) != 3:
                raise ModelError(f"{name}: torchvision models take 3-channel images, got in_chans={kwargs['in_chans']}")
            kwargs.pop("in_chans", None)
            weights = "DEFAULT" if pretrained else None
            return torchvision.models.get_model(arch, weights=weights, num_classes=num_classes, **kwargs)
        return CIFAR_MODELS[arch](num_classes=num_classes, **kwargs)
    except TypeError as error:
        raise ModelError(f"{name} does not accept the keyword arguments {sorted(kwargs)}: {error}") from error
    except Exception as error:
        if not pretrained:
            raise
        raise ModelError(
            f"could not download pretrained weights for {name} ({type(error).__name__}: {error}). This machine has "
            "no model hub access: build the model with pretrained=False and load a local checkpoint instead "
            "(config key model.teacher_checkpoint, or unikd.models.load_teacher(name, num_classes, path))."
        ) from error
