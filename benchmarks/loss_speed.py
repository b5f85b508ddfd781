"""Forward + backward time of every loss as a ratio to ``F.cross_entropy`` on the same logits.

    python benchmarks/loss_speed.py                 # CPU (and CUDA when present), all sizes
    python benchmarks/loss_speed.py --sizes 256x1000 --repeats 50 --threads 2

Each loss is timed interleaved with the cross-entropy baseline (baseline, loss, baseline, loss, ...) so that machine
noise hits both alike; the ratio is the median over rounds of loss time / cross-entropy time of the same round. One
intra-op thread by default: on a shared 2-core machine, OpenMP threads spin-waiting for a busy core add ~20 ms
stalls that swamp sub-millisecond timings. Memory is what autograd keeps for the backward
pass (bytes of saved tensors, exact on any device) and, on CUDA, the peak allocated during forward + backward above
what the inputs hold.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
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


def bench(n: int, c: int, device: str, repeats: int, warmup: int) -> list[dict]:
    inputs = make_inputs(n, c, device)
    baseline = LOSSES["cross_entropy"]
    rows = []
    for name, loss_fn in LOSSES.items():
        for _ in range(warmup):
            run_once(baseline, inputs, device)
            run_once(loss_fn, inputs, device)
        base_times, loss_times = [], []
        for _ in range(repeats):
            base_times.append(run_once(baseline, inputs, device))
            loss_times.append(run_once(loss_fn, inputs, device))
        ratios = [loss / base for loss, base in zip(loss_times, base_times)]
        row = {
            "loss": name,
            "ms": statistics.median(loss_times) * 1e3,
            "ratio": statistics.median(ratios),
            "ratio_iqr": statistics.quantiles(ratios, n=4)[::2],
            "saved_mb": saved_tensor_bytes(loss_fn, inputs) / 2**20,
        }
        if device == "cuda":
            row["peak_mb"] = cuda_peak_bytes(loss_fn, inputs) / 2**20
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["128x100", "256x1000", "64x21843"], help="N x C pairs")
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU (default 1)")
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
