from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gym_core.config import compose  # noqa: F401  (re-exported for the tests)

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
