"""The one safe reader of weight files: ``torch.save`` files (zip and legacy formats) and ``.safetensors``.

Everything in unikd that reads a ``.pt`` / ``.pth`` / ``.safetensors`` file goes through ``read_weights_file`` or
``safe_torch_load``. Guarantees:

- **Nothing in the file is ever imported or run.** Torch files are read by torch's own ``weights_only`` unpickler,
  never with ``weights_only=False``. Globals the file names beyond torch's allowlist (mmengine's ``message_hub``:
  ``HistoryBuffer``, NumPy arrays, dtypes and scalars; an argparse ``Namespace``; any class) become ``InertGlobal``
  placeholders registered for this one load: they record the arguments and state the pickle gives them and do
  nothing else, so the tensors beside them can still be read. A pickle that names a global from a module that runs
  code (``os.system``, ``builtins.eval``, ``subprocess``, ...) is refused before unpickling starts; the refusal
  list only chooses that message (a placeholder would be inert too).
- Both serialisations torch has written: the zip archive (torch >= 1.6) and the legacy pickle stream (torch < 1.6,
  e.g. the CRD / mdistiller CIFAR teachers), with tensors saved from CUDA mapped to the CPU.
- One-line ``UnreadableFileError`` messages that name the file, what is wrong with it (empty, truncated, not a
  torch or safetensors file, a pickle that would run code) and what to do. Torch's advice to retry with
  ``weights_only=False`` is never repeated: it is the wrong advice for a file one does not trust.

    state = safe_torch_load("ckpt_epoch_240.pth")          # any object torch.save wrote, on the CPU
    weights = read_weights_file("student.safetensors")     # WeightsFile(content, serialization, metadata)
"""

from __future__ import annotations

import contextlib
import io
import os
import pickletools
import struct
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unikd._errors import UnikdError

# The pickle torch < 1.6 writes first: its magic number 0x1950a86a20f9469cfc6c as a protocol-2 LONG1.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_HEADER_PICKLES = 3  # magic number, protocol version, system info; then the object itself

# Modules whose globals run code or touch the system when a pickle calls them. Naming one refuses the file.
# fmt: off
_CODE_MODULES = frozenset({
    "os", "posix", "nt", "sys", "subprocess", "shutil", "importlib", "runpy", "pty", "socket", "code", "codeop",
    "pickle", "_pickle", "marshal", "types", "ctypes", "operator", "functools", "inspect", "pdb", "bdb", "webbrowser",
    "multiprocessing", "threading", "_thread", "signal", "io", "_io", "tempfile", "pathlib", "glob", "platform",
    "asyncio", "timeit", "dill", "cloudpickle", "joblib", "commands", "popen2", "posixpath", "ntpath", "shelve",
    "sqlite3", "urllib", "http", "requests", "smtplib", "ftplib", "telnetlib", "zipimport", "pkgutil", "site",
    "distutils", "setuptools", "pip",
})
# Builtins that run code or reach the system. Other builtins become placeholders like any global: mmengine's
# HistoryBuffer pickles its statistics methods as builtins.getattr(HistoryBuffer, "min").
_CODE_BUILTINS = frozenset({
    "eval", "exec", "compile", "open", "__import__", "breakpoint", "input", "help", "exit", "quit", "setattr",
    "delattr", "globals", "locals", "vars", "print",
})
# fmt: on


class UnreadableFileError(UnikdError, ValueError):
    """A weights file that cannot be read, or may not be read safely; the message names the file and the fix."""


class InertGlobal:
    """Stands in for a global that a pickle names and this reader will not import.

    Subclasses are made per name (``placeholder_for("numpy.dtype")``). Building one records what the pickle passes
    (``args``, ``state``) and does nothing else; ``qualified_name`` says what the file meant.
    """

    qualified_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> InertGlobal:
        instance = super().__new__(cls)
        instance.args = args
        instance.state = None
        return instance

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self.qualified_name}>"


def placeholder_for(qualified_name: str) -> type[InertGlobal]:
    """An ``InertGlobal`` subclass that torch's ``weights_only`` unpickler finds under ``qualified_name``
    (``"module.Name"``): torch keys the classes it is allowed to build by ``__module__`` and ``__qualname__``
    (``__name__`` before torch 2.6), set here so that they join back to ``qualified_name``."""
    module, _, name = qualified_name.rpartition(".")
    return type(name, (InertGlobal,), {"__module__": module, "__qualname__": name, "qualified_name": qualified_name})


@contextlib.contextmanager
def _allowed(placeholders: list[type[InertGlobal]]) -> Iterator[None]:
    """Allow ``placeholders`` for the loads inside the block only. (``torch.serialization.safe_globals`` does this
    from torch 2.5 on; the public calls below exist from torch 2.4.)"""
    previous = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals(placeholders)
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(previous)


@dataclass
class WeightsFile:
    """What ``read_weights_file`` found: the stored object, how it was serialised and the safetensors metadata."""

    content: Any
    serialization: str  # "safetensors", "torch zip" or "torch legacy"
    metadata: dict[str, str] = field(default_factory=dict)


def _head(path: Path, size: int = 64) -> bytes:
    with path.open("rb") as f:
        return f.read(size)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise UnreadableFileError(f"file not found: {path}")
    if not path.is_file():
        raise UnreadableFileError(f"{path} is not a file")
    if path.stat().st_size == 0:
        raise UnreadableFileError(
            f"cannot read {path}: the file is empty (0 bytes), probably cut off while it was written or copied; "
            "copy or download it again"
        )


def _is_safetensors(head: bytes, file_size: int) -> bool:
    """safetensors: an 8-byte little-endian header length, then a JSON header that opens with '{'."""
    if len(head) < 9:
        return False
    (header_length,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 8 + header_length <= file_size


def serialization_of(path: str | os.PathLike) -> str:
    """'torch zip', 'torch legacy' or 'safetensors', from the file's first bytes (not its name)."""
    path = Path(path)
    _check_file(path)
    head = _head(path)
    if head.startswith(_ZIP_MAGIC):
        return "torch zip"
    if head.startswith(_LEGACY_MAGIC):
        return "torch legacy"
    if _is_safetensors(head, path.stat().st_size):
        return "safetensors"
    if len(head) >= 262 and head[257:262] == b"ustar":
        raise UnreadableFileError(
            f"cannot read {path}: it is a tar archive (torch < 0.4 wrote checkpoints as tar files, which torch "
            "no longer reads safely); load it once with the torch version that wrote it and re-save the "
            "state_dict, or ask its author for a .safetensors file"
        )
    if head.startswith(b"\x80"):
        detail = "a Python pickle, but not one written by torch.save"
    else:
        detail = f"it starts with the bytes {head[:8].hex(' ')}"
    raise UnreadableFileError(
        f"cannot read {path}: not a PyTorch or safetensors file ({detail}); expected a file written by "
        "torch.save or safetensors"
    )


def _globals_in_pickle(stream: io.BufferedIOBase) -> dict[str, str]:
    """{``module.name`` as written: its Python 3 name} for every GLOBAL opcode of the next pickle in ``stream``,
    read without unpickling. Protocol 2 writes some builtins under their Python 2 names (``__builtin__.eval``)."""
    names = {}
    for opcode, argument, _ in pickletools.genops(stream):
        if opcode.name == "GLOBAL":
            module, name = argument.split(" ", 1)
            if (module, name) in NAME_MAPPING:
                names[f"{module}.{name}"] = ".".join(NAME_MAPPING[(module, name)])
            else:
                names[f"{module}.{name}"] = f"{IMPORT_MAPPING.get(module, module)}.{name}"
    return names


def _pickled_globals(path: Path, serialization: str) -> dict[str, str]:
    """Globals named by the object pickle of a torch file; a truncated or damaged file raises."""
    if serialization == "torch zip":
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                if any(name.endswith(("/constants.pkl", "/code/")) or "/code/" in name for name in names):
                    raise UnreadableFileError(
                        f"cannot read {path}: it is a TorchScript archive (torch.jit.save), not a torch.save file; "
                        "load it with torch.jit.load and save its state_dict()"
                    )
                data_pickle = next((name for name in names if name.endswith("data.pkl")), None)
                if data_pickle is None:
                    raise UnreadableFileError(f"cannot read {path}: a zip archive without the data.pkl of torch.save")
                pickle_bytes = archive.read(data_pickle)
        except zipfile.BadZipFile as error:
            raise UnreadableFileError(
                f"cannot read {path}: the torch zip archive is truncated or damaged ({error}); copy or download it "
                "again"
            ) from error
        return _globals_in_pickle(io.BytesIO(pickle_bytes))
    with path.open("rb") as stream:
        for _ in range(_LEGACY_HEADER_PICKLES):
            for _opcode in pickletools.genops(stream):
                pass
        return _globals_in_pickle(stream)


def _refused(qualified_name: str) -> bool:
    module, _, name = qualified_name.rpartition(".")
    root = module.split(".")[0]
    if root in ("builtins", "__builtin__"):
        return name in _CODE_BUILTINS
    return root in _CODE_MODULES


def _torch_reason(error: BaseException) -> str:
    """The cause in torch's message, without its advice to retry with ``weights_only=False``."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    lines = [line for line in lines if "weights_only" not in line and "Weights only load failed" not in line]
    return f"{type(error).__name__}: {lines[0] if lines else 'no detail'}"


def safe_torch_load(path: str | os.PathLike) -> Any:
    """The object ``torch.save`` wrote to ``path``, with every tensor on the CPU, read without running its code.

    Reads the zip and the legacy (torch < 1.6) serialisations. Unknown globals come back as ``InertGlobal``
    instances (see the module docstring). Raises ``UnreadableFileError`` (one line: the file, the problem, the fix)
    for a missing, empty, truncated or foreign file, and for a pickle that would run code.
    """
    path = Path(path)
    serialization = serialization_of(path)
    if serialization == "safetensors":
        raise UnreadableFileError(
            f"{path} is a safetensors file, not a torch.save file; read it with read_weights_file"
        )
    try:
        named_globals = _pickled_globals(path, serialization)
    except (ValueError, EOFError, struct.error) as error:
        if isinstance(error, UnreadableFileError):
            raise
        raise UnreadableFileError(
            f"cannot read {path}: the {serialization} pickle is truncated or damaged ({error}); copy or download "
            "it again"
        ) from error
    refused = sorted({name for name in named_globals.values() if _refused(name)})
    if refused:
        raise UnreadableFileError(
            f"refused to load {path}: its pickle calls {', '.join(refused)}, which would run code when unpickled; "
            "nothing was run. Use weights from a source you trust, saved as a state_dict or .safetensors file"
        )
    # Under both names: torch's reader renames Python 2 modules with its own table, a subset of Python's.
    placeholders = [placeholder_for(name) for name in sorted({*named_globals, *named_globals.values()})]
    try:
        # An open file, not the path: recent torch hands paths ending in .safetensors to safetensors.
        with _allowed(placeholders), path.open("rb") as stream:
            return torch.load(stream, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = _torch_reason(error)
        if serialization == "torch legacy" and ("EOF" in reason or "truncated" in reason):
            raise UnreadableFileError(
                f"cannot read {path}: the legacy torch file is truncated ({reason}); copy or download it again"
            ) from error
        raise UnreadableFileError(
            f"cannot read {path} safely ({serialization} format): {reason}; nothing was run. Re-save the weights "
            "with torch.save(model.state_dict(), path) or as .safetensors"
        ) from error


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on the CPU, the header's string metadata) of a ``.safetensors`` file."""
    from safetensors import safe_open

    path = Path(path)
    _check_file(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
            return tensors, dict(f.metadata() or {})
    except Exception as error:
        raise UnreadableFileError(
            f"cannot read {path} as safetensors ({type(error).__name__}: {str(error).splitlines()[0]}); the file is "
            "damaged or truncated: copy or download it again"
        ) from error


def read_weights_file(path: str | os.PathLike) -> WeightsFile:
    """Read a torch or safetensors file, whichever its first bytes say it is (a misleading suffix is fine)."""
    serialization = serialization_of(path)
    if serialization == "safetensors":
        tensors, metadata = read_safetensors(path)
        return WeightsFile(tensors, serialization, metadata)
    return WeightsFile(safe_torch_load(path), serialization)


__all__ = [
    "InertGlobal",
    "UnreadableFileError",
    "WeightsFile",
    "placeholder_for",
    "read_safetensors",
    "read_weights_file",
    "safe_torch_load",
    "serialization_of",
]
