"""Forward + backward time of every loss as a ratio to ``F.cross_entropy`` on the same logits.

    python benchmarks/loss_speed.py                 # CPU (and CUDA when present), all sizes
    python benchmarks/loss_speed.py --sizes 256x1000 --repeats 50 --threads 2
    python benchmarks/loss_speed.py --devices cuda --sizes 256x1000 64x21843 --released ~/src/cls_KD ~/src/mdistiller

Each loss is timed interleaved with the cross-entropy baseline (baseline, loss, baseline, loss, ...) so that machine
noise hits both alike; the ratio is the median over rounds of loss time / cross-entropy time of the same round. One
intra-op thread by default: on a shared 2-core machine, OpenMP threads spin-waiting for a busy core add ~20 ms
stalls that swamp sub-millisecond timings. Memory is what autograd keeps for the backward
pass (bytes of saved tensors, exact on any device) and, on CUDA, the peak allocated during forward + backward above
what the inputs hold.

``--released PATH [PATH ...]`` also times the paper authors' released losses beside ours, at the same sizes, on the
same device and in the same interleaved rounds, and prints both ratios to cross-entropy. Each PATH is a local
checkout of one of the authors' repositories, recognised by its layout:

    yzd-v/cls_KD                 PATH/mmcls/models/dis_losses/nkd.py   (NKDLoss)
                                 PATH/mmcls/models/dis_losses/uskd.py  (USKDLoss)
    megvii-research/mdistiller   PATH/mdistiller/distillers/DKD.py     (dkd_loss)

Their code never enters this repository: each single file is loaded at run time with importlib from its path, with
the one import it makes of its framework stubbed for the duration of the load (cls_KD's
``from mmcls.registry import MODELS``, used only as the ``@MODELS.register_module()`` decorator, becomes a no-op
decorator; mdistiller's ``from ._base import Distiller``, the base class of the distiller defined beside
``dkd_loss``, becomes ``nn.Module``), so neither mmcv/mmengine/mmcls nor mdistiller needs to be installed and
nothing else of theirs is imported. Both sides use the same hyper-parameters (NKD T=1 gamma=1.5; DKD T=4 alpha=1
beta=8; USKD alpha=1 beta=0.1 mu=0.005, our ``rank="released"``). The released USKD computes its weak logits with
its own ``nn.Linear`` from a feature, so for that pair ours is timed with an identical ``nn.Linear(512, C)`` in
front (a ResNet-18 feature width). The released ``USKDLoss`` builds its Zipf table with ``.cuda()``, so it needs
CUDA; on a machine without it that row says so.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import unikd.losses as L

LOSSES = {
    "cross_entropy": lambda s, t, y, w, d: F.cross_entropy(s, y),
    "label_smoothing": lambda s, t, y, w, d: L.label_smoothing_loss(s, y),
    "kd": lambda s, t, y, w, d: L.kd_loss(s, t),
    "nkd": lambda s, t, y, w, d: L.nkd_loss(s, t, y),
    "dkd": lambda s, t, y, w, d: L.dkd_loss(s, t, y),
    "wsld": lambda s, t, y, w, d: L.wsld_loss(s, t, y),
    "uskd": lambda s, t, y, w, d: L.uskd_loss(s, w, y),
    "uskd_released": lambda s, t, y, w, d: L.uskd_loss(s, w, y, rank="released"),
    "tfkd": lambda s, t, y, w, d: L.tfkd_loss(s, y),
    "zipf_ls": lambda s, t, y, w, d: L.zipf_ls_loss(s, d, y),
}
DENSE_LOCATIONS = 16  # a 4x4 last feature map


def make_inputs(n: int, c: int, device: str):
    generator = torch.Generator(device="cpu").manual_seed(0)
    randn = lambda *shape: (torch.randn(*shape, generator=generator) * 2).to(device)  # noqa: E731
    student, weak = randn(n, c).requires_grad_(True), randn(n, c).requires_grad_(True)
    target = torch.randint(0, c, (n,), generator=generator).to(device)
    return student, randn(n, c), target, weak, randn(n, DENSE_LOCATIONS, c)


def run_once(loss_fn, inputs, device: str) -> float:
    student, teacher, target, weak, dense = inputs
    student.grad = weak.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss_fn(student, teacher, target, weak, dense).backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def saved_tensor_bytes(loss_fn, inputs) -> int:
    """Bytes autograd saves for the backward pass (distinct storages)."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn(*inputs)
    loss.backward()
    input_ptrs = {t.untyped_storage().data_ptr() for t in inputs}
    return sum(size for ptr, size in storages.items() if ptr not in input_ptrs)


def cuda_peak_bytes(loss_fn, inputs) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss_fn(*inputs).backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def time_against_baseline(loss_fn, inputs, device: str, repeats: int, warmup: int) -> dict:
    """Median fwd+bwd ms of ``loss_fn`` and the median (and IQR) of its per-round ratio to cross-entropy."""
    baseline = LOSSES["cross_entropy"]
    for _ in range(warmup):
        run_once(baseline, inputs, device)
        run_once(loss_fn, inputs, device)
    base_times, loss_times = [], []
    for _ in range(repeats):
        base_times.append(run_once(baseline, inputs, device))
        loss_times.append(run_once(loss_fn, inputs, device))
    ratios = [loss / base for loss, base in zip(loss_times, base_times)]
    low, high = statistics.quantiles(ratios, n=4)[::2] if len(ratios) > 1 else (ratios[0], ratios[0])
    return {"ms": statistics.median(loss_times) * 1e3, "ratio": statistics.median(ratios), "ratio_iqr": (low, high)}


def bench(n: int, c: int, device: str, repeats: int, warmup: int) -> list[dict]:
    inputs = make_inputs(n, c, device)
    rows = []
    for name, loss_fn in LOSSES.items():
        row = {
            "loss": name,
            **time_against_baseline(loss_fn, inputs, device, repeats, warmup),
            "saved_mb": saved_tensor_bytes(loss_fn, inputs) / 2**20,
        }
        if device == "cuda":
            row["peak_mb"] = cuda_peak_bytes(loss_fn, inputs) / 2**20
        rows.append(row)
    return rows


# ---- the authors' released losses, loaded from a local checkout ---------------------------------------------------

WEAK_FEATURE_DIM = 512  # the feature the released USKDLoss's own weak head reads (ResNet-18's width)


class _NoOpRegistry:
    """Stands in for an mmcv/mmengine ``Registry``: ``@MODELS.register_module()`` returns the class unchanged."""

    def register_module(self, *args, **kwargs):
        return lambda obj: obj


@dataclass(frozen=True)
class ReleasedFile:
    repo: str  # the repository, as named in messages
    path: str  # relative to the checkout
    symbol: str  # the class or function to take from it
    stubs: tuple[tuple[str, str], ...]  # (module, attribute) its imports need, stubbed while it loads


_REGISTRY_STUB = (("mmcls.registry", "MODELS"),)
RELEASED_FILES = {
    "nkd": ReleasedFile("yzd-v/cls_KD", "mmcls/models/dis_losses/nkd.py", "NKDLoss", _REGISTRY_STUB),
    "uskd": ReleasedFile("yzd-v/cls_KD", "mmcls/models/dis_losses/uskd.py", "USKDLoss", _REGISTRY_STUB),
    "dkd": ReleasedFile(
        "megvii-research/mdistiller",
        "mdistiller/distillers/DKD.py",
        "dkd_loss",
        (("mdistiller.distillers._base", "Distiller"),),
    ),
}
_STUB_VALUES = {"MODELS": _NoOpRegistry, "Distiller": lambda: nn.Module}


@contextlib.contextmanager
def _stubbed_modules(stubs: tuple[tuple[str, str], ...]):
    """Put stub modules (and their parent packages) in ``sys.modules`` for the duration; restore what was there."""
    saved: dict[str, types.ModuleType | None] = {}
    try:
        for module_name, attribute in stubs:
            parts = module_name.split(".")
            for depth in range(1, len(parts) + 1):
                name = ".".join(parts[:depth])
                if name not in saved:
                    saved[name] = sys.modules.get(name)
                    stub = types.ModuleType(name)
                    stub.__path__ = []  # a package, so that its submodules resolve
                    sys.modules[name] = stub
            setattr(sys.modules[module_name], attribute, _STUB_VALUES[attribute]())
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _load_symbol(file_path: Path, spec: ReleasedFile):
    """Execute one released file as the module it is in its repository (so relative imports resolve to the stubs)
    and return ``spec.symbol`` from it. The module is not left in ``sys.modules``."""
    module_name = spec.path.removesuffix(".py").replace("/", ".")
    module_spec = importlib.util.spec_from_file_location(module_name, file_path)
    module = importlib.util.module_from_spec(module_spec)
    with _stubbed_modules(spec.stubs):
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        finally:
            sys.modules.pop(module_name, None)
    if not hasattr(module, spec.symbol):
        raise ImportError(f"{file_path} defines no {spec.symbol} (the {spec.repo} file layout this bench expects)")
    return getattr(module, spec.symbol)


def load_released(checkouts: list[str]) -> dict[str, Callable]:
    """The released loss objects (class or function) by our loss name, from local checkouts of cls_KD and/or
    mdistiller. A path that is neither, or a checkout without an expected file, raises FileNotFoundError naming
    the expected path."""
    found: dict[str, Callable] = {}
    for checkout in checkouts:
        root = Path(checkout).expanduser()
        if (root / "mmcls").is_dir():
            names = ["nkd", "uskd"]
        elif (root / "mdistiller").is_dir():
            names = ["dkd"]
        else:
            expected = ", ".join(str(root / spec.path) for spec in RELEASED_FILES.values())
            raise FileNotFoundError(f"--released {checkout}: not a cls_KD or mdistiller checkout; expected {expected}")
        for name in names:
            spec = RELEASED_FILES[name]
            file_path = root / spec.path
            if not file_path.is_file():
                raise FileNotFoundError(f"--released {checkout}: {spec.repo}'s file not found: expected {file_path}")
            found[name] = _load_symbol(file_path, spec)
    return found


def released_pairs(released: dict[str, Callable], n: int, c: int, device: str) -> list[tuple[str, Callable, Callable]]:
    """(name, ours, theirs) loss functions with the bench's signature, same hyper-parameters on both sides."""
    pairs = []
    if "nkd" in released:
        their_nkd = released["nkd"](name="loss_nkd", use_this=True, temp=1.0, gamma=1.5)
        pairs.append(
            (
                "nkd",
                lambda s, t, y, w, d: L.nkd_loss(s, t, y, temperature=1.0, gamma=1.5),
                lambda s, t, y, w, d: their_nkd(s, t, y),
            )
        )
    if "dkd" in released:
        their_dkd = released["dkd"]
        pairs.append(
            (
                "dkd",
                lambda s, t, y, w, d: L.dkd_loss(s, t, y, temperature=4.0, alpha=1.0, beta=8.0),
                lambda s, t, y, w, d: their_dkd(s, t, y, 1.0, 8.0, 4.0),
            )
        )
    if "uskd" in released:
        generator = torch.Generator(device="cpu").manual_seed(1)
        feature = torch.randn(n, WEAK_FEATURE_DIM, generator=generator).to(device).requires_grad_(True)
        our_head = nn.Linear(WEAK_FEATURE_DIM, c).to(device)
        try:
            their_uskd = released["uskd"](
                name="loss_uskd", use_this=True, channel=WEAK_FEATURE_DIM, alpha=1.0, beta=0.1, mu=0.005, num_classes=c
            ).to(device)
        except (AssertionError, RuntimeError) as error:  # its Zipf table is made with .cuda()
            pairs.append(("uskd", None, f"released USKDLoss could not be built here: {error}"))
        else:
            their_uskd.fc.load_state_dict(our_head.state_dict())
            if isinstance(getattr(their_uskd, "zipf", None), torch.Tensor):
                their_uskd.zipf = their_uskd.zipf.to(device)  # built on cuda:0 by .cuda(); follow the bench's device

            def ours_uskd(s, t, y, w, d):
                feature.grad = None
                our_head.zero_grad(set_to_none=True)
                return L.uskd_loss(s, our_head(feature), y, alpha=1.0, beta=0.1, mu=0.005, rank="released")

            def theirs_uskd(s, t, y, w, d):
                feature.grad = None
                their_uskd.zero_grad(set_to_none=True)
                return their_uskd(feature, s, y)

            pairs.append(("uskd (+ weak fc)", ours_uskd, theirs_uskd))
    return pairs


def bench_released(released: dict[str, Callable], n: int, c: int, device: str, repeats: int, warmup: int) -> list[dict]:
    """Ours and the released loss of each pair, each timed against cross-entropy on the same inputs."""
    inputs = make_inputs(n, c, device)
    rows = []
    for name, ours, theirs in released_pairs(released, n, c, device):
        if ours is None:
            rows.append({"loss": name, "skipped": theirs})
            continue
        rows.append(
            {
                "loss": name,
                "ours": time_against_baseline(ours, inputs, device, repeats, warmup),
                "released": time_against_baseline(theirs, inputs, device, repeats, warmup),
            }
        )
    return rows


def _ratio_text(timing: dict) -> str:
    low, high = timing["ratio_iqr"]
    return f"{timing['ratio']:.2f}x ({low:.2f}-{high:.2f})"


def print_released(rows: list[dict], n: int, c: int, device: str) -> None:
    print(f"\n{device}  (N, C) = ({n}, {c})  ours beside the released code")
    header = "| loss | ours ms | ours ratio to CE (IQR) | released ms | released ratio to CE (IQR) | ours / released |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for row in rows:
        if "skipped" in row:
            print(f"| {row['loss']} | - | - | - | {row['skipped']} | - |")
            continue
        ours, theirs = row["ours"], row["released"]
        print(
            f"| {row['loss']} | {ours['ms']:.3f} | {_ratio_text(ours)} | {theirs['ms']:.3f} | {_ratio_text(theirs)} | "
            f"{ours['ratio'] / theirs['ratio']:.2f} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["128x100", "256x1000", "64x21843"], help="N x C pairs")
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU (default 1)")
    parser.add_argument(
        "--released",
        nargs="+",
        metavar="PATH",
        help="local checkouts of yzd-v/cls_KD and/or megvii-research/mdistiller: time their NKD/USKD/DKD beside ours",
    )
    args = parser.parse_args(argv)
    released = {}
    if args.released:
        try:
            released = load_released(args.released)
        except (FileNotFoundError, ImportError) as error:
            parser.error(str(error))
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    for device in args.devices:
        for size in args.sizes:
            n, c = (int(v) for v in size.lower().split("x"))
            rows = bench(n, c, device, args.repeats, args.warmup)
            print(f"\n{device}  (N, C) = ({n}, {c})")
            header = "| loss | fwd+bwd ms | ratio to CE (IQR) | saved for backward MB |"
            header += " CUDA peak MB |" if device == "cuda" else ""
            print(header)
            print("|" + "---|" * (header.count("|") - 1))
            for row in rows:
                low, high = row["ratio_iqr"]
                ratio = f"{row['ratio']:.2f}x ({low:.2f}-{high:.2f})"
                line = f"| {row['loss']} | {row['ms']:.3f} | {ratio} | {row['saved_mb']:.2f} |"
                if device == "cuda":
                    line += f" {row['peak_mb']:.2f} |"
                print(line)
            if released:
                print_released(bench_released(released, n, c, device, args.repeats, args.warmup), n, c, device)


if __name__ == "__main__":
    main()
