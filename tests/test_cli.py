"""The `gym` command (gym_core/cli.py): one command for every program, the `python -m`
forms unchanged, `gym --help` without torch."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from gym_core.cli import COMMANDS
from tests.conftest import REPO, run_cli

GYM = Path(sys.executable).with_name("gym")  # the console script pip installed


def gym(args: list[str], cwd: Path, timeout: int = 300, env: dict | None = None):
    return subprocess.run([str(GYM), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1",
                                                **(env or {})})


def test_the_console_script_is_installed():
    assert GYM.is_file(), "pip install -e . installs the `gym` console script"


def test_help_lists_every_command_and_imports_no_torch(tmp_path):
    probe = ("import sys\nfrom gym_core.cli import main\nrc = main(sys.argv[1:])\n"
             "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', rc)")
    for args in (["--help"], ["train", "--help"], ["plugins"], ["soup", "--help"]):
        out = subprocess.run([sys.executable, "-c", probe, *args], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.rstrip().endswith("NO-TORCH 0"), (args, out.stdout[-300:])
    out = gym(["--help"], tmp_path)
    assert out.returncode == 0
    for name in ("train", "eval", "export", "serve", "ui", "soup", "plugins"):
        assert f"\n  {name} " in out.stdout
    assert set(COMMANDS) == {"train", "eval", "export", "serve", "ui", "soup", "plugins"}


def test_plugins_is_the_same_listing_as_python_m(tmp_path):
    mine = gym(["plugins"], tmp_path)
    theirs = run_cli(["--plugins"], cwd=tmp_path)
    assert mine.returncode == theirs.returncode == 0, mine.stderr
    assert mine.stdout == theirs.stdout
    assert "logger: tensorboard" in mine.stdout and "wandb" in mine.stdout


def test_train_takes_the_same_overrides_and_errors(tmp_path):
    out = gym(["train", "algorithm=dapo", "--cfg", "job"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "epsilon_high: 0.28" in out.stdout
    bad = gym(["train", "algorithm.nope=1"], tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.startswith("gym: error: algorithm.nope is not a field")
    assert len(bad.stderr.strip().splitlines()) == 1


def test_train_runs_a_job(tmp_path, tiny_overrides):
    out = gym(["train", *tiny_overrides, "trainer.max_steps=1", "run.name=cli"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "runs" / "cli" / "summary.json").read_text())
    assert summary["steps"] == 1 and "gym summary" in out.stdout


def test_other_programs_and_unknown_commands(tmp_path):
    out = gym(["serve", "--help"], tmp_path)
    assert out.returncode == 0 and "--variants" in out.stdout
    out = gym(["soup"], tmp_path)  # its own one-line error and status
    assert out.returncode == 2 and "soup.inputs" in out.stderr
    out = gym(["export"], tmp_path)
    assert out.returncode != 0 and "run" in out.stderr
    out = gym(["traim", "model=tiny"], tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip() == ("gym: error: 'traim' is not a command of gym; did you mean "
                                  "'gym train'? commands: train, eval, export, serve, ui, "
                                  "soup, plugins (gym --help)")
    out = gym([], tmp_path)
    assert out.returncode == 2 and "usage: gym <command>" in out.stderr


def test_eval_dispatches_to_its_module_or_says_it_is_absent(tmp_path):
    out = gym(["eval", "--help"], tmp_path)
    if importlib.util.find_spec("gym_core.eval.__main__") is None:
        assert out.returncode == 2
        assert out.stderr.strip() == ("gym: error: gym eval runs python -m gym_core.eval, "
                                      "which is not installed: it needs a gym-core release "
                                      "that ships gym_core/eval/__main__.py")
    else:
        assert out.returncode == 0, out.stderr


def test_python_m_forms_keep_working(tmp_path):
    # python -m gym_core: test_plugins_is_the_same_listing_as_python_m above
    out = subprocess.run([sys.executable, "-m", "gym_core.serve", "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: python -m gym_core.serve")
