"""Every user error, through the command line: exit status 2, one line on stderr, no traceback (issue 8).

One table, ``CASES``: a name, the command (``{config}``, ``{run}``, ``{tmp}``, ``{data}``, ``{ckpt}`` are filled in),
how to prepare what it needs, and the exact message (a regular expression only where the text comes from PIL or
torch). Rows marked ``before_work`` must fail before any work: nothing on stdout, no file in the run directory.
Config rows run through both ``unikd config`` and ``unikd train``, which must reject the same things.
"""

from __future__ import annotations

import gzip
import os
import re
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import write_idx, write_imagefolder
from PIL import Image

from unikd import cli
from unikd._checkpoint import RESUME_ENTRIES, load_checkpoint, save_checkpoint
from unikd._rundir import lock_run_directory

REPO = Path(__file__).parents[1]
TINY = [
    "train.epochs=1",
    "train.batch_size=4",
    "train.eval_batch_size=8",
    "train.max_steps_per_epoch=2",
    "train.progress=false",
    "train.tensorboard=false",
    "data.num_workers=0",
    "model.student_kwargs={{width: 4}}",  # braces doubled: the args are format strings
    "output_dir={run}",
]
FAKE = ["data.name=fake", "data.img_size=8", "data.train_subset=16", "data.val_subset=8", *TINY]
EMA = ["method.name=uskd", "method.target_soft_label=ema"]
CACHE = [
    *FAKE,
    *("method.name=kd", "model.teacher=cifar/smallcnn", "model.teacher_kwargs={{width: 4}}"),
    *("model.teacher_checkpoint={tmp}/teacher.pt", "train.teacher_cache={tmp}/cache"),
]
EVAL_FAKE = ["data.name=fake", "data.img_size=8", "data.val_subset=8", "model.student_kwargs={{width: 4}}"]


@dataclass
class Case:
    """One user error: ``args`` for ``unikd``; ``prepare(ctx)`` makes the files; ``message`` after 'unikd: error: '."""

    name: str
    args: list[str]
    message: str
    prepare: Callable[[Context], None] | None = None
    regex: bool = False
    before_work: bool = True
    both_commands: bool = False  # a config error: `unikd config` must reject it too


@dataclass
class Context:
    tmp: Path
    request: pytest.FixtureRequest
    monkeypatch: pytest.MonkeyPatch
    values: dict = field(default_factory=dict)

    @property
    def run(self) -> Path:
        return self.tmp / "run"


# ---- preparations --------------------------------------------------------------------------------------------------


def _config(text: bytes) -> Callable[[Context], None]:
    def prepare(ctx: Context) -> None:
        (ctx.tmp / "run.yaml").write_bytes(text)

    return prepare


def _teacher_file(ctx: Context) -> None:
    (ctx.tmp / "teacher.pt").write_bytes(b"")


def _teacher_of_100_classes(ctx: Context) -> None:
    torch.save({"format": "unikd-checkpoint", "version": 2, "num_classes": 100, "model": {}}, ctx.tmp / "teacher.pt")


def _one_class_folder(ctx: Context) -> None:
    root = ctx.tmp / "data"
    for split in ("train", "val"):
        (root / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / split / "cat" / "0.png")
    ctx.values["data"] = root


def _small_folder(ctx: Context) -> Path:
    root = write_imagefolder(ctx.tmp / "data", per_class={"train": 2, "val": 1}, size=16)  # 8 training images
    ctx.values["data"] = root
    return next(iter(sorted((root / "train" / "cat").iterdir())))


def _truncated_image(ctx: Context) -> None:
    image = _small_folder(ctx)
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    ctx.values["bad"] = image


def _random_bytes_image(ctx: Context) -> None:
    image = _small_folder(ctx)
    image.write_bytes(os.urandom(300))
    ctx.values["bad"] = image


def _smallcnn_teacher(ctx: Context, *, logit: float = 0.0) -> None:
    """A teacher file (cifar/smallcnn, width 4) for the teacher-cache rows; ``logit``: every class's bias."""
    from unikd.models import create_model

    state = create_model("cifar/smallcnn", 10, width=4).state_dict()
    state["fc.bias"] = torch.full_like(state["fc.bias"], logit)
    torch.save(state, ctx.tmp / "teacher.pt")


def _cache_disk_full(ctx: Context) -> None:
    import types

    import unikd._teacher_cache

    _smallcnn_teacher(ctx)
    usage = types.SimpleNamespace(disk_usage=lambda path: types.SimpleNamespace(free=100))
    ctx.monkeypatch.setattr(unikd._teacher_cache, "shutil", usage)


def _stale_cache(ctx: Context) -> None:
    import unikd._teacher_cache
    from unikd.config import load_config
    from unikd.train import train

    _smallcnn_teacher(ctx)
    # A first run stores every logit 0.5 off: what a change the fingerprints do not see would give.
    real_put = unikd._teacher_cache.TeacherCache.put
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(unikd._teacher_cache.TeacherCache, "put", lambda self, keys, x: real_put(self, keys, x + 0.5))
        train(load_config(None, [arg.format(tmp=ctx.tmp, run=ctx.tmp / "first") for arg in CACHE]))


def _png_header(width: int, height: int) -> bytes:
    """A PNG that only claims its size: what a decompression bomb's header looks like (PIL checks it on open)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _decompression_bomb(ctx: Context) -> None:
    image = _small_folder(ctx)
    image.write_bytes(_png_header(30_000, 30_000))
    ctx.values["bad"] = image


def _truncated_gzip(ctx: Context) -> None:
    root = write_idx(ctx.tmp / "data", num_train=40, num_test=20, gz=True)
    images = root / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:200])
    ctx.values["data"] = root


def _mismatched_idx(ctx: Context) -> None:
    root = write_idx(ctx.tmp / "data", num_train=40, num_test=20, gz=True)
    labels = root / "train-labels-idx1-ubyte.gz"
    with gzip.open(labels, "wb") as file:  # 39 labels for 40 images
        file.write(struct.pack(">BBBBI", 0, 0, 8, 1, 39) + bytes(39))
    ctx.values["data"] = root


def _trained_run(ctx: Context, run: Path | None = None) -> Path:
    """A finished tiny run in ``run`` (default: the case's run directory); returns its last.pt."""
    args = ["train", os.devnull, *(arg.format(run=run or ctx.run) for arg in FAKE)]
    assert cli.main(args) == 0
    ctx.values["ckpt"] = (run or ctx.run) / "last.pt"
    return ctx.values["ckpt"]


def _checkpoint_without(*keys: str) -> Callable[[Context], None]:
    def prepare(ctx: Context) -> None:
        checkpoint = load_checkpoint(_trained_run(ctx, ctx.tmp / "source"), RESUME_ENTRIES)
        for key in keys:
            del checkpoint[key]
        save_checkpoint(checkpoint, ctx.tmp / "partial.pt")
        ctx.values["ckpt"] = ctx.tmp / "partial.pt"

    return prepare


def _last_checkpoint_without_optimizer(ctx: Context) -> None:
    checkpoint = load_checkpoint(_trained_run(ctx), RESUME_ENTRIES)
    del checkpoint["optimizer"]
    save_checkpoint(checkpoint, ctx.run / "last.pt")


def _checkpoint_of_another_model(ctx: Context) -> None:
    checkpoint = load_checkpoint(_trained_run(ctx, ctx.tmp / "source"), RESUME_ENTRIES)
    checkpoint["model_name"] = checkpoint["config"]["model"]["student"] = "cifar/resnet8"
    checkpoint["config"]["model"]["student_kwargs"] = {}
    save_checkpoint(checkpoint, ctx.tmp / "renamed.pt")
    ctx.values["ckpt"] = ctx.tmp / "renamed.pt"


def _file(content: bytes) -> Callable[[Context], None]:
    def prepare(ctx: Context) -> None:
        (ctx.tmp / "model.pt").write_bytes(content)
        ctx.values["ckpt"] = ctx.tmp / "model.pt"

    return prepare


def _code_running_pickle(ctx: Context) -> None:
    class RunsCode:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"format": "unikd-checkpoint", "payload": RunsCode()}, ctx.tmp / "model.pt")
    ctx.values["ckpt"] = ctx.tmp / "model.pt"


def _weights_file(num_classes: int = 10) -> Callable[[Context], None]:
    def prepare(ctx: Context) -> None:
        from unikd.models import create_model, export_state_dict

        metadata = {"model_name": "cifar/smallcnn", "num_classes": num_classes}
        model = create_model("cifar/smallcnn", num_classes, width=4)
        export_state_dict(model, ctx.tmp / "w.safetensors", metadata=metadata)

    return prepare


def _foreign_weights(ctx: Context) -> None:
    torch.save({"encoder.stem.weight": torch.zeros(4, 3, 3, 3)}, ctx.tmp / "w.pth")


def _uskd_run(*overrides: str, drop: str | None = None) -> Callable[[Context], None]:
    """A finished tiny USKD run in {tmp}/source with ``overrides``; its last.pt, less the entry ``drop``, as {ckpt}."""

    def prepare(ctx: Context) -> None:
        source = ctx.tmp / "source"
        _weights_file()(ctx)  # a teacher, for a run that takes its soft target from one
        own = [arg.format(tmp=ctx.tmp) for arg in overrides]
        args = ["train", os.devnull, *(arg.format(run=source) for arg in FAKE), "method.name=uskd", *own]
        assert cli.main(args) == 0
        ctx.values["ckpt"] = source / "last.pt"
        if drop is not None:
            checkpoint = load_checkpoint(source / "last.pt", RESUME_ENTRIES)
            del checkpoint[drop]
            save_checkpoint(checkpoint, source / "last.pt")

    return prepare


def _ema_run_without_its_ema(ctx: Context) -> None:
    args = ["train", os.devnull, *(arg.format(run=ctx.run) for arg in FAKE), *EMA]
    assert cli.main(args) == 0
    checkpoint = load_checkpoint(ctx.run / "last.pt", RESUME_ENTRIES)
    del checkpoint["ema"]
    save_checkpoint(checkpoint, ctx.run / "last.pt")


def _output_dir_is_a_file(ctx: Context) -> None:
    ctx.run.write_text("")


def _read_only_output_dir(ctx: Context) -> None:
    import tempfile

    real_mkstemp = tempfile.mkstemp

    def read_only(*args, prefix=None, dir=None, **kwargs):
        if Path(dir or ".") == ctx.run:
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*args, prefix=prefix, dir=dir, **kwargs)

    ctx.monkeypatch.setattr(tempfile, "mkstemp", read_only)


def _locked_output_dir(ctx: Context) -> None:
    ctx.run.mkdir()
    ctx.values["lock"] = lock_run_directory(ctx.run)
    ctx.values["lock"].__enter__()


CASES = [
    # ---- config files and values
    Case(
        "config-not-utf8",
        ["train", "{tmp}/run.yaml", *FAKE],
        "{tmp}/run.yaml: not UTF-8 text (byte 0xe9 at offset 17); save it as UTF-8",
        _config("train:\n  epochs: \xe9t\xe9\n".encode("latin-1")),
        both_commands=True,
    ),
    Case(
        "duplicate-yaml-section",
        ["train", "{tmp}/run.yaml", *FAKE],
        "{tmp}/run.yaml: invalid YAML at line 3, column 1: duplicate key 'train' (first at line 1); merge the two, "
        "the second would silently replace the first",
        _config(b"train:\n  epochs: 3\ntrain:\n  seed: 1\n"),
        both_commands=True,
    ),
    Case(
        "negative-seed",
        ["train", os.devnull, *FAKE, "train.seed=-1"],
        "train.seed: must be >= 0, got -1",
        both_commands=True,
    ),
    Case(
        "huge-seed",
        ["train", os.devnull, *FAKE, "train.seed=1099511627776"],
        "train.seed: must be <= 4294967295, got 1099511627776",
        both_commands=True,
    ),
    Case(
        "temperature-zero",
        [
            "train",
            os.devnull,
            *FAKE,
            "method.name=kd",
            "model.teacher=cifar/smallcnn",
            "model.teacher_checkpoint={tmp}/teacher.pt",
            "method.temperature=0",
        ],
        "method.temperature: must be > 0 for method 'kd', got 0.0",
        _teacher_file,
        both_commands=True,
    ),
    Case(
        "teacher-for-another-class-count",
        [
            "train",
            os.devnull,
            *FAKE,
            "method.name=kd",
            "model.teacher=cifar/smallcnn",
            "model.teacher_checkpoint={tmp}/teacher.pt",
        ],
        "model.teacher_checkpoint: the teacher in {tmp}/teacher.pt predicts 100 classes but the dataset has 10",
        _teacher_of_100_classes,
        both_commands=True,
    ),
    Case(
        "smoothing-two",
        ["train", os.devnull, *FAKE, "method.name=ls", "method.smoothing=2"],
        "method.smoothing: must be in [0, 1) for method 'ls', got 2.0",
        both_commands=True,
    ),
    Case(
        "nan-lr",
        ["train", os.devnull, *FAKE, "optim.lr=nan"],
        "optim.lr: must be a finite number, got nan",
        both_commands=True,
    ),
    Case(
        "inf-momentum",
        ["train", os.devnull, *FAKE, "optim.momentum=.inf"],
        "optim.momentum: must be a finite number, got inf",
        both_commands=True,
    ),
    Case(
        "nan-weight-decay",
        ["train", os.devnull, *FAKE, "optim.weight_decay=.nan"],
        "optim.weight_decay: must be a finite number, got nan",
        both_commands=True,
    ),
    Case(
        "unknown-choice",
        ["train", os.devnull, *FAKE, "method.name=uskd", "method.rank=foo"],
        "method.rank: 'foo' is not one of final, paper, released, sum, weak",
        both_commands=True,
    ),
    Case(
        "unknown-student-kwarg",
        ["train", os.devnull, *FAKE, "model.student_kwargs.depth=3"],
        "model.student_kwargs.depth: cifar/smallcnn (SmallCNN) takes no such argument",
        both_commands=True,
    ),
    Case(
        "unknown-model",
        ["train", os.devnull, *FAKE, "model.student=cifar/resnet9"],
        r"model\.student: unknown model 'cifar/resnet9'.*",  # the rest is the model factory's suggestion
        both_commands=True,
        regex=True,
    ),
    Case(
        "grayscale-for-torchvision",
        [
            "train",
            os.devnull,
            *TINY,
            "data.name=fashion_mnist",
            "model.student=tv/resnet18",
            "model.student_kwargs={{}}",
        ],
        "model.student: torchvision models take 3-channel images and fashion_mnist has 1; set data.channels=3 to "
        "repeat its grayscale channel",
        both_commands=True,
    ),
    Case(
        "channels-of-an-rgb-dataset",
        ["train", os.devnull, *FAKE, "data.channels=1"],
        "data.channels: fake images have 3 channels; data.channels can only repeat a grayscale channel "
        "(data.channels=3)",
        both_commands=True,
    ),
    Case(
        "unknown-weights-format",
        ["train", os.devnull, *FAKE, "model.teacher_format=crd"],
        "model.teacher_format: 'crd' is not one of auto, mdistiller, mmpretrain, native",
        both_commands=True,
    ),
    Case(
        "unknown-teacher-mode",
        ["train", os.devnull, *FAKE, "model.teacher_mode=frozen"],
        "model.teacher_mode: 'frozen' is not one of eval, train",
        both_commands=True,
    ),
    Case(
        "student-checkpoint-not-found",
        ["train", os.devnull, *FAKE, "model.student_checkpoint={tmp}/released.pth"],
        "model.student_checkpoint: file not found: {tmp}/released.pth",
        both_commands=True,
    ),
    Case(
        "teacher-soft-target-without-a-teacher",
        ["train", os.devnull, *FAKE, "method.name=uskd", "method.target_soft_label=teacher"],
        "model.teacher: method 'uskd' with method.target_soft_label=teacher needs a teacher (e.g. "
        "model.teacher=cifar/resnet32x4 model.teacher_checkpoint=PATH)",
        both_commands=True,
    ),
    Case(
        "ema-decay-one",
        ["train", os.devnull, *FAKE, *EMA, "train.ema_decay=1"],
        "train.ema_decay: must be < 1 (1 would keep the student's initial weights), got 1.0",
        both_commands=True,
    ),
    Case(
        "eval-crop-over-one",
        ["train", os.devnull, *FAKE, "data.eval_crop_pct=1.5"],
        "data.eval_crop_pct: must be <= 1, got 1.5",
        both_commands=True,
    ),
    Case(
        "detection-config-to-train",
        ["train", str(REPO / "configs/detection/mosaics_student.yaml"), "output_dir={run}"],
        f"{REPO}/configs/detection/mosaics_student.yaml: a detection config (task: detection); run it with unikd "
        "detect train (check it with unikd detect config)",
        both_commands=True,
    ),
    Case(
        "student-checkpoint-of-another-model",
        ["train", os.devnull, *FAKE, "model.student_checkpoint={tmp}/w.pth"],
        "{tmp}/w.pth (torch zip file; plain state_dict) fits no weights layout of cifar/smallcnn; tried native (38 "
        "missing, 1 unexpected), mdistiller (not applicable: cifar/smallcnn has no mdistiller counterpart), mmpretrain "
        "(not applicable: no backbone./head. keys). Closest, native: missing keys (38): layer1.0.0.weight, "
        "layer1.0.1.weight, layer1.0.1.bias, ...; unexpected keys (1): encoder.stem.weight. Check that the file holds "
        "a cifar/smallcnn, or name its format (one of native, mdistiller, mmpretrain)",
        _foreign_weights,
    ),
    # ---- data
    Case(
        "one-class-imagefolder",
        ["train", os.devnull, *TINY, "data.name=imagefolder", "data.root={data}", "data.img_size=8"],
        "data.root: {data}/train has one class folder (cat); classification needs at least two",
        _one_class_folder,
    ),
    Case(
        "truncated-image",
        ["train", os.devnull, *TINY, "data.name=imagefolder", "data.root={data}", "data.img_size=8"],
        r"data: cannot read image {bad} \(OSError: image file is truncated\); replace or remove it \(unikd stops "
        r"rather than skip images\); saved {run}/last\.pt, continue with --resume once it is fixed",
        _truncated_image,
        regex=True,
        before_work=False,
    ),
    Case(
        "unreadable-image-in-a-worker",
        [
            "train",
            os.devnull,
            *TINY,
            "data.name=imagefolder",
            "data.root={data}",
            "data.img_size=8",
            "data.num_workers=1",
        ],
        r"data: cannot read image {bad} \(not an image format PIL knows\); replace or remove it \(unikd stops rather "
        r"than skip images\); saved {run}/last\.pt, continue with --resume once it is fixed",
        _random_bytes_image,
        regex=True,
        before_work=False,
    ),
    Case(
        "decompression-bomb",
        ["train", os.devnull, *TINY, "data.name=imagefolder", "data.root={data}", "data.img_size=8"],
        r"data: {bad} is too large to decode safely \(DecompressionBombError: Image size \(900000000 pixels\) "
        r"exceeds limit of \d+ pixels, could be decompression bomb DOS attack\.\); shrink or remove the image \(the "
        r"limit is PIL\.Image\.MAX_IMAGE_PIXELS\); saved {run}/last\.pt, continue with --resume once it is fixed",
        _decompression_bomb,
        regex=True,
        before_work=False,
    ),
    # ---- the teacher-logit cache
    Case(
        "teacher-cache-disk-full",
        ["train", os.devnull, *CACHE],
        "teacher cache {tmp}/cache: this run needs 464 bytes more for 1 epoch of teacher logits (464 bytes an epoch: "
        "8 x 10 float32) but its disk has 100 bytes free; free space, set train.teacher_cache_dtype=float16 (half the "
        "size), point train.teacher_cache at a bigger disk, or set train.teacher_cache=null",
        _cache_disk_full,
    ),
    Case(
        "teacher-cache-stale",
        ["train", os.devnull, *CACHE, "train.teacher_cache_verify=1"],
        r"teacher cache {tmp}/cache/[0-9a-f]{{16}}-[0-9a-f]{{16}}-float32: the cached logits of seed 0, epoch 0, "
        r"sample \d+ differ from the live teacher's by up to 0\.5 \(4 of 4 rows differ\); the cache is stale \(a "
        r"change the fingerprints do not see\) or the teacher is not deterministic here: delete "
        r"{tmp}/cache/[0-9a-f]{{16}}-[0-9a-f]{{16}}-float32, or set train.teacher_cache=null",
        _stale_cache,
        regex=True,
        before_work=False,
    ),
    Case(
        "teacher-cache-float16-overflow",
        ["train", os.devnull, *CACHE, "train.teacher_cache_dtype=float16"],
        "teacher cache {tmp}/cache: teacher logits beyond 65504 do not fit float16; set "
        "train.teacher_cache_dtype=float32",
        lambda ctx: _smallcnn_teacher(ctx, logit=1e5),
        before_work=False,
    ),
    Case(
        "truncated-fashion-mnist-gz",
        ["train", os.devnull, *TINY, "data.name=fashion_mnist", "data.root={data}"],
        "data.root: {data}/train-images-idx3-ubyte.gz is damaged or truncated (EOFError: Compressed file ended before "
        "the end-of-stream marker was reached); reinstall it (apt-get install --reinstall dataset-fashion-mnist) or "
        "copy the file again",
        _truncated_gzip,
    ),
    Case(
        "idx-labels-do-not-match-images",
        ["train", os.devnull, *TINY, "data.name=fashion_mnist", "data.root={data}"],
        "data.root: {data}/train-images-idx3-ubyte.gz holds 40 images but {data}/train-labels-idx1-ubyte.gz 39 "
        "labels; reinstall it (apt-get install --reinstall dataset-fashion-mnist) or copy the file again",
        _mismatched_idx,
    ),
    # ---- checkpoints
    Case(
        "checkpoint-missing-entries",
        ["eval", "{ckpt}"],
        "{ckpt}: the unikd checkpoint lacks model, config (cut short or edited?); use a checkpoint written by unikd "
        "train",
        _checkpoint_without("model", "config"),
    ),
    Case(
        "resume-from-a-checkpoint-missing-entries",
        ["train", os.devnull, *FAKE, "--resume"],
        "{run}/last.pt: the unikd checkpoint lacks optimizer (cut short or edited?); use a checkpoint written by "
        "unikd train",
        _last_checkpoint_without_optimizer,
        before_work=False,  # the run directory exists
    ),
    Case(
        "weights-do-not-match-model-name",
        ["eval", "{ckpt}", "data.val_subset=8"],
        r"{ckpt} \(weights for model_name cifar/resnet8 with 10 classes\) does not fit the model: missing entries "
        r"\(\d+\): .*; the file was edited or mixes two models",
        _checkpoint_of_another_model,
        regex=True,
    ),
    Case(
        "empty-checkpoint",
        ["eval", "{ckpt}"],
        "cannot read {ckpt}: the file is empty (0 bytes), probably cut off while it was written or copied; copy or "
        "download it again",
        _file(b""),
    ),
    Case(
        "random-bytes-checkpoint",
        ["export", "{ckpt}", "{tmp}/out.safetensors"],
        r"cannot read {ckpt}: not a PyTorch or safetensors file \(it starts with the bytes 13 37 13 37 13 37 13 "
        r"37\); expected a file written by torch\.save or safetensors",
        _file(b"\x13\x37" * 64),
        regex=True,
    ),
    Case(
        "checkpoint-that-would-run-code",
        ["eval", "{ckpt}"],
        r"refused to load {ckpt}: its pickle calls posix\.system, which would run code when unpickled; nothing was "
        r"run\. .*",
        _code_running_pickle,
        regex=True,
    ),
    Case(
        "resume-an-ema-run-whose-checkpoint-lost-its-ema",
        ["train", os.devnull, *FAKE, *EMA, "--resume"],
        "--resume: cannot restore the run from {run}/last.pt (KeyError: 'ema')",
        _ema_run_without_its_ema,
        before_work=False,
    ),
    Case(
        "eval-weights-of-another-class-count",
        ["eval", "--model", "cifar/smallcnn", "{tmp}/w.safetensors", *EVAL_FAKE],
        "{tmp}/w.safetensors (unikd export of cifar/smallcnn; native layout; saved from cifar/smallcnn with 100 "
        "classes), loaded into cifar/smallcnn with 10 classes, does not fit the model: shape mismatches (2): "
        "fc.weight: checkpoint (100, 16) vs model (10, 16), fc.bias: checkpoint (100,) vs model (10,); the classifier "
        "differs: use weights trained on a dataset with that many classes",
        _weights_file(100),
    ),
    Case(
        "eval-weights-without-a-dataset",
        ["eval", "--model", "cifar/smallcnn", "{tmp}/w.safetensors"],
        "data.name: which dataset? pass --data ROOT (an ImageNet-layout or CIFAR folder is recognised) or "
        "data.name=... (one of cifar10, cifar100, fashion_mnist, mnist, imagefolder, fake)",
        _weights_file(),
    ),
    Case(
        "eval-weights-from-an-unknown-folder",
        ["eval", "--model", "cifar/smallcnn", "{tmp}/w.safetensors", "--data", "{tmp}"],
        "data.name: cannot tell which dataset {tmp} holds (no train/ or val/ folder of an ImageNet layout, no "
        "cifar-10-batches-py/ or cifar-100-python/); pass data.name=... (e.g. data.name=fashion_mnist)",
        _weights_file(),
    ),
    Case(
        "eval-weights-in-an-unknown-format",
        ["eval", "--model", "cifar/smallcnn", "{tmp}/w.safetensors", *EVAL_FAKE, "--format", "crd"],
        "--format: 'crd' is not one of auto, mdistiller, mmpretrain, native",
        _weights_file(),
    ),
    Case(
        "eval-format-without-model",
        ["eval", "{tmp}/w.safetensors", "--format", "mdistiller"],
        "--format: only with --model NAME (a unikd checkpoint says what it holds)",
    ),
    Case(
        "softlabels-of-a-teacher-soft-target-run-without-the-teacher",
        ["softlabels", "{ckpt}", "--out", "{tmp}/out"],
        "model.teacher: method 'uskd' with method.target_soft_label=teacher needs a teacher (e.g. "
        "model.teacher=cifar/resnet32x4 model.teacher_checkpoint=PATH)",
        _uskd_run(
            "method.target_soft_label=teacher",
            "model.teacher=cifar/smallcnn",
            "model.teacher_kwargs={{width: 4}}",
            "model.teacher_checkpoint={tmp}/w.safetensors",
        ),
    ),
    Case(
        "softlabels-of-a-run-without-weak-head",
        ["softlabels", "{ckpt}", "--out", "{tmp}/out"],
        "{ckpt}: this USKD run had no weak head (method.beta=0, method.mu=0), so it trained no non-target soft labels "
        "to show",
        _uskd_run("method.beta=0", "method.mu=0"),
    ),
    Case(
        "softlabels-of-an-ema-run-without-its-ema",
        ["softlabels", "{ckpt}", "--out", "{tmp}/out", "data.val_subset=8"],
        "{ckpt}: a target_soft_label=ema run, but the checkpoint holds no EMA weights",
        _uskd_run("method.target_soft_label=ema", drop="ema"),
    ),
    # ---- the run directory
    Case(
        "output-dir-is-a-file",
        ["train", os.devnull, *FAKE],
        "output_dir: {run} is a file, not a folder; choose another output_dir",
        _output_dir_is_a_file,
    ),
    Case(
        "output-dir-under-a-file",
        ["train", os.devnull, *FAKE[:-1], "output_dir={run}/inner"],
        "output_dir: {run}/inner is inside {run}, which is a file; choose another output_dir",
        _output_dir_is_a_file,
    ),
    Case(
        "output-dir-not-writable",
        ["train", os.devnull, *FAKE],
        "output_dir: cannot write in {run} (Permission denied); fix its permissions or choose another output_dir",
        _read_only_output_dir,
    ),
    Case(
        "output-dir-in-use",
        ["train", os.devnull, *FAKE],
        r"output_dir {run} is in use by another unikd run \(pid \d+ on .*\); wait for it to end, or choose another "
        r"output_dir",
        _locked_output_dir,
        regex=True,
        before_work=False,  # the lock file is there
    ),
    Case(
        "resume-with-a-changed-learning-rate",
        ["train", os.devnull, *FAKE, "optim.lr=0.5", "--resume"],
        r"--resume: the config differs from the one {run}/last\.pt was trained with: optim\.lr 0\.1 -> 0\.5\. Only "
        r"output_dir, .* may change on resume; resume with the run's config \({run}/config\.yaml\), or start a new "
        r"run in another output_dir",
        _trained_run,
        regex=True,
        before_work=False,
    ),
    # ---- command arguments
    Case(
        "softlabels-zero-images",
        ["softlabels", "{tmp}/any.pt", "--out", "{tmp}/out", "--num-images", "0"],
        "--num-images: must be at least 1, got 0",
    ),
    Case(
        "softlabels-negative-images",
        ["softlabels", "{tmp}/any.pt", "--out", "{tmp}/out", "--num-images", "-3"],
        "--num-images: must be at least 1, got -3",
    ),
]


def test_the_table_covers_every_case_once():
    assert len({case.name for case in CASES}) == len(CASES)


def _commands(case: Case) -> list[str]:
    return ["train", "config"] if case.both_commands else [case.args[0]]


@pytest.mark.parametrize(
    ("case", "command"),
    [pytest.param(case, command, id=f"{case.name}-{command}") for case in CASES for command in _commands(case)],
)
def test_user_error_exits_2_with_one_line(case, command, tmp_path, request, monkeypatch, capsys):
    ctx = Context(tmp_path, request, monkeypatch)
    if case.prepare is not None:
        case.prepare(ctx)
    fill = {"tmp": tmp_path, "run": ctx.run, **ctx.values}
    args = [arg.format(**fill) for arg in case.args]
    if command == "config":
        args = ["config", *(arg for arg in args[1:] if not arg.startswith("output_dir=") and arg != "--resume")]
    capsys.readouterr()
    try:
        status = cli.main(args)
    finally:
        if "lock" in ctx.values:
            ctx.values["lock"].__exit__(None, None, None)
    out, err = capsys.readouterr()
    assert status == 2, err
    assert err.startswith("unikd: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    message = err.removeprefix("unikd: error: ").removesuffix("\n")
    if case.regex:
        assert re.fullmatch(case.message.format(**{k: re.escape(str(v)) for k, v in fill.items()}), message), message
    else:
        assert message == case.message.format(**fill)
    assert "Traceback" not in err and "weights_only" not in err
    if case.before_work:
        assert out == ""
        made = [p.name for p in ctx.run.iterdir()] if ctx.run.is_dir() else []
        assert not {"config.yaml", "metrics.jsonl", "last.pt"} & set(made)


def test_a_data_error_in_a_real_process_is_one_line_too(tmp_path):
    root = write_imagefolder(tmp_path / "data", per_class={"train": 2, "val": 1}, size=16)
    bad = sorted((root / "train" / "dog").iterdir())[0]
    bad.write_bytes(b"not an image")
    args = [arg.format(run=tmp_path / "run") for arg in TINY]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, "-m", "unikd", "train", os.devnull, *args, "data.name=imagefolder", f"data.root={root}"]
    result = subprocess.run(
        [*command, "data.img_size=8", "data.num_workers=1"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"unikd: error: data: cannot read image {bad} (not an image format PIL knows); replace or remove it (unikd "
        f"stops rather than skip images); saved {tmp_path / 'run' / 'last.pt'}, continue with --resume once it is "
        "fixed\n"
    )
