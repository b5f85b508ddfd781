"""The README runs as written: its Python snippets execute (imports and variables included), and every ``unikd``
command in its shell blocks parses, names files and profiles that exist, and validates as ``unikd config`` would."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from unikd import cli
from unikd.bench import PROFILES
from unikd.config import load_config
from unikd.detection import cli as detection_cli
from unikd.detection.bench import PROFILES as DETECTION_PROFILES
from unikd.detection.config import load_detection_config
from unikd.models import resolve_model_name

REPO = Path(__file__).parents[1]
README = REPO / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def _commands() -> list[list[str]]:
    """The argument lists of the ``unikd`` commands in the README's bash blocks (``torchrun ... -m unikd`` too)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["unikd"]:
                commands.append(words[1:])
            elif "-m" in words and words[words.index("-m") + 1 : words.index("-m") + 2] == ["unikd"]:
                commands.append(words[words.index("-m") + 2 :])
    return commands


COMMANDS = _commands()


def test_the_readme_has_python_snippets_and_commands():
    assert len(SNIPPETS) >= 2
    assert {command[0] for command in COMMANDS} >= {
        "train",
        "eval",
        "export",
        "config",
        "softlabels",
        "bench",
        "detect",
    }


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"snippet-{i}" for i in range(len(SNIPPETS))])
def test_snippet_runs_as_written(snippet):
    exec(compile(snippet, str(README), "exec"), {"__name__": "readme"})  # each in a fresh namespace


@pytest.mark.filterwarnings("ignore:model.teacher. method")
@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_command_parses_and_its_config_validates(command, monkeypatch):
    monkeypatch.chdir(REPO)  # the README's paths are relative to a clone
    args = cli.parse_args(command)
    if args.func in (cli._train, cli._config):
        load_config(args.config, args.overrides, check_files=False)  # the data and checkpoints are the reader's
    elif args.func in (detection_cli._train, detection_cli._config):
        load_detection_config(args.config, args.overrides, check_files=False)
    elif args.func is cli._bench:
        assert args.profile in PROFILES
    elif command[:2] == ["detect", "bench"]:
        assert args.profile in DETECTION_PROFILES
    elif args.func is cli._eval and args.model is not None:
        resolve_model_name(args.model)
