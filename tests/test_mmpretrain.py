"""mmpretrain (mmcls 1.x) and cls_KD checkpoints load into unikd's models with the logits mmpretrain computes.

``tests/data/mmpretrain_reference.json`` / ``.npz`` were made by mmpretrain 1.2.0 itself
(``scripts/make_mmpretrain_reference.py``, see tests/data/REFERENCE.md): for each paper model, the key names,
shapes and dtypes of its classifier's state_dict and the float64 logits it computes in eval mode when every tensor
holds ``synthetic_tensor(key)`` and the input is ``synthetic_images``. The tests rebuild those weights from the same
formula, write them in the real file layouts, convert them and compare our model's logits.
"""

from __future__ import annotations

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
    stage_output_norms,
    strip_distiller,
    to_mmpretrain,
)

DATA = Path(__file__).parent / "data"
REFERENCE = json.loads((DATA / "mmpretrain_reference.json").read_text())
MODELS = REFERENCE["models"]


def swin_relative_position_index(window: int) -> torch.Tensor:
    """(window², window²) int64: the index into a Swin relative position bias table, as the Swin paper defines it."""
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()])  # (2, window²)
    offsets = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (2, window², window²), each in [0, 2 window - 2]
    return offsets[0] * (2 * window - 1) + offsets[1]


def synthetic_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The value of the tensor named ``key`` in every synthetic checkpoint: a function of the name alone.

    Uniform draws from numpy's legacy RandomState (stable across numpy releases) seeded by the name's crc32, scaled
    like a sane init: He (Kaiming-uniform) conv/linear weights, norm scales in [0.5, 1.5], BatchNorm running means
    around 0 and variances in [0.5, 2], so that every layer changes the logits. Swin's relative position index is the
    real one (a lookup table, not a weight).
    """
    rng = np.random.RandomState(zlib.crc32(key.encode()))
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "num_batches_tracked":
        return torch.tensor(rng.randint(1, 10**6), dtype=dtype)
    if leaf == "relative_position_index":
        return swin_relative_position_index(round(shape[0] ** 0.5)).to(dtype)
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


def reference_state(name: str) -> OrderedDict[str, torch.Tensor]:
    """The mmpretrain state_dict the reference script ran, rebuilt from the stored key list and the formula."""
    return OrderedDict(
        (key, synthetic_tensor(key, tuple(shape), getattr(torch, dtype))) for key, shape, dtype in MODELS[name]["keys"]
    )


def reference_logits(name: str) -> torch.Tensor:
    with np.load(DATA / "mmpretrain_reference.npz") as arrays:
        return torch.from_numpy(arrays[f"{name}/logits"])


def logits_of(model_name: str, kwargs: dict, state_dict: dict, image_size: int, dtype: torch.dtype) -> torch.Tensor:
    model = create_model(model_name, num_classes=1000, **kwargs).eval()
    model.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
        return model.to(dtype)(synthetic_images(REFERENCE["batch"], image_size).to(dtype)).double()


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


def test_a_checkpoint_file_loads_with_mmpretrains_logits(reference, tmp_path):
    name, state = reference
    model_name, kwargs = reference_model(name)
    path = tmp_path / "epoch_100.pth"
    save_mmengine_checkpoint(path, state, param_schedulers=[{"last_epoch": 100}])
    ours = from_mmpretrain(load_checkpoint_state(path), model_name)
    expected, size = reference_logits(name), MODELS[name]["image_size"]
    scale = float(expected.abs().max())
    # float64 shows the computation is the same (summation order aside); float32 is what a user runs.
    assert float((logits_of(model_name, kwargs, ours, size, torch.float64) - expected).abs().max()) <= 1e-12 * scale
    assert float((logits_of(model_name, kwargs, ours, size, torch.float32) - expected).abs().max()) <= 1e-5 * scale


def test_round_trips_are_exact_and_the_key_list_is_mmpretrains(reference):
    name, state = reference
    model_name, kwargs = reference_model(name)
    ours = from_mmpretrain(state, model_name)
    with torch.device("meta"):
        model = create_model(model_name, num_classes=1000, **kwargs)
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
