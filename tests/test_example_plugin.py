"""The example third-party plugin (docs/examples/gym-example-plugin) installed the way a
user would: a fresh virtual environment, ``pip install`` of the package, no network.

The fresh environment sees this one's packages (torch, gym-core, ...) through a ``.pth``
file, as if they had been installed there too, so the test needs no downloads; the
example plugin itself is visible only in the fresh environment.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv

import pytest

from tests.conftest import REPO

EXAMPLE = REPO / "docs" / "examples" / "gym-example-plugin"
FAST = ["model=tiny", "trainer.max_steps=2", "trainer.eval_size=8", "trainer.batch_size=2",
        "algorithm.max_completion_length=8", "trainer.eval_max_new_tokens=8",
        "trainer.progress=false", "trainer.tensorboard=false"]


@pytest.fixture(scope="module")
def env_python(tmp_path_factory):
    root = tmp_path_factory.mktemp("example-plugin")
    venv.create(root / "venv", with_pip=False)
    python = root / "venv" / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    parent = sysconfig.get_paths()["purelib"]
    # addsitedir also runs the parent's own .pth files (gym-core's editable install).
    (root / "venv" / site.split(str(root / "venv") + os.sep)[1] / "parent_env.pth").write_text(
        f"import site; site.addsitedir({parent!r})\n")
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    src = shutil.copytree(EXAMPLE, root / "src", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-index",
         "--no-deps", "--no-build-isolation", str(src)],
        check=True, capture_output=True, timeout=300,
    )
    return python, root


def gym(python, args, cwd, timeout=300, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run([str(python), "-m", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)


def test_only_the_fresh_environment_has_the_plugin(env_python, tmp_path):
    python, root = env_python
    where = gym(python, ["gym_example_plugin.rewards"], tmp_path)  # imports, runs nothing
    assert where.returncode == 0, where.stderr
    located = subprocess.run(
        [str(python), "-c", "import gym_example_plugin as m; print(m.__file__)"],
        capture_output=True, text=True, check=True).stdout
    assert located.startswith(str(root / "venv")), located
    from importlib import metadata

    with pytest.raises(metadata.PackageNotFoundError):  # not in this environment
        metadata.distribution("gym-example-plugin")
    out = gym(python, ["gym_core", "--plugins"], tmp_path)
    assert out.returncode == 0, out.stderr
    block = out.stdout.split("example  (gym_example_plugin; gym-example-plugin 0.1.0, API 2)\n")[1]
    assert block.splitlines()[:3] == ["    algorithm: reinforce", "    quant: absmax",
                                      "    reward: number_only"]


def test_its_algorithm_and_quantizer_run(env_python, tmp_path):
    python, _ = env_python
    out = gym(python, ["gym_core", "algorithm=reinforce", "quant=absmax", "quant.bits=4", *FAST,
                       "run.name=example"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "runs" / "example"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["algorithm"] == "reinforce" and summary["quant"] == "absmax"
    assert summary["steps"] == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # both of its rewards were applied, and the KL term (beta 0.05) was computed
    assert {"rewards/accuracy", "rewards/number_only", "kl", "advantage_abs_mean",
            "baseline"} <= set(rows[-1])
    stats = summary["quant_stats"]
    assert stats["delta_bytes"] == (run / "delta" / "absmax.safetensors").stat().st_size
    assert 4.0 <= stats["bits_per_weight"] < 4.1  # 4-bit nibbles plus one fp32 scale per matrix
    assert summary["eval"]["after_quant"] is not None


def test_its_own_tests_pass_with_the_core_contracts(env_python):
    """The package's tests, as its author runs them: the math by hand, gym's quantizer
    contract, a run, and its algorithm under torchrun with 2 processes keeping the ranks'
    weights identical after every step (tests/test_ddp.py)."""
    python, root = env_python
    # a run and a torchrun run of 2 processes among them: more time than one command
    out = gym(python, ["pytest", "-q", "-p", "no:cacheprovider", "-rA"], root / "src",
              timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "PASSED tests/test_ddp.py::test_under_torchrun_the_ranks_hold_the_same_weights" \
        in out.stdout, out.stdout[-3000:]
    assert "TestAbsmaxContract" in out.stdout
