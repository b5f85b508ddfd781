"""unikd._serialization: the one safe reader of torch and safetensors files."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torch_files import save

from unikd._errors import UnikdError
from unikd._serialization import (
    InertGlobal,
    UnreadableFileError,
    read_safetensors,
    read_weights_file,
    safe_torch_load,
    serialization_of,
)

DATA = Path(__file__).parent / "data"


def crd_teacher_file() -> dict:
    """What CRD's cifar_teachers/<name>_vanilla/ckpt_epoch_240.pth holds (with a tiny model)."""
    generator = torch.Generator().manual_seed(0)
    model = {
        "conv1.weight": torch.randn(4, 3, 3, 3, generator=generator),
        "fc.bias": torch.randn(5, generator=generator),
    }
    optimizer = {
        "state": {0: {"momentum_buffer": torch.zeros(4, 3, 3, 3)}},
        "param_groups": [{"lr": 0.05, "params": [0]}],
    }
    return {"epoch": 240, "model": model, "accuracy": torch.tensor(72.34), "optimizer": optimizer}


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_files_saved_from_cuda_load_on_the_cpu(tmp_path, legacy):
    content = crd_teacher_file()
    path = tmp_path / "ckpt_epoch_240.pth"
    save(content, path, legacy=legacy, cuda=True)
    assert serialization_of(path) == ("torch legacy" if legacy else "torch zip")
    if not torch.cuda.is_available():  # the tags are real: torch's own loader refuses them without map_location
        with pytest.raises(Exception, match="CUDA"):  # RuntimeError; UnpicklingError before torch 2.5
            torch.load(path, weights_only=True)
    loaded = safe_torch_load(path)
    assert loaded["epoch"] == 240 and loaded["optimizer"]["param_groups"] == [{"lr": 0.05, "params": [0]}]
    for key, tensor in content["model"].items():
        assert loaded["model"][key].device.type == "cpu"
        torch.testing.assert_close(loaded["model"][key], tensor, rtol=0, atol=0)
    torch.testing.assert_close(loaded["accuracy"], torch.tensor(72.34))


def test_mmengine_message_hub_becomes_inert_placeholders_and_mmengine_is_never_imported():
    # Written by real mmengine 0.10.7 (tests/data/make_mmengine_checkpoint.py): HistoryBuffer objects, NumPy arrays,
    # scalars and dtypes, and builtins.getattr(HistoryBuffer, "min") for its statistics methods.
    assert "mmengine" not in sys.modules
    loaded = safe_torch_load(DATA / "mmengine_checkpoint.pth")
    assert not any(name.split(".")[0] == "mmengine" for name in sys.modules)
    assert list(loaded) == ["meta", "state_dict", "message_hub"]
    assert loaded["state_dict"]["head.fc.weight"].shape == (10, 4)
    assert loaded["meta"]["mmengine_version"] == "0.10.7"
    history = loaded["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(history, InertGlobal)
    assert history.qualified_name == "mmengine.logging.history_buffer.HistoryBuffer"
    assert isinstance(history.state["_log_history"], InertGlobal)  # a NumPy array, never built
    assert repr(history.state["statistics_methods"]["min"]) == "<inert builtins.getattr>"
    assert isinstance(loaded["message_hub"]["runtime_info"]["iter"], InertGlobal)  # np.int64


def test_placeholders_are_registered_for_one_load_only(tmp_path):
    before = torch.serialization.get_safe_globals()
    safe_torch_load(DATA / "mmengine_checkpoint.pth")
    assert set(torch.serialization.get_safe_globals()) == set(before)
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(UnreadableFileError):
        safe_torch_load(tmp_path / "bad.pt")
    assert set(torch.serialization.get_safe_globals()) == set(before)


class _RunsCode:
    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _touch_command(marker: Path) -> str:
    return f"{sys.executable} -c \"open('{marker}', 'w').close()\""


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda marker: _RunsCode(os.system, _touch_command(marker)), "posix.system"),
        (lambda marker: _RunsCode(eval, f"open('{marker}', 'w')"), "builtins.eval"),
        (lambda marker: _RunsCode(subprocess.call, ["touch", str(marker)]), "subprocess.call"),
    ],
    ids=["os.system", "eval", "subprocess"],
)
@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, make, named, legacy):
    marker = tmp_path / "ran"
    if named == "posix.system" and os.name != "posix":
        pytest.skip("os.system pickles as nt.system on Windows")
    save({"model": {"w": torch.ones(1)}, "payload": make(marker)}, tmp_path / "evil.pth", legacy=legacy)
    with pytest.raises(UnreadableFileError) as error:
        safe_torch_load(tmp_path / "evil.pth")
    assert str(error.value) == (
        f"refused to load {tmp_path / 'evil.pth'}: its pickle calls {named}, which would run code when unpickled; "
        "nothing was run. Use weights from a source you trust, saved as a state_dict or .safetensors file"
    )
    assert not marker.exists()


def test_an_unknown_module_is_never_imported_and_its_call_stays_inert(tmp_path, monkeypatch):
    module = types.ModuleType("unikd_test_trap")
    calls = []
    module.trap = lambda *args: calls.append(args)
    module.trap.__module__, module.trap.__qualname__ = "unikd_test_trap", "trap"
    monkeypatch.setitem(sys.modules, "unikd_test_trap", module)
    save({"model": {"w": torch.ones(1)}, "hook": _RunsCode(module.trap, "armed")}, tmp_path / "trap.pth")
    monkeypatch.delitem(sys.modules, "unikd_test_trap")
    loaded = safe_torch_load(tmp_path / "trap.pth")
    assert calls == [] and "unikd_test_trap" not in sys.modules
    assert isinstance(loaded["hook"], InertGlobal) and loaded["hook"].args == ("armed",)
    torch.testing.assert_close(loaded["model"]["w"], torch.ones(1))


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, expected message)."""
    save(crd_teacher_file(), tmp_path / "legacy.pth", legacy=True)
    save(crd_teacher_file(), tmp_path / "zip.pth")
    legacy, archive = (tmp_path / "legacy.pth").read_bytes(), (tmp_path / "zip.pth").read_bytes()
    files = {
        "empty.pth": b"",
        "random.pth": bytes(range(7, 7 + 64)),
        "truncated_zip.pth": archive[: len(archive) // 2],
        "truncated_legacy_pickle.pth": legacy[:120],
        "truncated_legacy_data.pth": legacy[:-8],
        "plain_pickle.pth": pickle.dumps({"w": [1.0, 2.0]}, protocol=2),
        "other.zip": b"",
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as other:
        other.writestr("readme.txt", "not weights")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "scripted.pt")
    (tmp_path / "folder.pth").mkdir()

    def path(name: str) -> Path:
        return tmp_path / name

    return {
        "empty": (
            path("empty.pth"),
            f"cannot read {path('empty.pth')}: the file is empty (0 bytes), probably cut off while it was written or "
            "copied; copy or download it again",
        ),
        "random": (
            path("random.pth"),
            f"cannot read {path('random.pth')}: not a PyTorch or safetensors file (it starts with the bytes "
            "07 08 09 0a 0b 0c 0d 0e); expected a file written by torch.save or safetensors",
        ),
        "truncated zip": (
            path("truncated_zip.pth"),
            f"cannot read {path('truncated_zip.pth')}: the torch zip archive is truncated or damaged (File is not a "
            "zip file); copy or download it again",
        ),
        "truncated legacy pickle": (
            path("truncated_legacy_pickle.pth"),
            f"cannot read {path('truncated_legacy_pickle.pth')}: the torch legacy pickle is truncated or damaged",
        ),
        "truncated legacy data": (
            path("truncated_legacy_data.pth"),
            f"cannot read {path('truncated_legacy_data.pth')}: the legacy torch file is truncated (",
        ),
        "plain pickle": (
            path("plain_pickle.pth"),
            f"cannot read {path('plain_pickle.pth')}: not a PyTorch or safetensors file (a Python pickle, but not one "
            "written by torch.save); expected a file written by torch.save or safetensors",
        ),
        "other zip": (
            path("other.zip"),
            f"cannot read {path('other.zip')}: a zip archive without the data.pkl of torch.save",
        ),
        "torchscript": (
            path("scripted.pt"),
            f"cannot read {path('scripted.pt')}: it is a TorchScript archive (torch.jit.save), not a torch.save file; "
            "load it with torch.jit.load and save its state_dict()",
        ),
        "missing": (path("absent.pth"), f"file not found: {path('absent.pth')}"),
        "folder": (path("folder.pth"), f"{path('folder.pth')} is not a file"),
    }


BAD_FILES = [
    "empty",
    "random",
    "truncated zip",
    "truncated legacy pickle",
    "truncated legacy data",
    "plain pickle",
    "other zip",
    "torchscript",
    "missing",
    "folder",
]


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_files_get_one_line_that_names_the_file_and_never_advise_weights_only_false(tmp_path, case):
    path, expected = _bad_files(tmp_path)[case]
    for reader in (safe_torch_load, read_weights_file):
        with pytest.raises(UnreadableFileError) as error:
            reader(path)
        message = str(error.value)
        assert isinstance(error.value, UnikdError) and "\n" not in message
        assert message.startswith(expected), message
        assert "weights_only" not in message and "pickles Python objects" not in message


def test_safetensors_with_metadata_and_a_misleading_suffix(tmp_path):
    tensors = {"fc.weight": torch.randn(3, 2)}
    safetensors.torch.save_file(tensors, tmp_path / "w.safetensors", metadata={"model_name": "cifar/resnet8"})
    loaded, metadata = read_safetensors(tmp_path / "w.safetensors")
    torch.testing.assert_close(loaded["fc.weight"], tensors["fc.weight"])
    assert metadata == {"model_name": "cifar/resnet8"}
    (tmp_path / "w.pth").write_bytes((tmp_path / "w.safetensors").read_bytes())  # named like a torch file
    found = read_weights_file(tmp_path / "w.pth")
    assert (found.serialization, found.metadata) == ("safetensors", {"model_name": "cifar/resnet8"})
    torch.save(tensors, tmp_path / "torch.safetensors")  # and the other way round
    assert read_weights_file(tmp_path / "torch.safetensors").serialization == "torch zip"
    damaged = (tmp_path / "w.safetensors").read_bytes()[:-4]
    (tmp_path / "damaged.safetensors").write_bytes(damaged)
    with pytest.raises(UnreadableFileError, match=r"^cannot read .*damaged\.safetensors as safetensors \("):
        read_weights_file(tmp_path / "damaged.safetensors")
    with pytest.raises(UnreadableFileError, match=r"is a safetensors file, not a torch\.save file; read it with "):
        safe_torch_load(tmp_path / "w.safetensors")


def test_numpy_values_round_trip_as_placeholders_not_arrays(tmp_path):
    save({"w": torch.ones(2), "mean": np.array([1.0, 2.0]), "dtype": np.dtype("float32")}, tmp_path / "np.pth")
    loaded = safe_torch_load(tmp_path / "np.pth")
    assert isinstance(loaded["mean"], InertGlobal) and isinstance(loaded["dtype"], InertGlobal)
    torch.testing.assert_close(loaded["w"], torch.ones(2))
