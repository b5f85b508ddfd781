"""The benchmark scripts in benchmarks/: loss_speed.py's --released loading and table, overhead.py's 224/AMP setups.

Tiny sizes and one or two repeats: these check that the scripts run and print their columns, not the numbers.
"""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def loss_speed():
    return _load_script("loss_speed")


@pytest.fixture(scope="module")
def overhead():
    return _load_script("overhead")


# Stand-ins for the released files, with the released signatures and imports, and trivial bodies.
FAKE_NKD = """
    import torch.nn as nn
    import torch.nn.functional as F
    from mmcls.registry import MODELS

    @MODELS.register_module()
    class NKDLoss(nn.Module):
        def __init__(self, name, use_this, temp=1.0, gamma=1.5):
            super().__init__()
            self.temp, self.gamma = temp, gamma

        def forward(self, logit_s, logit_t, gt_label):
            return F.cross_entropy(logit_s, gt_label)
"""
FAKE_USKD = """
    import torch.nn as nn
    import torch.nn.functional as F
    from mmcls.registry import MODELS

    @MODELS.register_module()
    class USKDLoss(nn.Module):
        def __init__(self, name, use_this, channel=None, alpha=1.0, beta=0.1, mu=0.005, num_classes=1000):
            super().__init__()
            self.fc = nn.Linear(channel, num_classes)

        def forward(self, fea_mid, logit_s, gt_label):
            return F.cross_entropy(logit_s, gt_label) + F.cross_entropy(self.fc(fea_mid), gt_label)
"""
FAKE_DKD = """
    import torch.nn.functional as F
    from ._base import Distiller

    def dkd_loss(logits_student, logits_teacher, target, alpha, beta, temperature):
        return F.cross_entropy(logits_student, target)

    class DKD(Distiller):
        pass
"""


def _write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


@pytest.fixture
def released_checkouts(tmp_path):
    cls_kd, mdistiller = tmp_path / "cls_KD", tmp_path / "mdistiller"
    _write(cls_kd, "mmcls/models/dis_losses/nkd.py", FAKE_NKD)
    _write(cls_kd, "mmcls/models/dis_losses/uskd.py", FAKE_USKD)
    _write(mdistiller, "mdistiller/distillers/DKD.py", FAKE_DKD)
    return cls_kd, mdistiller


def test_loss_speed_released_columns(loss_speed, released_checkouts, capsys):
    modules_before = set(sys.modules)
    cls_kd, mdistiller = released_checkouts
    argv = ["--devices", "cpu", "--sizes", "4x10", "--repeats", "2", "--warmup", "1"]
    loss_speed.main([*argv, "--released", str(cls_kd), str(mdistiller)])
    out = capsys.readouterr().out
    assert not {"mmcls", "mmcls.registry", "mdistiller.distillers._base"} & (set(sys.modules) - modules_before)
    _, released_table = out.split("(N, C) = (4, 10)  ours beside the released code\n")
    lines = released_table.strip().splitlines()
    assert lines[0] == (
        "| loss | ours ms | ours ratio to CE (IQR) | released ms | released ratio to CE (IQR) | ours / released |"
    )
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| nkd", "| dkd", "| uskd (+ weak fc)"]
    for line in lines[2:]:
        cells = line.strip("| ").split(" | ")
        assert len(cells) == 6 and cells[2].endswith(")") and cells[4].endswith(")")
        float(cells[5])


def test_loss_speed_released_one_repository(loss_speed, released_checkouts):
    _, mdistiller = released_checkouts
    released = loss_speed.load_released([str(mdistiller)])
    assert list(released) == ["dkd"] and released["dkd"].__name__ == "dkd_loss"


def test_loss_speed_released_missing_file(loss_speed, released_checkouts, capsys):
    cls_kd, _ = released_checkouts
    (cls_kd / "mmcls/models/dis_losses/uskd.py").unlink()
    with pytest.raises(SystemExit):
        loss_speed.main(["--devices", "cpu", "--released", str(cls_kd)])
    expected = cls_kd / "mmcls/models/dis_losses/uskd.py"
    assert f"--released {cls_kd}: yzd-v/cls_KD's file not found: expected {expected}" in capsys.readouterr().err


def test_loss_speed_released_not_a_checkout(loss_speed, tmp_path, capsys):
    with pytest.raises(SystemExit):
        loss_speed.main(["--devices", "cpu", "--released", str(tmp_path)])
    err = capsys.readouterr().err
    assert f"--released {tmp_path}: not a cls_KD or mdistiller checkout; expected {tmp_path}/mmcls/models/" in err
    assert f"{tmp_path}/mdistiller/distillers/DKD.py" in err


def test_loss_speed_released_uskd_without_cuda(loss_speed, released_checkouts, capsys):
    cls_kd, _ = released_checkouts
    fake = FAKE_USKD.replace("super().__init__()", "super().__init__()\n            raise RuntimeError('no CUDA')")
    _write(cls_kd, "mmcls/models/dis_losses/uskd.py", fake)
    loss_speed.main(
        ["--devices", "cpu", "--sizes", "4x10", "--repeats", "1", "--warmup", "0", "--released", str(cls_kd)]
    )
    out = capsys.readouterr().out
    assert "| uskd | - | - | - | released USKDLoss could not be built here: no CUDA | - |" in out


def test_overhead_224_setups_with_amp(overhead, capsys):
    argv = ["--device", "cpu", "--models", "resnet18-224,deit-tiny-224", "--amp", "bf16", "--img-size", "32"]
    overhead.main([*argv, "--steps", "2", "--warmup", "1", "--batch-size", "2", "--no-cpu-memory"])
    out = capsys.readouterr().out
    assert "classes: resnet18-224 1000, deit-tiny-224 1000; autocast bf16; image size 32 (override)" in out
    for setup, student in (("resnet18-224", "timm/resnet18"), ("deit-tiny-224", "timm/deit_tiny_patch16_224")):
        assert f"| {setup} | baseline ({student}) | " in out and f"| {setup} | uskd ({student}) | " in out
        ratio_line = next(line for line in out.splitlines() if line.startswith(f"| {setup} | uskd vs baseline | **"))
        assert ratio_line.endswith("| - |")  # no memory probe asked for


def test_overhead_setups_at_their_sizes(overhead):
    assert overhead.SETUPS["resnet18-224"].image_size == overhead.SETUPS["deit-tiny-224"].image_size == 224
    assert overhead.SETUPS["deit-tiny-224"].resized(32).model_kwargs == {"img_size": 32}
    assert overhead.SETUPS["cifar"].num_classes == 100  # the existing setups keep their 100 classes


def test_overhead_amp_trainer_step(overhead):
    setup = overhead.SETUPS["deit-tiny-224"].resized(32)
    trainer = overhead.Trainer(
        overhead.Variant("uskd", "timm/deit_tiny_patch16_224"), setup, 2, overhead.torch.device("cpu"), "bf16"
    )
    before = [p.detach().clone() for p in trainer.student.parameters()]
    trainer.step()
    assert any(not overhead.torch.equal(b, p) for b, p in zip(before, trainer.student.parameters()))
    assert all(p.dtype == overhead.torch.float32 for p in trainer.student.parameters())


def test_overhead_fp16_needs_cuda(overhead, capsys):
    with pytest.raises(SystemExit):
        overhead.main(["--device", "cpu", "--amp", "fp16"])
    assert "--amp: 'fp16' needs CUDA (its GradScaler); on CPU use --amp bf16" in capsys.readouterr().err
