"""Run logging: ``metrics.jsonl`` (one JSON object per line), TensorBoard events under ``tb/``, tqdm progress bars.

Train records: ``{"split": "train", "step", "epoch", "lr", <each loss term>, "loss", "images_per_s"}`` (terms are
averaged over the steps since the previous record). Eval records: ``{"split": "val", "step", "epoch", "top1",
"top5", "val_loss", "epoch_time_s", "peak_mem_mb"}``. A resume that changed keys which may change writes
``{"split": "resume", "step", "epoch", "changed": {key: [old, new]}}``. A resume first drops the records the run
will log again, so every (split, step) appears once.
"""

from __future__ import annotations

import errno
import json
import resource
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from unikd._errors import UnikdError


class MetricsWriter:
    """Appends records to ``output_dir/metrics.jsonl`` and, if ``tensorboard``, to ``output_dir/tb``.

    Disabled (every call a no-op) on ranks other than 0. Appending lets a resumed run continue the same files.
    """

    def __init__(
        self, output_dir: str | Path, *, enabled: bool = True, tensorboard: bool = False, purge_step: int | None = None
    ) -> None:
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self._path = output_dir / "metrics.jsonl"
        self._jsonl = open(self._path, "a")  # noqa: SIM115 (closed in close())
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: it pulls in tensorboard

            # purge_step: TensorBoard hides the events an interrupted run logged at or after it (a resume redoes them).
            self._tb = SummaryWriter(str(output_dir / "tb"), purge_step=purge_step)

    def write(self, record: dict) -> None:
        """Write one record; numeric values also go to TensorBoard as ``<split>/<key>`` at ``record["step"]``."""
        if not self.enabled:
            return
        try:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        except OSError as error:
            full = error.errno in (errno.ENOSPC, errno.EDQUOT)
            raise UnikdError(
                f"{'disk full: ' if full else ''}cannot write {self._path} ({error.strerror}); the checkpoints are "
                "intact: free some space, then continue with --resume"
            ) from None
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "epoch", "split") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{record['split']}/{key}", value, record["step"])

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def console(message: str, *, enabled: bool = True) -> None:
    """Print one line of run progress to stdout (header, epoch lines) without breaking an active progress bar."""
    if enabled:
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()


def progress_bar(total: int, initial: int, desc: str, enabled: bool) -> tqdm:
    """A tqdm bar over one epoch's steps (``initial`` > 0 after a mid-epoch resume); silent when not ``enabled``.

    Redirected to a file or a pipe, the bar refreshes every 30 s instead of every step, so logs stay readable.
    """
    interval = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not enabled,
        dynamic_ncols=True,
        leave=False,
        mininterval=interval,
    )


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MB: CUDA max allocated since the last ``torch.cuda.reset_peak_memory_stats`` on CUDA;
    on CPU the process's peak resident set size (approximate: it includes the Python runtime and data workers'
    parent-side buffers, and never goes down)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss / 2**20 if sys.platform == "darwin" else max_rss / 2**10  # bytes on macOS, KiB on Linux
