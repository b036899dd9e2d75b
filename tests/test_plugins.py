"""Discovery through entry points, the registry's errors, the cheap start-up path."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib import metadata

import pytest

from gym_core.plugin import hookspecs
from gym_core.plugin.manager import load_plugins
from tests.conftest import run_cli

PLUGIN = textwrap.dedent(
    """
    from dataclasses import dataclass
    from gym_core import hookimpl
    from gym_core.config.schema import OnlineAlgorithmConfig

    @dataclass
    class MyAlgoConfig(OnlineAlgorithmConfig):
        name: str = "myalgo"
        my_knob: float = 0.5

    @hookimpl
    def gym_add_algorithms(registry):
        registry.add("myalgo", MyAlgoConfig, "myplug.impl:MyAlgo")
    """
)


@pytest.fixture
def fake_distribution(tmp_path):
    """A plugin distribution installed only as metadata on a path: never imported directly."""
    (tmp_path / "myplug").mkdir()
    (tmp_path / "myplug" / "__init__.py").write_text(PLUGIN)
    info = tmp_path / "myplug-0.3.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: myplug\nVersion: 0.3.1\n")
    (info / "entry_points.txt").write_text("[gym_core]\nmyplug = myplug\n")
    return tmp_path


def test_plugin_found_through_entry_point_metadata(fake_distribution, monkeypatch):
    monkeypatch.syspath_prepend(str(fake_distribution))
    dist = metadata.distribution("myplug")
    eps = [*metadata.entry_points(group="gym_core"), *dist.entry_points]
    plugins = load_plugins(eps)
    comp = plugins.component("algorithm", "myalgo")
    assert comp.plugin == "myplug" and comp.config.__name__ == "MyAlgoConfig"
    assert plugins.infos["myplug"].dist == "myplug" and plugins.infos["myplug"].version == "0.3.1"
    # the built-ins arrive through the same group
    assert {"grpo", "dr_grpo", "dapo"} <= set(plugins.registry("algorithm").names())
    assert "bitdelta" in plugins.registry("quant").names()


def test_cli_lists_and_type_checks_a_plugin_option(fake_distribution, tmp_path):
    env = {"PYTHONPATH": str(fake_distribution)}
    out = run_cli(["--help"], cwd=tmp_path, env=env)
    assert out.returncode == 0 and "myalgo" in out.stdout
    cfg = run_cli(["algorithm=myalgo", "algorithm.my_knob=0.25", "--cfg", "job"],
                  cwd=tmp_path, env=env)
    assert cfg.returncode == 0, cfg.stderr
    assert "my_knob: 0.25" in cfg.stdout
    bad = run_cli(["algorithm=myalgo", "algorithm.my_knob=abc"], cwd=tmp_path, env=env)
    assert bad.returncode != 0 and "my_knob" in bad.stderr


def test_unknown_algorithm_lists_installed_ones(tmp_path):
    out = run_cli(["algorithm=nope"], cwd=tmp_path)
    assert out.returncode != 0
    assert "nope" in out.stderr
    for name in ("grpo", "dr_grpo", "dapo"):
        assert name in out.stderr


def test_disabled_plugin_is_not_loaded(tmp_path):
    out = run_cli(["--help"], cwd=tmp_path, env={"GYM_DISABLE_PLUGINS": "bitdelta"})
    assert out.returncode == 0
    quant_line = next(ln for ln in out.stdout.splitlines() if ln.startswith("quant:"))
    assert "bitdelta" not in quant_line and "none" in quant_line


def test_duplicate_name_names_both_plugins(fake_distribution, monkeypatch):
    from gym_core.plugin.registry import Registry, RegistryError

    reg = Registry("algorithm")
    reg._plugin = "first"
    reg.add("x", None, object)
    reg._plugin = "second"
    with pytest.raises(RegistryError, match="first.*second"):
        reg.add("x", None, object)


@pytest.mark.parametrize("args", [["--help"], ["--cfg", "job"]])
def test_startup_does_not_import_torch(args, tmp_path):
    code = textwrap.dedent(
        f"""
        import runpy, sys
        sys.argv = ["gym_core", *{args!r}]
        try:
            runpy.run_module("gym_core", run_name="__main__")
        except SystemExit:
            pass
        heavy = sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules)
        print("HEAVY", heavy)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert "HEAVY []" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


def test_every_hookspec_has_a_docstring():
    specs = [getattr(hookspecs, n) for n in dir(hookspecs) if n.startswith("gym_")]
    assert len(specs) >= 9
    for spec in specs:
        assert spec.__doc__ and len(spec.__doc__.strip()) > 40, spec.__name__


def test_help_shows_the_config_the_overrides_give_and_rejects_bad_ones(tmp_path):
    out = run_cli(["algorithm=dpo", "algorithm.beta=0.3", "--help"], cwd=tmp_path)
    assert out.returncode == 0
    assert "algorithm: cispo, cl_grpo, dapo, dpo" in out.stdout  # groups and their options
    assert "name: dpo" in out.stdout and "beta: 0.3" in out.stdout
    bad = run_cli(["trainer.max_steps=abc", "--help"], cwd=tmp_path)
    assert bad.returncode == 2 and "trainer.max_steps" in bad.stderr
    assert "Traceback" not in bad.stderr
