"""The teacher-logit cache (unikd._teacher_cache): exact round trips, kill and concurrency safety, fingerprints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.transforms import v2

from unikd import _teacher_cache
from unikd._errors import UnikdError
from unikd._teacher_cache import (
    HEADER_BYTES,
    Fingerprint,
    TeacherCache,
    data_fingerprint,
    epoch_bytes,
    record_bytes,
    teacher_fingerprint,
    weights_digest,
)

REPO = Path(__file__).parents[1]
NUM_CLASSES = 7
NUM_SAMPLES = 64
TEACHER = Fingerprint("teacher", {"model": "cifar/resnet20", "weights": "sha256:aaaa"})
DATA = Fingerprint("data", {"dataset": "fake", "transform": "Compose(RandomCrop)", "keyed_by": "sample"})


def _cache(root: Path, *, teacher=TEACHER, data=DATA, seed: int = 0, dtype: str = "float32", **kwargs) -> TeacherCache:
    kwargs = {"num_classes": NUM_CLASSES, "num_samples": NUM_SAMPLES, **kwargs}
    return TeacherCache(root, teacher=teacher, data=data, seed=seed, dtype=dtype, **kwargs)


def _keys(epoch: int, indices, batch: int = 0) -> torch.Tensor:
    indices = torch.as_tensor(indices)
    slots = torch.arange(len(indices))
    return torch.stack([torch.full_like(indices, epoch), torch.full_like(indices, batch), slots, indices], dim=1)


def _logits(keys: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Logits that are a function of the key (so any process can check them), with awkward float32 values."""
    generator = torch.Generator().manual_seed(int(keys[:, 0].sum() * 1000 + keys[:, 3].sum()))
    logits = torch.randn(len(keys), num_classes, generator=generator) * 30
    logits[0, :3] = torch.tensor([-0.0, 1e-42, 3.4e38])  # negative zero, a subnormal, near the float32 maximum
    return logits


def _record_files(cache: TeacherCache, epoch: int = 0) -> list[Path]:
    return sorted((cache.entry_dir / f"seed-{cache.seed}" / f"epoch-{epoch:05d}").glob("*.rec"))


def test_float32_round_trip_is_bit_exact_across_records_and_objects(tmp_path):
    writer = _cache(tmp_path)
    first, second = _keys(3, range(0, 8)), _keys(3, range(8, 16), batch=1)
    writer.put(first, _logits(first))
    writer.put(second, _logits(second))
    writer.close()
    reader = _cache(tmp_path)
    for keys in (first, second):
        assert torch.equal(reader.get(keys).view(torch.int32), _logits(keys).view(torch.int32))
    mixed = torch.cat([second[5:], first[2:4]])  # rows of two records, in another order
    expected = torch.cat([_logits(second)[5:], _logits(first)[2:4]])
    assert torch.equal(reader.get(mixed).view(torch.int32), expected.view(torch.int32))
    assert reader.get(_keys(3, range(14, 18))) is None  # rows 16, 17 are not cached: a whole-batch miss
    assert reader.get(_keys(4, range(0, 8))) is None  # another epoch
    assert _cache(tmp_path, seed=1).get(first) is None  # another seed
    assert reader.status(_keys(3, range(NUM_SAMPLES))) == _teacher_cache.CacheStatus(
        16, NUM_SAMPLES, f"48 of {NUM_SAMPLES} teacher logits of seed 0, epoch 3 are not cached"
    )
    assert reader.status(mixed).complete


def test_float16_halves_the_space_and_rounds_within_2_to_the_minus_11(tmp_path):
    keys = _keys(0, range(16))
    live = _logits(keys)
    live[0, 2] = 1e4  # keep within float16's range
    cache = _cache(tmp_path, dtype="float16")
    cache.put(keys, live)
    cached = cache.get(keys)
    assert cached.dtype == torch.float32 and torch.equal(cached, live.half().float())
    relative = ((cached - live).abs() / live.abs().clamp_min(1e-3))[live.abs() > 1e-3]
    assert 0 < relative.max() <= 2**-11
    assert cache.verify(keys, live) == 16  # against the live logits rounded to float16
    assert record_bytes(16, NUM_CLASSES, "float16") - HEADER_BYTES - 16 * 8 == 16 * NUM_CLASSES * 2
    with pytest.raises(UnikdError) as error:
        cache.put(keys, live * 10)
    assert (
        str(error.value) == f"teacher cache {tmp_path}: teacher logits beyond 65504 do not fit float16; set "
        "train.teacher_cache_dtype=float32"
    )


def test_file_size_is_epoch_bytes_and_cifar100_takes_20_mb_an_epoch(tmp_path):
    cache = _cache(tmp_path)
    for batch in range(6):
        keys = _keys(0, range(batch * 10, batch * 10 + 10), batch=batch)
        cache.put(keys, _logits(keys))
    cache.put(_keys(0, range(60, 64), batch=6), _logits(_keys(0, range(60, 64))))
    cache.close()
    assert _record_files(cache)[0].stat().st_size == epoch_bytes(64, 10, NUM_CLASSES) == cache.stored_bytes()
    assert _cache(tmp_path, seed=1).stored_bytes() == 0 == cache.stored_bytes(epochs=range(1, 5))
    assert cache.stored_bytes(epochs=[0, 1]) == cache.stored_bytes()
    assert epoch_bytes(50000 // 128 * 128, 128, 100) == 390 * (HEADER_BYTES + 128 * (8 + 400)) == 20_382_960


def test_batch_keyed_entries_store_each_mixed_batch_slot(tmp_path):
    data = Fingerprint("data", {**DATA.fields, "keyed_by": "batch", "batch_size": "8"})
    cache = _cache(tmp_path, data=data)
    first, second = _keys(0, [5, 6, 7, 8, 9, 10, 11, 12], batch=0), _keys(0, [5, 6, 7, 8, 9, 10, 11, 12], batch=1)
    cache.put(first, _logits(first))
    assert cache.get(second) is None  # the same samples in another batch: other mixed images
    cache.put(second, _logits(second) + 1)
    assert torch.equal(cache.get(first), _logits(first)) and torch.equal(cache.get(second), _logits(second) + 1)
    assert cache.status(torch.cat([first, second])).complete
    with pytest.raises(ValueError, match=r"outside \[0, 64\)"):
        cache.get(_keys(0, range(8), batch=8))


def test_a_torn_or_garbled_tail_is_never_read(tmp_path):
    cache = _cache(tmp_path)
    batches = [_keys(0, range(start, start + 8), batch=start // 8) for start in (0, 8, 16)]
    for keys in batches:
        cache.put(keys, _logits(keys))
    cache.close()
    path = _record_files(cache)[0]
    full = path.read_bytes()
    size = record_bytes(8, NUM_CLASSES)
    for cut in (1, HEADER_BYTES // 2, size - HEADER_BYTES, size - 1):  # the last record torn at several points
        path.write_bytes(full[: 3 * size - cut])
        reader = _cache(tmp_path)
        assert torch.equal(reader.get(batches[1]), _logits(batches[1]))
        assert reader.get(batches[2]) is None and reader.status(torch.cat(batches)).cached == 16
        reader.close()
    path.write_bytes(full + os.urandom(3 * size))  # garbage after complete records
    reader = _cache(tmp_path)
    assert reader.status(torch.cat(batches)).complete and torch.equal(reader.get(batches[2]), _logits(batches[2]))
    reader.close()
    garbled = bytearray(full)
    garbled[size + HEADER_BYTES + 8 * 8 + 5] ^= 0x01  # one bit of record 1's logits
    garbled[2 * size + 3] ^= 0xFF  # record 2's header: nothing after it can be trusted
    path.write_bytes(bytes(garbled))
    reader = _cache(tmp_path)
    assert reader.status(torch.cat(batches)).cached == 16  # the header and rows of record 1 are intact...
    assert reader.get(batches[1]) is None  # ...its logits fail their checksum: a miss
    assert reader.status(torch.cat(batches)) == _teacher_cache.CacheStatus(
        8, 24, "16 of 24 teacher logits of seed 0, epoch 0 are not cached (2 damaged records ignored)"
    )
    assert torch.equal(reader.get(batches[0]), _logits(batches[0]))
    reader.put(batches[1], _logits(batches[1]))  # a run that recomputes them heals the entry
    assert torch.equal(reader.get(batches[1]), _logits(batches[1]))


# A writer process for the kill and concurrency tests: put records, each row's logits a function of its key.
_WRITER = """
import json, sys, time, torch
from pathlib import Path
from unikd._teacher_cache import Fingerprint, TeacherCache
args = json.loads(sys.argv[1])
cache = TeacherCache(args["root"], teacher=Fingerprint(**args["teacher"]), data=Fingerprint(**args["data"]), seed=0,
                     num_classes=args["classes"], num_samples=args["samples"])
def logits(keys):
    return (keys[:, 3:4] * 1000 + torch.arange(args["classes"])).float() / 7
start = Path(args["root"]) / "start"
while not start.exists():
    time.sleep(0.001)
for first in args["firsts"]:
    keys = torch.stack([torch.zeros(args["rows"], dtype=torch.long), torch.zeros(args["rows"], dtype=torch.long),
                        torch.arange(args["rows"]), torch.arange(first, first + args["rows"])], dim=1)
    cache.put(keys, logits(keys))
    time.sleep(args["pause"])
cache.close()
print("done", flush=True)
"""


def _writer(root: Path, firsts: list[int], *, rows: int, classes: int, samples: int, pause: float) -> subprocess.Popen:
    args = {"root": str(root), "firsts": firsts, "rows": rows, "classes": classes, "samples": samples, "pause": pause}
    args |= {"teacher": {"kind": "teacher", "fields": dict(TEACHER.fields)}}
    args |= {"data": {"kind": "data", "fields": dict(DATA.fields)}}
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(
        [sys.executable, "-c", _WRITER, json.dumps(args)], env=env, stdout=subprocess.PIPE, text=True
    )


def _expected(indices, classes: int) -> torch.Tensor:
    return (torch.as_tensor(indices)[:, None] * 1000 + torch.arange(classes)).float() / 7


def test_a_writer_killed_mid_record_leaves_only_complete_records(tmp_path):
    rows, classes = 64, 32768  # 8 MB records: one write() takes milliseconds, the kill lands inside one
    size = record_bytes(rows, classes)
    process = _writer(tmp_path, [0, 64, 128, 192, 256, 320], rows=rows, classes=classes, samples=384, pause=0.0)
    (tmp_path / "start").touch()
    deadline, files = time.monotonic() + 60, []
    while time.monotonic() < deadline and process.poll() is None:
        files = list(tmp_path.glob("*/seed-0/epoch-00000/*.rec"))
        written = files[0].stat().st_size if files else 0
        if written > size and written % size:  # past the first record and inside another one
            break
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = files[0].stat().st_size
    cache = TeacherCache(tmp_path, teacher=TEACHER, data=DATA, seed=0, num_classes=classes, num_samples=384)
    complete = written // size
    all_keys = torch.stack([torch.zeros(384, dtype=torch.long)] * 3 + [torch.arange(384)], dim=1)
    assert cache.status(all_keys).cached == complete * rows  # every complete record, and not the torn one
    for record in range(complete):
        keys = all_keys[record * rows : (record + 1) * rows]
        assert torch.equal(cache.get(keys), _expected(keys[:, 3], classes))
    if complete < 6:
        assert cache.get(all_keys[complete * rows : (complete + 1) * rows]) is None


def test_two_concurrent_writers_share_one_cache(tmp_path):
    rows, classes, samples = 10, 50, 400
    firsts = [list(range(0, 300, rows)), list(range(100, 400, rows))]  # rows 100..299 are written by both
    processes = [_writer(tmp_path, f, rows=rows, classes=classes, samples=samples, pause=0.002) for f in firsts]
    (tmp_path / "start").touch()
    assert [process.communicate(timeout=120)[0] for process in processes] == ["done\n", "done\n"]
    cache = TeacherCache(tmp_path, teacher=TEACHER, data=DATA, seed=0, num_classes=classes, num_samples=samples)
    assert (
        len(_record_files(cache)) == 2
        and [p.stat().st_size for p in _record_files(cache)] == [30 * record_bytes(rows, classes)] * 2
    )
    all_keys = torch.stack([torch.zeros(samples, dtype=torch.long)] * 3 + [torch.arange(samples)], dim=1)
    assert cache.status(all_keys).complete
    assert torch.equal(cache.get(all_keys), _expected(range(samples), classes))


def test_a_reader_finds_rows_another_run_appends_while_it_runs(tmp_path):
    reader, writer = _cache(tmp_path), _cache(tmp_path)
    first, second = _keys(0, range(8)), _keys(0, range(8, 16), batch=1)
    writer.put(first, _logits(first))
    assert torch.equal(reader.get(first), _logits(first))
    assert reader.get(second) is None
    writer.put(second, _logits(second))
    assert torch.equal(reader.get(second), _logits(second))  # the miss rescans the epoch's files


def _teacher(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(NUM_CLASSES))


def _pipeline_fingerprint(**changes) -> Fingerprint:
    fields = {
        "dataset": "fake",
        "root": None,
        "num_samples": NUM_SAMPLES,
        "transform": v2.Compose([v2.RandomCrop(32, padding=4), v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]),
        "img_size": 32,
        "subset": None,
    }
    return data_fingerprint(**{**fields, **changes})


def test_fingerprint_mismatch_is_a_miss_that_says_which_field_differs(tmp_path):
    model = nn.Linear(3, NUM_CLASSES)
    teacher = teacher_fingerprint("tv/resnet18", {}, model.state_dict(), device="cpu", batch_size=8)
    data = _pipeline_fingerprint()
    keys = _keys(0, range(8))
    _cache(tmp_path, teacher=teacher, data=data).put(keys, _logits(keys))

    with torch.no_grad():
        model.weight[0, 0] += 1e-6
    other_weights = teacher_fingerprint("tv/resnet18", {}, model.state_dict(), device="cpu", batch_size=8)
    cache = _cache(tmp_path, teacher=other_weights, data=data)
    status = cache.status(keys)
    assert cache.get(keys) is None and status.cached == 0
    old, new = teacher.fields["weights"], other_weights.fields["weights"]
    assert status.reason == (
        f"teacher cache {tmp_path}: no logits for this teacher and data pipeline; the closest entry "
        f"({teacher.digest[:16]}-{data.digest[:16]}-float32) differs in teacher.weights (here {new!r}, cached {old!r})"
    )
    cases = {
        "data.transform": {"transform": v2.Compose([v2.RandomCrop(32, padding=2), v2.ToImage()])},
        "data.img_size": {"img_size": 64},
        "data.subset": {"subset": [0, 2, 4]},
        "data.dataset": {"dataset": "cifar100"},
    }
    for field, change in cases.items():
        reason = _cache(tmp_path, teacher=teacher, data=_pipeline_fingerprint(**change)).status(keys).reason
        assert f"differs in {field} (here " in reason
    other_batch = teacher_fingerprint("tv/resnet18", {}, model.state_dict(), device="cpu", batch_size=16)
    assert (
        "teacher.batch_size (here '16', cached '8')"
        in _cache(tmp_path, teacher=other_batch, data=data).status(keys).reason
    )
    as_half = _cache(tmp_path, teacher=teacher, data=data, dtype="float16")
    assert as_half.get(keys) is None
    assert as_half.status(keys).reason == (
        f"teacher cache {tmp_path}: the logits of this teacher and data pipeline are cached as float32 "
        f"({teacher.digest[:16]}-{data.digest[:16]}-float32), this run stores float16"
    )
    assert _cache(tmp_path, teacher=teacher, data=data, seed=4).status(keys).reason == (
        "8 of 8 teacher logits of seed 4, epoch 0 are not cached (cached seeds: 0)"
    )


def test_teacher_fingerprint_hashes_every_tensor_byte_whatever_the_layout():
    model = _teacher(0)
    model(torch.zeros(1, 3, 8, 8))  # materialise the lazy layer
    state = model.state_dict()
    reordered = dict(reversed(list(state.items())))
    assert (
        weights_digest(state) == weights_digest(reordered) == weights_digest({k: v.clone() for k, v in state.items()})
    )
    state["1.running_var"] = state["1.running_var"].clone()
    state["1.running_var"][0] += 1e-7  # a buffer, not a parameter
    assert weights_digest(state) != weights_digest(reordered)
    as_half = {name: value.half() if value.is_floating_point() else value for name, value in reordered.items()}
    assert weights_digest(as_half) != weights_digest(reordered)
    kwargs = teacher_fingerprint("m", {"drop_rate": 0.1}, reordered)
    assert kwargs.digest != teacher_fingerprint("m", {"drop_rate": 0.2}, reordered).digest
    assert kwargs.digest != teacher_fingerprint("m", {"drop_rate": 0.1}, reordered, amp="bf16").digest


def test_data_fingerprint_sees_parameters_the_repr_hides_and_is_stable_across_processes(tmp_path):
    base = _pipeline_fingerprint()
    as_double = _pipeline_fingerprint(
        transform=v2.Compose([v2.RandomCrop(32, padding=4), v2.ToImage(), v2.ToDtype(torch.float64, scale=True)])
    )
    assert as_double.fields["transform"] == base.fields["transform"]  # ToDtype's repr leaves the dtype out
    assert as_double.fields["transform_params"] != base.fields["transform_params"]
    factor = 2.0
    doubled = _pipeline_fingerprint(transform=v2.Lambda(lambda image: image * factor))
    factor = 3.0
    assert _pipeline_fingerprint(transform=v2.Lambda(lambda image: image * factor)).digest != doubled.digest
    assert _pipeline_fingerprint().digest == base.digest
    mixed = _pipeline_fingerprint(mix="mixup=0.8", batch_size=64, world_size=2)
    assert (mixed.fields["keyed_by"], mixed.fields["world_size"], base.fields["keyed_by"]) == ("batch", "2", "sample")
    (tmp_path / "a").write_bytes(b"12")
    before = _pipeline_fingerprint(root=tmp_path).fields["root"]
    (tmp_path / "a").write_bytes(b"123")
    assert _pipeline_fingerprint(root=tmp_path).fields["root"] != before

    # unikd's own pipelines (torchvision v2, timm's RandAugment) fingerprint the same in a fresh process
    code = (
        "from unikd._teacher_cache import data_fingerprint; from unikd.config import DataConfig; "
        "from unikd.data import build_transform\n"
        "for name, augment in [('cifar100', 'randaugment'), ('imagefolder', 'randaugment'), ('imagefolder', 'flip')]:\n"
        "    t = build_transform(DataConfig(name=name, augment=augment), train=True)\n"
        "    print(data_fingerprint(dataset=name, root=None, num_samples=1, transform=t, img_size=32).digest)\n"
    )
    from unikd.config import DataConfig
    from unikd.data import build_transform

    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    printed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    expected = [
        data_fingerprint(
            dataset=name, root=None, num_samples=1, img_size=32,
            transform=build_transform(DataConfig(name=name, augment=a), train=True),
        ).digest
        for name, a in [("cifar100", "randaugment"), ("imagefolder", "randaugment"), ("imagefolder", "flip")]
    ]  # fmt: skip
    assert printed.split() == expected and len(set(expected)) == 3


def test_verify_fails_loudly_on_any_difference(tmp_path):
    cache = _cache(tmp_path)
    keys = _keys(2, range(8, 16), batch=1)
    live = _logits(keys)
    stale = live.clone()
    stale[3, 4] = torch.nextafter(stale[3, 4], torch.tensor(float("inf")))  # one ulp
    stale[5, 0] += 0.25
    cache.put(keys, stale)
    assert cache.verify(_keys(2, range(40, 48)), _logits(_keys(2, range(40, 48)))) == 0  # not cached: nothing to check
    with pytest.raises(UnikdError) as error:
        cache.verify(keys, live)
    assert str(error.value) == (
        f"teacher cache {cache.entry_dir}: the cached logits of seed 0, epoch 2, sample 11 differ from the live "
        "teacher's by up to 0.25 (2 of 8 rows differ); the cache is stale (a change the fingerprints do not see) or "
        f"the teacher is not deterministic here: delete {cache.entry_dir}, or set train.teacher_cache=null"
    )
    fresh = _keys(2, range(16, 24), batch=2)
    cache.put(fresh, _logits(fresh))
    assert cache.verify(fresh, _logits(fresh)) == 8


def test_refuses_a_run_the_disk_cannot_hold(tmp_path, monkeypatch):
    root = tmp_path / "new" / "cache"
    cache = TeacherCache(root, teacher=TEACHER, data=DATA, seed=0, num_classes=100, num_samples=50000)
    rows = 50000 // 128 * 128
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 10**9, 10**9))
    with pytest.raises(UnikdError) as error:
        cache.check_space(240, rows, rows_per_record=128)
    assert str(error.value) == (
        f"teacher cache {root}: this run needs 4891.9 MB more for 240 epochs of teacher logits (20.4 MB an epoch: "
        "49920 x 100 float32) but its disk has 1000.0 MB free; free space, set train.teacher_cache_dtype=float16 (half "
        "the size), point train.teacher_cache at a bigger disk, or set train.teacher_cache=null"
    )
    per_epoch = epoch_bytes(rows, 128, 100)
    assert cache.check_space(40, rows, rows_per_record=128) == 40 * per_epoch < 10**9
    assert cache.check_space(240, rows, rows_per_record=128, stored=200 * per_epoch) == 40 * per_epoch
    assert cache.check_space(2, rows, rows_per_record=128, stored=3 * per_epoch) == 0
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_bad_arguments():
    with pytest.raises(UnikdError) as error:
        _cache(Path("unused"), dtype="bfloat16")
    assert str(error.value) == "teacher cache dtype: 'bfloat16' is not one of float32, float16"
    cache = _cache(Path("unused"))
    with pytest.raises(ValueError, match="one epoch"):
        cache.get(torch.cat([_keys(0, [1]), _keys(1, [2])]))
    with pytest.raises(ValueError, match=r"logits of shape \(2, 3\) for 2 keys and 7 classes"):
        cache.put(_keys(0, [1, 2]), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="mix needs batch_size and world_size"):
        _pipeline_fingerprint(mix="cutmix=1.0")
