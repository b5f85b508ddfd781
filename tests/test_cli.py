"""The ``unikd`` command: help, exit codes and one-line errors, and end-to-end runs of every method on tiny data.

End-to-end tests (``slow``) train through ``main([...])`` on the learnable datasets of conftest.py, in each real
format, and read the engine's ``metrics.jsonl``: train records ``{"split": "train", "step", "epoch", "lr", <terms>,
"loss", ...}`` and eval records ``{"split": "val", "top1", "top5", "val_loss", "epoch", ...}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader
from torch_files import save

from unikd import cli
from unikd.config import DataConfig
from unikd.data import build_datasets
from unikd.methods import METHODS
from unikd.models import create_model, export_state_dict, load_state_dict_file, load_teacher
from unikd.models._mdistiller import to_mdistiller
from unikd.train import evaluate

REPO = Path(__file__).parents[1]
COMMANDS = ["train", "eval", "export", "config", "softlabels", "bench", "detect"]


def _run_module(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "unikd", *args], capture_output=True, text=True, env=env, cwd=REPO)


def _main(capsys, *args: str) -> tuple[int, str, str]:
    status = cli.main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ---- help and errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], *([name] for name in COMMANDS)], ids=["unikd", *COMMANDS])
def test_help_everywhere(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: unikd {' '.join(command)}".rstrip())


@pytest.mark.parametrize("group", ["unikd", "unikd detect"])
def test_the_usage_lines_of_the_module_docstring_name_every_option_of_their_command(group):
    """The usage block at the top of unikd/cli.py (unikd/detection/cli.py for ``unikd detect``) shows every option
    each command's parser takes, and no other."""
    from unikd.detection import cli as detection_cli

    parser, doc = cli.build_parser(), cli.__doc__
    if group == "unikd detect":
        parser, doc = _subcommands(parser)["detect"], detection_cli.__doc__
    usage = []  # one entry per command line, with its deeper-indented continuation lines
    for line in doc.splitlines():
        if line.strip().startswith(f"{group} "):
            usage.append(line.strip())
        elif usage and line.startswith(" " * 8) and not line.strip().startswith("unikd"):
            usage[-1] += " " + line.strip()
    for name, command in _subcommands(parser).items():
        if name == "detect":
            continue
        lines = " ".join(line for line in usage if line.removeprefix(group).split()[0] == name)
        options = {option for action in command._actions for option in action.option_strings if option != "--help"}
        assert set(re.findall(r"--[a-z-]+", lines)) == {option for option in options if option.startswith("--")}, name


def _subcommands(parser) -> dict:
    return next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction)).choices


def test_python_m_unikd_works_the_same():
    result = _run_module("--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: unikd ")
    for name in COMMANDS:
        assert name in result.stdout


def test_config_error_in_a_subprocess_is_one_line_exit_2_without_traceback(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  epoch: 3\n")
    result = _run_module("train", str(config))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "unikd: error: train.epoch: unknown key (did you mean 'train.epochs'?)\n"


def test_missing_config_file_in_a_subprocess():
    result = _run_module("config", "missing.yaml", "train.epochs=2")
    assert (result.returncode, result.stderr) == (2, "unikd: error: config file not found: missing.yaml\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["config", "{config}", "optim.name=sgdd"],
            "optim.name: 'sgdd' is not one of adamw, sgd (did you mean 'sgd'?)",
        ),
        (["train", "{config}", "train.epochs"], "override 'train.epochs': expected key=value, e.g. train.epochs=5"),
        (
            ["train", "{config}", "method.name=kd"],
            "model.teacher: method 'kd' needs a teacher (e.g. model.teacher=cifar/resnet32x4 "
            "model.teacher_checkpoint=PATH)",
        ),
        (["eval", "{tmp}/missing.pt"], "checkpoint not found: {tmp}/missing.pt"),
        (["export", "{tmp}/missing.pt", "{tmp}/out.pt"], "checkpoint not found: {tmp}/missing.pt"),
        (
            ["export", "{tmp}/missing.pt", "{tmp}/out.onnx"],
            "OUT: {tmp}/out.onnx must end with one of .pt, .pth, .safetensors",
        ),
    ],
)
def test_user_errors_exit_2_with_one_line(args, message, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("output_dir: runs/x\n")
    args = [arg.format(config=config, tmp=tmp_path) for arg in args]
    assert _main(capsys, *args) == (2, "", f"unikd: error: {message.format(tmp=tmp_path)}\n")


def test_bad_usage_is_argparse_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train"])
    assert exit_info.value.code == 2
    assert "the following arguments are required: CONFIG" in capsys.readouterr().err


def test_warnings_are_one_line(tmp_path, capsys):
    status, _, err = _main(capsys, "config", os.devnull, "model.teacher=cifar/resnet20")
    assert (
        status == 0 and err == "unikd: warning: model.teacher: method 'baseline' does not use a teacher; ignoring it\n"
    )


def test_ctrl_c_exits_130(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("unikd.config.load_config", interrupted)
    assert _main(capsys, "config", os.devnull) == (130, "", "unikd: interrupted\n")


def test_config_prints_the_resolved_yaml(capsys):
    from unikd.config import dump_config, load_config

    status, out, _ = _main(capsys, "config", str(REPO / "configs/fmnist_uskd.yaml"), "train.epochs=3")
    assert status == 0 and out == dump_config(load_config(REPO / "configs/fmnist_uskd.yaml", ["train.epochs=3"]))
    assert "  alpha: 0.1\n" in out and "  epochs: 3\n" in out


# ---- plumbing to the engine (engine stubbed) --------------------------------------------------------------------


def test_train_passes_config_overrides_and_resume(monkeypatch, capsys):
    calls = []

    def fake_train(cfg, *, resume=False):
        calls.append((cfg, resume))
        return {"best_top1": 91.25, "best_epoch": 3, "history": [{"top1": 91.25}]}

    monkeypatch.setattr("unikd.train.train", fake_train)
    status, out, _ = _main(capsys, "train", str(REPO / "configs/fmnist_baseline.yaml"), "train.epochs=2", "--resume")
    ((cfg, resume),) = calls
    assert status == 0 and resume and cfg.train.epochs == 2 and cfg.output_dir == "runs/fmnist_baseline"
    assert out == "unikd train: finished, outputs in runs/fmnist_baseline\n  best_top1    91.2500\n  best_epoch   3\n"


def test_eval_passes_overrides_and_data(monkeypatch, capsys):
    calls = []

    def fake_evaluate(path, overrides):
        calls.append((path, overrides))
        details = {"split": "val", "images": 10000, "dataset": "mnist", "model_name": "cifar/smallcnn"}
        return {"top1": 90.5, "top5": 99.75, "loss": 0.31234, **details}

    monkeypatch.setattr("unikd.train.evaluate_checkpoint", fake_evaluate)
    status, out, _ = _main(capsys, "eval", "run/best.pt", "data.name=mnist", "--data", "/data/mnist")
    assert status == 0 and calls == [("run/best.pt", ["data.name=mnist", "data.root=/data/mnist"])]
    assert out == (
        "unikd eval: cifar/smallcnn from run/best.pt, val split of mnist (10000 images)\n"
        "top-1 90.50  top-5 99.75  loss 0.3123\n"
    )
    # Overrides may follow the options too (argparse alone would refuse them there); anything else still may not.
    calls.clear()
    assert _main(capsys, "eval", "run/best.pt", "a.b=1", "--data", "/d", "c.d=2", "e.f=3")[0] == 0
    assert calls == [("run/best.pt", ["a.b=1", "c.d=2", "e.f=3", "data.root=/d"])]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "run/best.pt", "--data", "/d", "c.d=2", "--nope"])
    assert exit_info.value.code == 2 and "unrecognized arguments: c.d=2 --nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["export", "run/best.pt", "out.pt", "c.d=2"])  # export takes no overrides


def test_eval_model_passes_the_name_file_format_and_overrides(monkeypatch, capsys):
    calls = []

    def fake_evaluate_weights(name, path, overrides, *, layout):
        calls.append((name, path, overrides, layout))
        details = {"split": "val", "images": 50000, "dataset": "imagefolder", "model_name": name}
        extra = {"weights": "r18.pth: torch zip file; mmengine checkpoint; mmpretrain layout", "transform": "resize"}
        return {"top1": 69.9, "top5": 89.1, "loss": 1.2, **details, **extra}

    monkeypatch.setattr("unikd.train.evaluate_weights", fake_evaluate_weights)
    args = ["eval", "--model", "mmpretrain/resnet18_8xb32_in1k", "r18.pth", "--data", "/in1k", "train.device=cpu"]
    status, out, _ = _main(capsys, *args)
    assert status == 0 and calls == [
        ("mmpretrain/resnet18_8xb32_in1k", "r18.pth", ["train.device=cpu", "data.root=/in1k"], "auto")
    ]
    assert out.splitlines()[1:3] == ["  read r18.pth: torch zip file; mmengine checkpoint; mmpretrain layout",
                                     "  transform: resize"]  # fmt: skip
    assert _main(capsys, *args, "--format", "mmpretrain")[0] == 0 and calls[-1][3] == "mmpretrain"


def test_a_detection_config_given_to_unikd_train_points_to_unikd_detect(capsys):
    path = REPO / "configs/detection/mosaics_student.yaml"
    status, out, err = _main(capsys, "train", str(path))
    assert (status, out) == (2, "")
    assert err == (
        f"unikd: error: {path}: a detection config (task: detection); run it with unikd detect train (check it with "
        "unikd detect config)\n"
    )
    _, _, err = _main(capsys, "detect", "config", str(path))  # where it belongs (here it wants the mosaics data)
    assert err.startswith("unikd: error: data.train_annotations: file not found: ")


# ---- any weights file: unikd eval --model ------------------------------------------------------------------------


def _crd_file(path: Path) -> torch.nn.Module:
    """A seeded cifar/resnet8 saved as CRD saves its teachers (legacy torch file, mdistiller's key names)."""
    torch.manual_seed(3)
    model = create_model("cifar/resnet8", 10)
    save({"epoch": 240, "model": to_mdistiller(model.state_dict(), "resnet8"), "accuracy": 61.0}, path, legacy=True)
    return model.eval()


def test_eval_any_weights_file_detects_its_layout_infers_the_dataset_and_writes_json(cifar10_root, tmp_path, capsys):
    weights = tmp_path / "ckpt_epoch_240.pth"
    model = _crd_file(weights)
    out = tmp_path / "scores" / "resnet8.json"
    status, stdout, err = _main(
        capsys, "eval", "--model", "mdistiller/resnet8", str(weights), "--data", str(cifar10_root), "--out", str(out)
    )
    assert status == 0, err
    expected = evaluate(
        model,
        DataLoader(build_datasets(DataConfig("cifar10", root=str(cifar10_root)), with_train=False).val, batch_size=50),
        torch.device("cpu"),
    )
    described = f"{weights}: torch legacy file; CRD teacher file, epoch 240, accuracy 61.00; mdistiller layout"
    assert stdout.splitlines() == [
        f"unikd eval: mdistiller/resnet8 from {weights}, val split of cifar10 (100 images)",
        f"  read {described}",
        "  transform: cifar10 images",
        f"top-1 {expected['top1']:.2f}  top-5 {expected['top5']:.2f}  loss {expected['loss']:.4f}",
        f"wrote {out}",
    ]
    result = json.loads(out.read_text())
    assert result["top1"] == pytest.approx(expected["top1"]) and result["loss"] == pytest.approx(expected["loss"])
    assert (result["weights"], result["file"], result["dataset"], result["images"]) == (
        described,
        str(weights),
        "cifar10",
        100,
    )
    # Naming a layout that the file is not in fails on one line; naming the right one works.
    status, _, err = _main(capsys, "eval", "--model", "cifar/resnet8", str(weights), "--data", str(cifar10_root),
                           "--format", "native")  # fmt: skip
    assert status == 2 and err.startswith(f"unikd: error: {weights} (torch legacy file; CRD teacher file, epoch 240")
    assert "fits no weights layout of cifar/resnet8; tried native (" in err
    status, stdout, _ = _main(capsys, "eval", "--model", "cifar/resnet8", str(weights), "--data", str(cifar10_root),
                              "--format", "mdistiller", "data.val_subset=10")  # fmt: skip
    assert status == 0 and "val split of cifar10 (10 images)" in stdout


def test_eval_weights_on_a_validation_folder_with_the_configured_resize(imagefolder_root, tmp_path, capsys):
    val_only = tmp_path / "imagenet"  # an ImageNet-layout folder with the validation split only
    shutil.copytree(imagefolder_root / "val", val_only / "val")
    torch.manual_seed(0)
    model = create_model("cifar/resnet8", 4)
    export_state_dict(model, tmp_path / "resnet8.safetensors")
    args = ["eval", "--model", "cifar/resnet8", str(tmp_path / "resnet8.safetensors"), "--data", str(val_only)]
    status, stdout, err = _main(capsys, *args, "data.img_size=32", "data.eval_interpolation=bicubic")
    assert status == 0, err
    lines = stdout.splitlines()
    assert lines[0].endswith("val split of imagefolder (32 images)")
    assert lines[1].endswith("safetensors file; unikd export of ?; native layout")
    assert lines[2] == "  transform: resize 36 bicubic, centre crop 32"
    cfg = DataConfig("imagefolder", root=str(val_only), img_size=32, eval_interpolation="bicubic")
    expected = evaluate(model.eval(), DataLoader(build_datasets(cfg, with_train=False).val, batch_size=8),
                        torch.device("cpu"))  # fmt: skip
    assert lines[3] == f"top-1 {expected['top1']:.2f}  top-5 {expected['top5']:.2f}  loss {expected['loss']:.4f}"


# ---- end to end -------------------------------------------------------------------------------------------------

TINY = [
    "train.epochs=3",
    "train.batch_size=25",  # 200 training images: 8 steps per epoch
    "train.eval_batch_size=100",
    "train.log_every=1",
    "train.progress=false",
    "train.tensorboard=false",
    "train.device=cpu",
    "data.num_workers=0",
    "optim.lr=0.05",
]


def _train(capsys, tmp_path: Path, name: str, *overrides: str) -> Path:
    output_dir = tmp_path / name
    capsys.readouterr()  # drop what fixtures printed
    status, out, err = _main(capsys, "train", os.devnull, *TINY, f"output_dir={output_dir}", *overrides)
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("unikd train: cifar/smallcnn (") and lines[1].startswith("  data: ")
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    assert len(epoch_lines) == 3 and all(" val top-1 " in line and " train loss " in line for line in epoch_lines)
    assert f"unikd train: finished, outputs in {output_dir}" in lines
    teacher = json.loads((output_dir / "final.json").read_text())["teacher_top1"]
    if teacher is not None:  # measured once, on the validation set, and shown in the header
        assert lines[2].startswith("  teacher: cifar/smallcnn from ")
        assert lines[2].endswith(f"(eval mode), validation top-1 {teacher:.2f}")
        # ... and what was read from its file: a unikd checkpoint in the model's own key names
        assert lines[3].startswith("    read ") and "unikd training checkpoint, epoch" in lines[3]
        assert lines[3].endswith("; native layout")
        assert f"  teacher_top1 {teacher:.4f}" in lines
    return output_dir


def _records(output_dir: Path, split: str) -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record.get("split") == split]


@pytest.fixture(scope="module")
def teacher_checkpoint(fashion_mnist_root, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("teacher") / "run"
    args = [*TINY, "train.epochs=6", "optim.lr=0.1", f"data.root={fashion_mnist_root}", f"output_dir={output_dir}"]
    assert cli.main(["train", os.devnull, *args]) == 0
    return output_dir / "best.pt"


# Every method on at least one real format; the teacher methods share one Fashion-MNIST teacher.
E2E = [
    ("baseline", "fashion_mnist_root", "fashion_mnist"),
    ("uskd", "fashion_mnist_root", "fashion_mnist"),
    ("kd", "fashion_mnist_root", "fashion_mnist"),
    ("dkd", "fashion_mnist_root", "fashion_mnist"),
    ("nkd", "fashion_mnist_root", "fashion_mnist"),
    ("wsld", "fashion_mnist_root", "fashion_mnist"),
    ("ls", "cifar10_root", "cifar10"),
    ("uskd", "cifar100_root", "cifar100"),
    ("zipf_ls", "cifar100_root", "cifar100"),
    ("tfkd", "imagefolder_root", "imagefolder"),
    ("baseline", "fashion_mnist_plain_root", "mnist"),
]


def test_e2e_covers_every_method_and_format():
    assert {method for method, _, _ in E2E} == set(METHODS)
    assert {dataset for _, _, dataset in E2E} >= {"fashion_mnist", "mnist", "cifar10", "cifar100", "imagefolder"}


def _e2e_params() -> list:
    # Under `pytest -n 2 --dist loadgroup` the teacher methods share one worker, so the teacher is trained once.
    return [
        pytest.param(*case, id=f"{case[0]}-{case[2]}", marks=[pytest.mark.xdist_group("fmnist_teacher")] * needs)
        for case in E2E
        for needs in [METHODS[case[0]].needs_teacher]
    ]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "root_fixture", "dataset"), _e2e_params())
def test_every_method_trains_and_its_losses_fall(method, root_fixture, dataset, request, tmp_path, capsys):
    overrides = [f"data.name={dataset}", f"data.root={request.getfixturevalue(root_fixture)}", f"method.name={method}"]
    if dataset == "imagefolder":
        overrides.append("data.img_size=32")
    if METHODS[method].needs_teacher:
        teacher = request.getfixturevalue("teacher_checkpoint")
        overrides += ["model.teacher=cifar/smallcnn", f"model.teacher_checkpoint={teacher}"]
    output_dir = _train(capsys, tmp_path, method, *overrides)
    teacher_top1 = json.loads((output_dir / "final.json").read_text())["teacher_top1"]
    assert (teacher_top1 is not None) == METHODS[method].needs_teacher

    steps = _records(output_dir, "train")
    assert [record["step"] for record in steps] == list(range(1, len(steps) + 1)) and len(steps) >= 9
    terms = set(steps[0]) - {"split", "step", "epoch", "lr", "loss", "images_per_s"}
    assert terms, "no loss terms logged"
    for record in steps:
        assert all(math.isfinite(record[name]) for name in [*terms, "loss"]), record
    # Several terms (KD, NKD) are cross-entropy forms with a constant floor, so compare windows, not ratios.
    for name in {"loss", "loss_ce"} & set(steps[0]):
        first, last = (sum(record[name] for record in part) / 3 for part in (steps[:3], steps[-3:]))
        assert last < first, f"{method} on {dataset}: {name} {first:.4f} -> {last:.4f}"
    evaluations = _records(output_dir, "val")
    assert [record["epoch"] for record in evaluations] == [0, 1, 2]
    assert all(0 <= record["top1"] <= record["top5"] <= 100 for record in evaluations)
    assert (output_dir / "config.yaml").is_file() and (output_dir / "best.pt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_export_then_eval_gives_the_same_accuracy(suffix, fashion_mnist_root, tmp_path, capsys):
    output_dir = _train(capsys, tmp_path, "uskd", f"data.root={fashion_mnist_root}", "method.name=uskd")
    checkpoint_path = output_dir / "best.pt"
    status, eval_out, _ = _main(capsys, "eval", str(checkpoint_path))
    header, scores = eval_out.splitlines()
    assert status == 0 and scores.startswith("top-1 ")
    assert header == f"unikd eval: cifar/smallcnn from {checkpoint_path}, val split of fashion_mnist (100 images)"

    exported = tmp_path / f"student{suffix}"
    status, out, _ = _main(capsys, "export", str(checkpoint_path), str(exported))
    assert status == 0 and out.startswith("wrote cifar/smallcnn (") and out.endswith(f"to {exported}\n")
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    weights = load_state_dict_file(exported)
    assert weights.keys() == checkpoint["model"].keys()  # the student only: USKD's weak head is not exported
    assert all(torch.equal(weights[key], value) for key, value in checkpoint["model"].items())
    assert exported.stat().st_mode & 0o044 == 0o044  # readable by others, like any file the user writes
    if suffix == ".safetensors":  # what the student is travels with the weights
        with safe_open(exported, framework="pt") as file:
            metadata = file.metadata()
        assert {key: metadata.get(key) for key in ("model_name", "num_classes", "in_chans")} == {
            "model_name": "cifar/smallcnn",
            "num_classes": "10",
            "in_chans": "1",
        }
        teacher = load_teacher("cifar/smallcnn", 10, exported)  # in_chans=1 read from the file, not passed
        assert all(torch.equal(teacher.state_dict()[key], value) for key, value in weights.items())

    # The exported weights, put back into a checkpoint, score exactly what the original did; so do the export and
    # the training checkpoint itself read as plain weights files (unikd eval --model), with the numbers in JSON.
    torch.save({**checkpoint, "model": weights}, tmp_path / "reloaded.pt")
    assert _main(capsys, "eval", str(tmp_path / "reloaded.pt"))[1].splitlines()[1] == scores
    for path in (exported, checkpoint_path):
        data = ["data.name=fashion_mnist", f"data.root={fashion_mnist_root}"]
        status, out, err = _main(capsys, "eval", "--model", "cifar/smallcnn", str(path), *data)
        assert status == 0 and out.splitlines()[-1] == scores, err
    _main(capsys, "eval", str(checkpoint_path), "--out", str(tmp_path / "eval.json"))
    assert f"top-1 {json.loads((tmp_path / 'eval.json').read_text())['top1']:.2f}" == scores.split("  ")[0]


@pytest.mark.slow
def test_softlabels_writes_the_picture_and_json_of_a_uskd_run(fashion_mnist_root, tmp_path, capsys):
    output_dir = _train(capsys, tmp_path, "uskd", f"data.root={fashion_mnist_root}", "method.name=uskd")
    out = tmp_path / "softlabels"
    status, stdout, _ = _main(capsys, "softlabels", str(output_dir / "last.pt"), "--out", str(out), "--num-images", "3")
    assert status == 0 and stdout.endswith(f"wrote {out}/soft_labels.json and {out}/soft_labels.png\n")
    report = json.loads((out / "soft_labels.json").read_text())
    assert len(report) == 3 and (out / "soft_labels.png").stat().st_size > 0
    for entry in report:
        assert entry["target_name"] in stdout and len(entry["non_target"]) == 3
        assert entry["target"] not in [item["class"] for item in entry["non_target"]]

    baseline_dir = _train(capsys, tmp_path / "b", "baseline", f"data.root={fashion_mnist_root}")
    status, _, stderr = _main(capsys, "softlabels", str(baseline_dir / "last.pt"), "--out", str(out))
    assert status == 2
    assert stderr == (
        f"unikd: error: {baseline_dir / 'last.pt'}: soft labels need a USKD run, this one was trained with 'baseline'\n"
    )


@pytest.mark.slow
def test_bench_command_prints_the_table(fashion_mnist_root, tmp_path, capsys):
    out = tmp_path / "bench"
    overrides = [f"data.root={fashion_mnist_root}", *TINY, "data.train_subset=null", "train.epochs=1"]
    status, stdout, _ = _main(capsys, "bench", "fmnist-demo", *overrides, "--out", str(out))
    assert status == 0
    assert "| baseline |" in stdout and "| uskd |" in stdout and (out / "results.json").is_file()


@pytest.mark.slow
def test_a_torchvision_student_trains_on_grayscale_data_with_channels_3(fashion_mnist_root, tmp_path, capsys):
    overrides = ["model.student=tv/shufflenet_v2_x0_5", "data.channels=3", "train.max_steps_per_epoch=2"]
    output_dir = tmp_path / "tv"
    status, out, err = _main(
        capsys, "train", os.devnull, *TINY, "train.epochs=1", f"data.root={fashion_mnist_root}",
        f"output_dir={output_dir}", *overrides,
    )  # fmt: skip
    assert status == 0, err
    assert "  data: fashion_mnist, 200 training / 100 validation images, 10 classes, 3x28x28" in out.splitlines()
    assert torch.load(output_dir / "last.pt", weights_only=True)["in_chans"] == 3
    status, out, _ = _main(capsys, "eval", str(output_dir / "last.pt"))  # the stored config says data.channels=3
    assert status == 0 and out.splitlines()[1].startswith("top-1 ")
