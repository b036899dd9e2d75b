"""The Python API (``import gym_core``; gym_core/scripting.py): compose, run twice in one
process with no Hydra state left behind, the result object, export, an in-process server."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest

import gym_core
from gym_core.base.errors import GymError


def hydra_state() -> tuple[bool, bool]:
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    return GlobalHydra.instance().is_initialized(), HydraConfig.initialized()


def test_import_is_cheap_and_documented(tmp_path):
    probe = ("import sys, gym_core\n"
             "cfg = gym_core.compose(['model=tiny', 'algorithm=sft'])\n"
             "assert cfg.algorithm.name == 'sft', cfg.algorithm.name\n"
             "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    for name in ("compose", "run", "open_run", "export_run", "start_server", "evaluate"):
        assert name in dir(gym_core) and getattr(gym_core, name).__doc__
    with pytest.raises(AttributeError):
        gym_core.nothing_here  # noqa: B018


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two runs in one process: the second a different algorithm, composed from a string."""
    root = tmp_path_factory.mktemp("api")
    tiny = ["model=tiny", "trainer.eval_size=8", "trainer.batch_size=2",
            "trainer.eval_max_new_tokens=8", "trainer.progress=false", "logger=[]",
            "trainer.max_steps=2", f"run.root={root}"]
    cfg = gym_core.compose([*tiny, "algorithm.num_generations=4",
                            "algorithm.max_completion_length=8", "run.name=first"])
    assert hydra_state() == (False, False)
    first = gym_core.run(cfg)
    state_after_first = hydra_state()
    second = gym_core.run(" ".join([*tiny, "algorithm=sft", "run.name=second"]))
    return first, second, state_after_first, root


def test_two_runs_in_one_process(two_runs):
    first, second, state_after_first, root = two_runs
    assert state_after_first == (False, False) and hydra_state() == (False, False)
    assert first.summary["algorithm"] == "grpo" and second.summary["algorithm"] == "sft"
    assert first.run_dir == root / "first" and second.run_dir == root / "second"
    assert first.summary["steps"] == second.summary["steps"] == 2
    assert first.accuracy == first.summary["eval"]["after"]
    assert json.loads((root / "second" / "summary.json").read_text()) == second.summary
    # each run its own folder, nothing of the first in the second
    assert {"summary", "metrics", "final", "checkpoints", "config"} <= set(first.paths)
    assert "tensorboard" not in first.paths  # logger=[]


def test_metrics_as_rows_and_dataframe(two_runs, monkeypatch):
    first = two_runs[0]
    rows = first.metrics_rows()
    assert [r["step"] for r in rows] == [1, 2] and "loss" in rows[0]
    frame = first.metrics()
    assert list(frame.index) == [1, 2] and frame.loc[2, "loss"] == rows[1]["loss"]
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if pandas were not installed
    with pytest.raises(GymError, match="pip install pandas, or use Result.metrics_rows"):
        first.metrics()


def test_open_run_export_and_serve(two_runs):
    first = two_runs[0]
    again = gym_core.open_run(first.run_dir)
    assert again.summary == first.summary and again.config.algorithm.name == "grpo"
    exported = again.export(format="lora")
    assert (exported.out / "adapter_model.safetensors").is_file()
    with again.serve(api_key="k") as server:  # base: the run's own (model=tiny)
        assert server.url.startswith("http://127.0.0.1:")
        req = urllib.request.Request(f"{server.url}/models",
                                     headers={"Authorization": "Bearer k"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            ids = [m["id"] for m in json.load(resp)["data"]]
        assert ids[0] == "tiny" and "first" in ids
        body = json.dumps({"model": "first", "max_tokens": 3,
                           "messages": [{"role": "user", "content": "What is 2 + 3?"}]})
        req = urllib.request.Request(f"{server.url}/chat/completions", data=body.encode(),
                                     headers={"Authorization": "Bearer k",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            reply = json.load(resp)
        assert reply["usage"]["completion_tokens"] >= 1
    assert not server._thread.is_alive()
    with pytest.raises(GymError, match="holds no summary.json"):
        gym_core.open_run(first.run_dir / "final")


def test_evaluate_hook():
    import importlib.util

    if importlib.util.find_spec("gym_core.eval.__main__") is None:
        with pytest.raises(GymError, match="python -m gym_core.eval"):
            gym_core.evaluate("--help")
    else:
        assert gym_core.evaluate("--help").returncode == 0
