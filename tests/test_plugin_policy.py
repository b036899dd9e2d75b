"""What users see of installed plugins: the listing, disabling one, and the failure policy
(a plugin that fails to import, has a hook implementation with wrong arguments, registers
a name another plugin has, or needs another plugin API) for a run and for --help."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from importlib import metadata

import pytest

from gym_core import __version__
from gym_core.plugin.manager import PluginError, load_plugins
from tests.conftest import run_cli

GOOD = """
from dataclasses import dataclass
from gym_core.api import QuantConfig, hookimpl

GYM_API_VERSION = "2"

@dataclass
class KeepConfig(QuantConfig):
    name: str = "keep"

@hookimpl
def gym_add_quantizers(registry):
    registry.add("keep", KeepConfig, "gym_good.impl:Keep")

@hookimpl
def gym_step_end(step, metrics):
    pass
"""

BROKEN = {
    # kind: (module source, what the message must say)
    "import": ("import gym_no_such_dependency\n", "failed to import: ModuleNotFoundError"),
    "arguments": (
        "from gym_core.api import hookimpl\n\n"
        "@hookimpl\ndef gym_add_algorithms(reg):\n    pass\n",
        "does not match gym's hook specs",
    ),
    "duplicate": (
        # Registers an algorithm first, then a data option the core already has: when the
        # plugin is skipped, its algorithm must go too.
        "from gym_core.api import AlgorithmConfig, DataConfig, hookimpl\n\n"
        "@hookimpl\ndef gym_add_algorithms(registry):\n"
        "    registry.add('extra_algo', AlgorithmConfig, 'x:y')\n\n"
        "@hookimpl\ndef gym_add_datasets(registry):\n"
        "    registry.add('arithmetic', DataConfig, 'x:y')\n",
        "data 'arithmetic' is registered by both plugin 'gym_core' and plugin 'broken'",
    ),
    "api": ('GYM_API_VERSION = "1"\n',
            f"needs gym plugin API 1, but the installed gym-core {__version__} provides "
            "plugin API 2"),
    "typo": (
        "from gym_core.api import hookimpl\n\n"
        "@hookimpl\ndef gym_add_algorithm(registry):\n    pass\n",
        "gym_add_algorithm",
    ),
}

FAST = ["model=tiny", "trainer.max_steps=1", "trainer.eval_before=false", "trainer.eval_size=4",
        "trainer.batch_size=2", "algorithm.num_generations=2", "algorithm.max_completion_length=4",
        "trainer.eval_max_new_tokens=4", "trainer.progress=false", "trainer.tensorboard=false"]


def make_distribution(root, dist, version, module, source, ep_name):
    """A distribution installed as metadata on a path, as pip would leave it."""
    (root / module).mkdir(parents=True)
    (root / module / "__init__.py").write_text(source)
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[gym_core]\n{ep_name} = {module}\n")
    return root


def entry_points_with(path, monkeypatch, *dists):
    monkeypatch.syspath_prepend(str(path))
    eps = list(metadata.entry_points(group="gym_core"))
    for d in dists:
        eps += list(metadata.distribution(d).entry_points)
    return eps


@pytest.fixture(params=sorted(BROKEN))
def broken(request, tmp_path):
    source, expected = BROKEN[request.param]
    site = make_distribution(tmp_path / "site", "gym-broken", "0.2.0", f"gym_broken_{request.param}",
                             source, "broken")
    return request.param, site, expected


def assert_names_plugin(text, expected):
    assert "plugin 'broken'" in text and "gym-broken 0.2.0" in text, text
    assert expected in text, text
    assert "Traceback" not in text, text


def test_failing_plugin_stops_run_and_help_with_a_clear_message(broken, tmp_path):
    kind, site, expected = broken
    env = {"PYTHONPATH": str(site)}
    for args in (["--help"], FAST, ["--plugins"]):
        out = run_cli(args, cwd=tmp_path, env=env)
        assert out.returncode == 2, (args, out.stdout[-500:], out.stderr[-2000:])
        assert out.stderr.startswith("gym: error: "), out.stderr
        assert_names_plugin(out.stderr, expected)
        assert "GYM_DISABLE_PLUGINS=broken" in out.stderr and "GYM_PLUGIN_ERRORS=skip" in out.stderr
    assert not (tmp_path / "runs").exists()  # stopped before any work


def test_skip_policy_warns_and_leaves_the_plugin_out(broken, tmp_path):
    kind, site, expected = broken
    env = {"PYTHONPATH": str(site), "GYM_PLUGIN_ERRORS": "skip"}
    out = run_cli(["--help"], cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stderr.startswith("gym: warning: skipped "), out.stderr
    assert_names_plugin(out.stderr, expected)
    algorithms = next(ln for ln in out.stdout.splitlines() if ln.startswith("algorithm:"))
    assert "grpo" in algorithms and "extra_algo" not in algorithms
    listing = run_cli(["--plugins"], cwd=tmp_path, env=env)
    assert listing.returncode == 0, listing.stderr
    skipped = listing.stdout.split("skipped after an error (GYM_PLUGIN_ERRORS=skip):")[1]
    assert skipped.strip().startswith("broken: ") and expected in skipped


def test_skip_policy_run_goes_on_without_the_plugin(tmp_path, monkeypatch):
    source, _ = BROKEN["duplicate"]
    site = make_distribution(tmp_path / "site", "gym-broken", "0.2.0", "gym_broken_dup", source,
                             "broken")
    env = {"PYTHONPATH": str(site), "GYM_PLUGIN_ERRORS": "skip"}
    out = run_cli([*FAST, "run.name=skip"], cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "gym: warning: skipped plugin 'broken'" in out.stderr
    summary = json.loads((tmp_path / "runs" / "skip" / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["data"] == "arithmetic"

    # In-process: everything the skipped plugin registered is gone, its hooks too.
    monkeypatch.setenv("GYM_PLUGIN_ERRORS", "skip")
    plugins = load_plugins(entry_points_with(site, monkeypatch, "gym-broken"))
    assert "extra_algo" not in plugins.registry("algorithm")
    assert plugins.component("data", "arithmetic").plugin == "gym_core"
    assert "broken" in plugins.failed and "broken" not in plugins.infos
    assert plugins.pm.get_plugin("broken") is None


def test_duplicate_between_two_plugins_names_both_distributions(tmp_path, monkeypatch):
    one = "from gym_core.api import hookimpl\n\n@hookimpl\ndef gym_add_rewards(registry):\n" \
          "    registry.add('same', None, len)\n"
    site = make_distribution(tmp_path, "gym-first", "1.0", "gym_first", one, "first")
    make_distribution(tmp_path, "gym-second", "2.5", "gym_second", one, "second")
    with pytest.raises(PluginError) as err:
        load_plugins(entry_points_with(site, monkeypatch, "gym-first", "gym-second"))
    msg = str(err.value)
    # Which one loads second depends on sys.path order; the message names both.
    assert "reward 'same' is registered by both plugin" in msg
    one, two = ("first", "second") if msg.startswith("plugin 'second'") else ("second", "first")
    dist = {"first": "gym-first 1.0", "second": "gym-second 2.5"}
    assert msg.startswith(f"plugin '{two}' (gym_{two}) from distribution {dist[two]} failed")
    assert f"(plugin '{one}' is from {dist[one]})" in msg


def test_api_version_may_list_several(tmp_path, monkeypatch):
    src = GOOD.replace('GYM_API_VERSION = "2"', 'GYM_API_VERSION = ["2", "3"]')
    site = make_distribution(tmp_path, "gym-good", "0.4.0", "gym_good", src, "good")
    plugins = load_plugins(entry_points_with(site, monkeypatch, "gym-good"))
    assert plugins.infos["good"].api == "2, 3"
    bad = tmp_path / "bad"
    make_distribution(bad, "gym-bad", "0.1", "gym_bad_api", "GYM_API_VERSION = 1\n", "badapi")
    with pytest.raises(PluginError, match=r"GYM_API_VERSION = 1: it must be a string"):
        load_plugins(entry_points_with(bad, monkeypatch, "gym-bad"))


def test_unknown_error_policy_is_an_error(tmp_path):
    out = run_cli(["--help"], cwd=tmp_path, env={"GYM_PLUGIN_ERRORS": "ignore"})
    assert out.returncode == 2
    assert "GYM_PLUGIN_ERRORS='ignore' is not a policy gym knows" in out.stderr


def test_listing_shows_distribution_version_options_and_hooks(tmp_path):
    site = make_distribution(tmp_path / "site", "gym-good", "0.4.0", "gym_good", GOOD, "good")
    out = run_cli(["--plugins"], cwd=tmp_path, env={"PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.startswith("gym-core 0.3.0, plugin API 2;")
    block = text.split("good  (gym_good; gym-good 0.4.0, API 2)\n")[1].split("\n\n")[0]
    assert block.splitlines()[:2] == ["    quant: keep", "    hooks: gym_step_end"]
    assert ("grpo  (gym_grpo; gym-core 0.3.0)\n    algorithm: cispo, dapo, dr_grpo, gmpo, grpo, gspo"
            in text)
    assert "gym_core  (built in; gym-core 0.3.0)" in text


def test_disabled_plugin_is_listed_as_disabled_and_its_options_are_gone(tmp_path):
    site = make_distribution(tmp_path / "site", "gym-good", "0.4.0", "gym_good", GOOD, "good")
    env = {"PYTHONPATH": str(site), "GYM_DISABLE_PLUGINS": "good, bitdelta"}
    out = run_cli(["--plugins"], cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    active, disabled = out.stdout.split("disabled by GYM_DISABLE_PLUGINS (installed, not loaded):")
    assert "keep" not in active and "bitdelta" not in active
    assert "good  (gym_good; gym-good 0.4.0)" in disabled
    assert "bitdelta  (gym_bitdelta; gym-core 0.3.0)" in disabled
    bad = run_cli(["quant=keep", "--cfg", "job"], cwd=tmp_path, env=env)
    assert bad.returncode != 0 and "keep" in bad.stderr


def test_disabling_an_unknown_name_warns(tmp_path):
    out = run_cli(["--plugins"], cwd=tmp_path, env={"GYM_DISABLE_PLUGINS": "bitdleta,gym_core"})
    assert out.returncode == 0
    assert "names 'gym_core': gym's own registrations cannot be disabled" in out.stderr
    assert "GYM_DISABLE_PLUGINS names 'bitdleta', but no installed plugin" in out.stderr
    assert "bitdelta" in out.stderr  # the installed names, to spot the typo


def test_listing_imports_no_torch_and_starts_fast(tmp_path):
    code = textwrap.dedent(
        """
        import runpy, sys
        sys.argv = ["gym_core", "--plugins"]
        try:
            runpy.run_module("gym_core", run_name="__main__")
        except SystemExit:
            pass
        print("HEAVY", sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert "HEAVY []" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    # Wall time of the real command (the machine may be shared: a loose bound; the
    # measured numbers are in docs/plugins.md).
    for args in (["--plugins"], ["--help"]):
        t0 = time.perf_counter()
        assert run_cli(args, cwd=tmp_path).returncode == 0
        assert time.perf_counter() - t0 < 5.0, args
