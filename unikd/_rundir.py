"""The run directory a training run owns: its lock, the checks made before any work, a checkpoint set that stays
consistent when the process is killed at any instant, and metrics that a resume does not duplicate.

    output_dir = prepare_output_dir(cfg.output_dir)        # a folder that exists or can be made; clear error else
    with lock_run_directory(output_dir):                    # a second run in the same folder fails at once
        remove_temp_files(output_dir)                       # left by a kill inside atomic_write
        check_writable(output_dir, bytes_needed)            # read-only or full: found now, not after an epoch
        last, notes = reconcile_checkpoints(output_dir)     # --resume: repair what a kill between writes left
        trim_metrics(output_dir / METRICS, last["step"], last["epoch"])
        ...
        write_checkpoints(output_dir, checkpoint, is_best=True)   # best.pt, then last.pt
        write_json(output_dir / FINAL, result)

The checkpoint set. ``last.pt`` is the state to continue from; its ``metrics`` record ``best_epoch``. When that is
not ``None``, ``best.pt`` is the checkpoint written at the end of epoch ``best_epoch`` (its ``epoch`` is
``best_epoch + 1``, its ``run_id`` that of ``last.pt``); a run that evaluates every so many steps (detection) records
``best_step`` instead, and ``best.pt`` is its checkpoint of that step. ``final.json`` exists only once the run is
complete.
Every file is written by ``atomic_write`` (temp file, fsync, rename), so each one is either the old or the new
version; across files, the order in ``write_checkpoints`` (best.pt before last.pt, the same dict in both) means a
kill between the two leaves ``best.pt`` one evaluation ahead of ``last.pt``, which ``reconcile_checkpoints`` repairs by
rolling ``last.pt`` forward (nothing is retrained, nothing lost). Any other mismatch is reported, never guessed at.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from unikd._checkpoint import RESUME_ENTRIES, TEMP_SUFFIX, atomic_write, load_checkpoint, save_checkpoint
from unikd._errors import UnikdError

LAST, BEST, FINAL, CONFIG, METRICS = "last.pt", "best.pt", "final.json", "config.yaml", "metrics.jsonl"
LOCK = ".lock"
_ONE_MIB = 2**20

__all__ = [
    "BEST",
    "CONFIG",
    "FINAL",
    "LAST",
    "LOCK",
    "METRICS",
    "check_writable",
    "lock_run_directory",
    "prepare_output_dir",
    "reconcile_checkpoints",
    "remove_temp_files",
    "trim_metrics",
    "write_checkpoints",
    "write_json",
    "write_text",
]


def prepare_output_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and its parents) if needed; a ``UnikdError`` when it, or a folder above it, is a file."""
    path = Path(path)
    for folder in (path, *path.parents):
        if folder.exists():
            if folder.is_dir():
                break
            if folder == path:
                raise UnikdError(f"output_dir: {path} is a file, not a folder; choose another output_dir")
            raise UnikdError(f"output_dir: {path} is inside {folder}, which is a file; choose another output_dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UnikdError(f"output_dir: cannot create {path} ({error.strerror}); choose another output_dir") from None
    return path


@contextlib.contextmanager
def lock_run_directory(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run directory ``path`` (a ``flock`` on ``path/.lock``) while the block runs.

    A second holder fails at once with a ``UnikdError`` naming the first (pid and host). The kernel releases the
    lock when the process ends however it ends, so a crash leaves no stale lock, only a stale ``.lock`` file that
    the next run takes over; a clean exit removes the file. On network filesystems ``flock`` is as good as their
    lock support (Linux NFS maps it to NFS locks); where locking is not supported at all the run goes on unlocked.
    """
    fd = _acquire_lock(path / LOCK)
    try:
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                (path / LOCK).unlink()  # while still holding the lock, so no other run locks a file about to vanish
            os.close(fd)


def _acquire_lock(lock_path: Path) -> int | None:
    """The descriptor of the locked ``lock_path``, or ``None`` where the system or filesystem has no locks."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise UnikdError(
                f"output_dir: cannot write in {lock_path.parent} ({error.strerror}); fix its permissions or choose "
                "another output_dir"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise UnikdError(
                f"output_dir {lock_path.parent} is in use by another unikd run ({holder}); wait for it to end, or "
                "choose another output_dir"
            ) from None
        except OSError:  # ENOLCK, EOPNOTSUPP: a filesystem without locks
            os.close(fd)
            return None
        # The previous holder may have removed the file between our open and our flock: lock the file that is there.
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
                return fd
        os.close(fd)


def remove_temp_files(path: Path) -> list[Path]:
    """Delete the temp files ``atomic_write`` left in ``path`` when a process was killed while writing."""
    removed = sorted(path.glob(f".*{TEMP_SUFFIX}"))
    for temp in removed:
        temp.unlink(missing_ok=True)
    return removed


def check_writable(path: Path, bytes_needed: int = 0) -> None:
    """Write and delete a probe file in ``path`` and check that ``bytes_needed`` (one checkpoint) fit on its disk."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=TEMP_SUFFIX, dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise UnikdError(
            f"output_dir: cannot write in {path} ({error.strerror}); fix its permissions or choose another output_dir"
        ) from None
    free = shutil.disk_usage(path).free
    if free < bytes_needed:
        raise UnikdError(
            f"output_dir: disk full: {path} has {free // _ONE_MIB} MiB free but one checkpoint needs about "
            f"{-(-bytes_needed // _ONE_MIB)} MiB; free some space or choose another output_dir"
        )


def write_checkpoints(path: Path, checkpoint: dict, *, is_best: bool) -> None:
    """The one place a run writes its checkpoints: ``best.pt`` first (when ``is_best``), then ``last.pt``.

    The order is what ``reconcile_checkpoints`` relies on; see the module docstring.
    """
    if is_best:
        save_checkpoint(checkpoint, path / BEST)
    save_checkpoint(checkpoint, path / LAST)


def reconcile_checkpoints(
    path: Path,
    load: Callable[[Path], dict] = lambda file: load_checkpoint(file, RESUME_ENTRIES),
    *,
    unit: str = "epoch",
) -> tuple[dict, list[str]]:
    """Check ``path``'s checkpoint set before a resume and repair what a kill between two writes leaves.

    ``unit`` says how a run counts its evaluation points, and so which checkpoint ``best.pt`` must be: ``"epoch"``
    (the classification engine: ``metrics["best_epoch"]``, best.pt written at the end of that epoch) or ``"step"``
    (the detection engine, which evaluates every so many steps: ``metrics["best_step"]``, best.pt written at that
    step). ``load`` reads one file (and may refuse it). Returns the checkpoint to continue from (``last.pt`` after any
    repair) and one note per repair made. Raises ``UnikdError`` naming the files when the set is inconsistent in a
    way no kill of ``write_checkpoints`` produces (a file copied in from another run, a deleted ``best.pt``).
    """
    if unit not in ("epoch", "step"):
        raise ValueError(f"unit: expected 'epoch' or 'step', got {unit!r}")
    last_path, best_path = path / LAST, path / BEST
    notes = []
    if not last_path.is_file() and best_path.is_file():  # stopped between the two writes of the first evaluation
        _copy(best_path, last_path)
        notes.append(f"{last_path} was missing (the run stopped right after writing {best_path}); restored it")
    last = load(last_path)
    best = load(best_path) if best_path.is_file() else None
    if best is not None and best["run_id"] == last["run_id"] and best["step"] > last["step"]:
        behind = "one epoch" if unit == "epoch" else f"{best['step'] - last['step']} steps"
        _copy(best_path, last_path)
        notes.append(
            f"{last_path} was {behind} behind {best_path} (the run stopped between writing the two); "
            f"continuing from {best_path}"
        )
        last = best
    recorded_best = last["metrics"][f"best_{unit}"]
    if best is not None and best["run_id"] != last["run_id"]:
        raise UnikdError(
            f"--resume: {best_path} belongs to another run than {last_path} (run ids {best['run_id']} and "
            f"{last['run_id']}); move one of them away"
        )
    if recorded_best is None:
        return last, notes
    if best is None or not _written_at_evaluation(best, recorded_best, unit):
        if not _written_at_evaluation(last, recorded_best, unit):
            found = "is missing" if best is None else f"holds {unit} {_point(best, unit)}"
            raise UnikdError(
                f"--resume: {best_path} {found}, but {last_path} records {unit} {recorded_best} as the best; restore "
                f"best.pt, or start a new run"
            )
        _copy(last_path, best_path)  # last.pt is that very evaluation's checkpoint
        notes.append(f"{best_path} did not hold the best {unit} {recorded_best}; restored it from {last_path}")
    return last, notes


def _point(checkpoint: dict, unit: str) -> int:
    """Where ``checkpoint`` stands: the epoch it ended (its ``epoch`` is the next one), or its step."""
    return checkpoint["step"] if unit == "step" else checkpoint["epoch"] - 1


def _written_at_evaluation(checkpoint: dict, point: int, unit: str) -> bool:
    """Whether ``checkpoint`` is the one written at evaluation point ``point``: in epochs, at that epoch's end (not by
    an interrupt inside the next); in steps, any checkpoint of that step (the student is the same)."""
    return _point(checkpoint, unit) == point and not (unit == "epoch" and checkpoint["mid_epoch"])


def trim_metrics(path: Path, step: int, epoch: int) -> int:
    """Drop from the metrics file ``path`` what a resume from (``epoch``, ``step``) will log again: records after
    ``step``, evaluations of epochs from ``epoch`` on, and a line cut short by a kill. Returns how many it dropped.
    """
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            keep = record["step"] <= step and (record["split"] != "val" or record["epoch"] < epoch)
        except (json.JSONDecodeError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        write_text(path, "".join(f"{line}\n" for line in kept))
    return dropped


def write_json(path: Path, obj: object) -> None:
    """``obj`` as indented JSON in ``path``, atomically."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
    """``text`` (UTF-8) in ``path``, atomically."""
    atomic_write(path, lambda file: file.write(text.encode()))


def _copy(source: Path, target: Path) -> None:
    with source.open("rb") as file:
        atomic_write(target, lambda out: shutil.copyfileobj(file, out))
