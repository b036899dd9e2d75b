"""The example environment package (docs/examples/gym-example-env): its own tests (the
environment contract suite) pass, and its entry point makes env=guess an option."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata

from tests.conftest import REPO

EXAMPLE = REPO / "docs" / "examples" / "gym-example-env"


def test_its_contract_tests_pass(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{EXAMPLE / 'src'}{os.pathsep}{REPO}"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(EXAMPLE / "tests")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout


def test_its_entry_point_adds_env_guess(monkeypatch):
    from gym_core.plugin.startup import bootstrap, compose

    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    eps = [*metadata.entry_points(group="gym_core"),
           metadata.EntryPoint("guess", "gym_example_env", "gym_core")]
    try:
        plugins = bootstrap(entry_points=eps)
        assert plugins.options("guess") == {"env": ["guess"]}
        cfg = compose(["model=tiny", "env=guess", "env.high=10"])
        assert cfg.env.name == "guess" and cfg.env.high == 10 and cfg.env.max_turns == 5
    finally:
        bootstrap(reload=True)
