from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# Under pytest-xdist (the README's `-n 2`: one worker a core) every worker and every gym
# process it starts computes with one thread, fixed: the same count whatever the other
# worker runs at that moment, so runs compared to the bit (a resume against an
# uninterrupted run) start alike. Set before torch is imported; tests of the thread
# choice itself give their own environment.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from gym_core.plugin.startup import compose  # noqa: F401, E402  (re-exported for the tests)

REPO = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 600):
    """Run `python -m gym_core ARGS` in a subprocess; returns CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "gym_core", *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture
def tiny_overrides():
    """A tiny random model on a small slice of the arithmetic task: seconds per run."""
    return [
        "model=tiny",
        "trainer.eval_size=8",
        "trainer.batch_size=2",
        "algorithm.num_generations=4",
        "algorithm.max_completion_length=8",
        "trainer.eval_max_new_tokens=8",
        "trainer.progress=false",
        "trainer.tensorboard=false",
    ]


@pytest.fixture
def with_digit_reward():
    """Register tests/digits_plugin.py (a reward with spread even on a random model, so
    groups contrast and deltas are not zero) through an entry point, in this process."""
    from gym_core.plugin.startup import bootstrap

    eps = [*metadata.entry_points(group="gym_core"),
           metadata.EntryPoint("digits", "tests.digits_plugin", "gym_core")]
    bootstrap(entry_points=eps)
    yield
    bootstrap(reload=True)


def plugin_site(site: Path, dist: str, entry: str, module: str) -> Path:
    """Make ``module`` (importable from the repository) an installed plugin for
    subprocesses: distribution metadata with its entry point in ``site``, which goes on
    PYTHONPATH with the repository."""
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[gym_core]\n{entry} = {module}\n")
    return site


@pytest.fixture
def digits_plugin_path(tmp_path):
    """The same plugin installed as a distribution (metadata on a path) for subprocesses:
    a PYTHONPATH value that makes it visible."""
    site = plugin_site(tmp_path / "site", "gym-test-digits", "digits", "tests.digits_plugin")
    return f"{REPO}{os.pathsep}{site}"


def tiny_lora_policy(arch: str = "llama"):
    """A tiny random model of ``arch`` with its LoRA adapter, the adapter's B matrices given
    values (seed 0) so that it is not a no-op."""
    import torch
    from omegaconf import OmegaConf

    from gym_core.config.schema import ModelConfig
    from gym_core.model.policy import load_policy

    cfg = ModelConfig(source="tiny")
    cfg.tiny.arch = arch
    torch.manual_seed(0)
    p = load_policy(OmegaConf.structured(cfg), torch.device("cpu"))
    with torch.no_grad():
        for n, prm in p.model.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.05)
    return p
