"""Write torch files in the on-disk layouts the field ships, on a machine without a GPU.

``saved_from_cuda()`` makes ``torch.save`` record the location tag ``cuda:0`` for every CPU storage, exactly what
a file saved from a GPU model holds: torch asks the taggers registered with ``torch.serialization.register_package``
for each storage's location, highest priority (lowest number) first. Outside the block the tagger declines and
torch's own CPU tagger answers, so registering it once for the session changes nothing else.
``legacy=True`` writes torch's pre-1.6 serialisation (what CRD's ``cifar_teachers`` files are).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

_tag_as_cuda = False


def _cuda_tagger(storage) -> str | None:
    return "cuda:0" if _tag_as_cuda and storage.device.type == "cpu" else None


def _never_deserialize(storage, location: str) -> None:
    return None  # defer to torch's own deserialisers (map_location="cpu" restores the tensors on the CPU)


torch.serialization.register_package(0, _cuda_tagger, _never_deserialize)


@contextlib.contextmanager
def saved_from_cuda() -> Iterator[None]:
    global _tag_as_cuda
    _tag_as_cuda = True
    try:
        yield
    finally:
        _tag_as_cuda = False


def save(obj: object, path: str | os.PathLike, *, legacy: bool = False, cuda: bool = False) -> None:
    """``torch.save`` in the zip (default) or legacy serialisation, with CPU or ``cuda:0`` location tags."""
    with saved_from_cuda() if cuda else contextlib.nullcontext():
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
