"""A non-editable install works: the Hydra configs ship inside the package."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO


def test_wheel_install_composes_config_outside_the_repo(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(wheels), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = wheels.glob("gym_core-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
         str(wheel)],
        check=True, capture_output=True, timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import gym_core, gym_core.conf; print(gym_core.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    )
    assert where.stdout.strip().startswith(str(site))
    # the serving kernels ship as C++ source, compiled on first use
    assert (site / "gym_bitdelta" / "serving.cpp").is_file()
    assert (site / "gym_core" / "serve" / "lora.cpp").is_file()
    out = subprocess.run(
        [sys.executable, "-m", "gym_core", "algorithm=dapo", "quant=bitdelta", "--cfg", "job"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "epsilon_high: 0.28" in out.stdout and "name: bitdelta" in out.stdout
