"""Training-step overhead of USKD over plain CE and of NKD over KD, measured side by side in one run.

The paper claims USKD's overhead is negligible (+0.1% to +1.2% time per epoch). A training step here is the
student forward (with the extra output the method needs), the teacher forward for KD/NKD (under no_grad, counted
for both), the loss, backward and an SGD step. The two variants of a pair alternate step by step (AB, BA, AB, ...)
after a warm-up, so that machine noise hits both alike. The table gives each variant's median step time, and for
the pair the median (and interquartile range) of the per-round paired ratios candidate / reference - 1, in wall
time and, on CPU, in process CPU time. On a shared machine the CPU time with ``--threads 1`` is the robust measure:
time spent waiting for a core is not counted, and with one thread no CPU time is burnt spin-waiting for a
descheduled partner thread.

Peak memory: on CUDA, the peak allocated during a step above what was allocated before it
(``torch.cuda.max_memory_allocated``), maximum over steps. On CPU there is no allocator statistic, so each variant
runs in a fresh single-threaded process with a fixed malloc mmap threshold, and the peak RSS (Linux VmHWM) of two
steps above the RSS before them (after one untimed step) is reported; it is approximate (page granularity, small
blocks cached by malloc) but repeatable to about 0.2 MiB.

    python benchmarks/overhead.py --device cpu --steps 20 --batch-size 16 --models cifar,vit
    python benchmarks/overhead.py --device cuda --models resnet18-224,deit-tiny-224 --amp bf16

The ``resnet18-224`` and ``deit-tiny-224`` setups are the paper's ImageNet case: timm's ResNet-18 and DeiT-Tiny at
224x224 with 1000 classes, USKD against plain CE. ``--amp bf16|fp16`` runs the forward passes and the loss under
``torch.autocast`` (fp16 with a GradScaler, CUDA only), as ``train.amp`` does in training. ``--img-size`` overrides
every chosen setup's image size (the ViT's ``img_size`` with it), e.g. to try a setup small on a CPU.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import time
from dataclasses import dataclass, field, replace

import torch

from unikd.methods import create_method, forward_student
from unikd.models import create_model, feature_dim

NUM_CLASSES = 100  # the default; the 224-pixel setups use 1000
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Variant:
    method: str
    student: str
    teacher: str | None = None

    @property
    def label(self) -> str:
        return f"{self.method} ({self.student}" + (f" <- {self.teacher})" if self.teacher else ")")


@dataclass(frozen=True)
class ModelSetup:
    image_size: int
    model_kwargs: dict
    pairs: tuple[tuple[Variant, Variant], ...]  # (reference, candidate)
    num_classes: int = NUM_CLASSES

    def resized(self, image_size: int) -> ModelSetup:
        """The same setup at another image size (a ViT's ``img_size`` follows; CNNs pool globally)."""
        kwargs = {**self.model_kwargs, "img_size": image_size} if "img_size" in self.model_kwargs else self.model_kwargs
        return replace(self, image_size=image_size, model_kwargs=kwargs)


SETUPS = {
    "cifar": ModelSetup(
        image_size=32,
        model_kwargs={},
        pairs=(
            (Variant("baseline", "cifar/resnet56"), Variant("uskd", "cifar/resnet56")),
            (
                Variant("kd", "cifar/resnet8x4", "cifar/resnet32x4"),
                Variant("nkd", "cifar/resnet8x4", "cifar/resnet32x4"),
            ),
        ),
    ),
    "vit": ModelSetup(
        image_size=64,
        model_kwargs={"img_size": 64},
        pairs=(
            (Variant("baseline", "timm/deit_tiny_patch16_224"), Variant("uskd", "timm/deit_tiny_patch16_224")),
            (
                Variant("kd", "timm/deit_tiny_patch16_224", "timm/deit_small_patch16_224"),
                Variant("nkd", "timm/deit_tiny_patch16_224", "timm/deit_small_patch16_224"),
            ),
        ),
    ),
    "resnet18-224": ModelSetup(
        image_size=224,
        model_kwargs={},
        pairs=((Variant("baseline", "timm/resnet18"), Variant("uskd", "timm/resnet18")),),
        num_classes=1000,
    ),
    "deit-tiny-224": ModelSetup(
        image_size=224,
        model_kwargs={"img_size": 224},
        pairs=((Variant("baseline", "timm/deit_tiny_patch16_224"), Variant("uskd", "timm/deit_tiny_patch16_224")),),
        num_classes=1000,
    ),
}


class Trainer:
    """One variant's student, method, teacher and optimizer, with a fixed random batch."""

    def __init__(
        self, variant: Variant, setup: ModelSetup, batch_size: int, device: torch.device, amp: str | None = None
    ) -> None:
        torch.manual_seed(0)
        classes = setup.num_classes
        self.student = create_model(variant.student, classes, **setup.model_kwargs).to(device).train()
        self.method = create_method(
            variant.method, classes, feature_dim=feature_dim(self.student) if variant.method == "uskd" else None
        ).to(device)
        self.teacher = None
        if variant.teacher:
            self.teacher = create_model(variant.teacher, classes, **setup.model_kwargs).to(device).eval()
            self.teacher.requires_grad_(False)
        parameters = [*self.student.parameters(), *self.method.parameters()]
        self.optimizer = torch.optim.SGD(parameters, lr=0.01, momentum=0.9)
        self.images = torch.randn(batch_size, 3, setup.image_size, setup.image_size, device=device)
        self.targets = torch.randint(0, classes, (batch_size,), device=device)
        self.device_type, self.amp_dtype = device.type, AMP_DTYPES[amp] if amp else None
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    def step(self) -> None:
        with torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            teacher_logits = None
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_logits = self.teacher(self.images)
            out = forward_student(self.student, self.images, self.method.student_output)
            loss = sum(self.method(out, self.targets, teacher_logits, progress=1.0).values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timings:
    """Per-step samples of one variant: wall seconds, process CPU seconds, CUDA peak bytes above the start."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    peak_bytes: int = 0

    def record_step(self, trainer: Trainer, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        _sync(device)
        wall, cpu = time.perf_counter(), time.process_time()
        trainer.step()
        _sync(device)
        self.wall.append(time.perf_counter() - wall)
        self.cpu.append(time.process_time() - cpu)
        if device.type == "cuda":
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(device) - before)


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process to its current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def cpu_peak_rss_delta(
    variant: Variant, setup: ModelSetup, batch_size: int, amp: str | None = None, steps: int = 2
) -> int:
    """Peak RSS during ``steps`` steps above the RSS before them; run in a fresh process.

    One step runs first, so that gradients, optimizer state and the code pages of the kernels used are already
    resident: like the CUDA figure, the delta is the memory a step needs on top of the trained state.
    """
    torch.set_num_threads(1)  # the probe only measures memory; leave the cores to the timing
    trainer = Trainer(variant, setup, batch_size, torch.device("cpu"), amp)
    trainer.step()
    before = _rss_bytes()
    _reset_peak_rss()
    for _ in range(steps):
        trainer.step()
    return _peak_rss_bytes() - before


def cpu_peak_rss_delta_in_fresh_process(
    variant: Variant, setup: ModelSetup, batch_size: int, amp: str | None = None
) -> int:
    """:func:`cpu_peak_rss_delta` in a new process whose malloc returns every block of 64 KiB or more to the system
    when freed (a fixed mmap threshold), so that the RSS follows the live tensors instead of glibc's cached heap."""
    context = multiprocessing.get_context("spawn")
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)  # read by the child's glibc at start-up
    try:
        with context.Pool(1) as pool:
            return pool.apply(cpu_peak_rss_delta, (variant, setup, batch_size, amp))
    finally:
        if saved is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def _ratio_cell(reference: list[float], candidate: list[float]) -> str:
    """Median of the per-round paired ratios candidate / reference, as a percentage, with their IQR."""
    q1, median, q3 = quartiles([c / r for r, c in zip(reference, candidate)])
    return f"**{100 * (median - 1):+.1f}%** ({100 * (q1 - 1):+.1f}..{100 * (q3 - 1):+.1f})"


def measure_pair(
    pair: tuple[Variant, Variant], setup_name: str, args: argparse.Namespace, device: torch.device
) -> list[str]:
    """Time the two variants of ``pair`` step by step in alternating order; return the table rows."""
    setup = SETUPS[setup_name]
    if args.img_size is not None:
        setup = setup.resized(args.img_size)
    trainers = [Trainer(variant, setup, args.batch_size, device, args.amp) for variant in pair]
    for trainer in trainers:
        for _ in range(args.warmup):
            trainer.step()
    timings = [Timings(), Timings()]
    for round_index in range(args.steps):
        for i in (0, 1) if round_index % 2 == 0 else (1, 0):
            timings[i].record_step(trainers[i], device)
    peaks = [timing.peak_bytes for timing in timings]
    if device.type == "cpu" and args.cpu_memory:
        peaks = [cpu_peak_rss_delta_in_fresh_process(variant, setup, args.batch_size, args.amp) for variant in pair]

    rows = []
    for variant, timing, peak in zip(pair, timings, peaks):
        q1, median, q3 = (1e3 * value for value in quartiles(timing.wall))
        cpu = f"{1e3 * statistics.median(timing.cpu):.1f}" if device.type == "cpu" else "-"
        rows.append(
            f"| {setup_name} | {variant.label} | {median:.1f} ({q1:.1f}..{q3:.1f}) | {cpu} | "
            f"{f'{peak / 2**20:.1f}' if peak or device.type == 'cuda' or args.cpu_memory else '-'} |"
        )
    reference, candidate = timings
    cpu_ratio = _ratio_cell(reference.cpu, candidate.cpu) if device.type == "cpu" else "-"
    memory_ratio = f"{100 * (peaks[1] / peaks[0] - 1):+.1f}%" if peaks[0] > 0 else "-"
    rows.append(
        f"| {setup_name} | {pair[1].method} vs {pair[0].method} | {_ratio_cell(reference.wall, candidate.wall)} | "
        f"{cpu_ratio} | {memory_ratio} |"
    )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--models", default="cifar,vit", help=f"comma-separated, from: {', '.join(SETUPS)}")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: torch's); 1 keeps CPU time exact when shared"
    )
    parser.add_argument("--img-size", type=int, default=None, help="override every chosen setup's image size")
    parser.add_argument(
        "--amp", choices=sorted(AMP_DTYPES), default=None, help="autocast the step (default: float32; fp16: CUDA only)"
    )
    parser.add_argument(
        "--no-cpu-memory",
        dest="cpu_memory",
        action="store_false",
        help="on CPU, skip the peak-RSS probe (one fresh process per variant); the memory column then reads -",
    )
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in names if name not in SETUPS]
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(SETUPS)}")
    if args.steps < 2:
        parser.error("--steps: need at least 2 timed steps for quartiles")
    device = torch.device(args.device)
    if args.amp == "fp16" and device.type != "cuda":
        parser.error("--amp: 'fp16' needs CUDA (its GradScaler); on CPU use --amp bf16")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, torch threads: {torch.get_num_threads()}"
    )
    memory = "peak allocated above resident, per step" if device.type == "cuda" else "peak RSS delta, approximate"
    print(f"# step overhead on {where}; batch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up")
    classes = ", ".join(f"{name} {SETUPS[name].num_classes}" for name in names)
    precision = f"autocast {args.amp}" if args.amp else "float32"
    sizes = f"; image size {args.img_size} (override)" if args.img_size is not None else ""
    print(f"# torch {torch.__version__}, classes: {classes}; {precision}{sizes}; SGD", end="")
    print("; teacher forward included for kd and nkd\n")
    print(f"| model | variant | wall ms/step, median (IQR) | CPU ms/step, median | memory MiB ({memory}) |")
    print("| --- | --- | --- | --- | --- |")
    for name in names:
        for pair in SETUPS[name].pairs:
            for row in measure_pair(pair, name, args, device):
                print(row, flush=True)


if __name__ == "__main__":
    main()
