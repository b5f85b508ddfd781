"""One model factory for three namespaces: ``timm/<name>``, ``tv/<name>`` (torchvision) and ``cifar/<name>``.

The factory returns the library's own model object, never a wrapper, so a state_dict saved from it loads with
``strict=True`` into ``timm.create_model(name)`` / ``torchvision.models.get_model(name)`` as well.
"""

from __future__ import annotations

import difflib
import functools

import timm
import torchvision
from torch import nn

from unikd._errors import UnikdError
from unikd.models.cifar import CIFAR_MODELS

NAMESPACES = ("timm", "tv", "cifar")


class ModelError(UnikdError, ValueError):
    """A model name, layer, keyword or checkpoint the user gave does not fit; the message says what does."""


@functools.cache
def _names(namespace: str) -> tuple[str, ...]:
    if namespace == "timm":
        return tuple(timm.list_models())
    if namespace == "tv":
        return tuple(torchvision.models.list_models())
    return tuple(CIFAR_MODELS)


def list_models(namespace: str | None = None) -> list[str]:
    """All valid ``create_model`` names (``"cifar/resnet8"``, ...), optionally of one namespace."""
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
    same_arch = [f"{ns}/{arch or namespace}" for ns in NAMESPACES if (arch or namespace) in _names(ns)]
    hint = f" Did you mean: {', '.join(same_arch)}?" if same_arch else did_you_mean(name, list_models())
    return ModelError(
        f"unknown model {name!r}: names are '<namespace>/<model>' with namespace one of {', '.join(NAMESPACES)}.{hint}"
    )


def create_model(name: str, num_classes: int, *, pretrained: bool = False, **kwargs) -> nn.Module:
    """Build ``name`` = ``timm/<model>``, ``tv/<model>`` or ``cifar/<model>`` with a ``num_classes``-way classifier.

    ``kwargs`` go to the constructor (``in_chans=1``, ``img_size=32`` for a ViT, ``width=32`` for
    ``cifar/smallcnn``). ``pretrained=True`` downloads through timm's / torchvision's own loaders, which need the
    network; offline, load a local checkpoint with ``load_teacher`` instead.
    """
    namespace, _, arch = name.partition("/")
    if namespace not in NAMESPACES or arch not in _names(namespace):
        raise _unknown_name_error(name)
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
