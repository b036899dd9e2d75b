"""A plugin written for an older layout stops on an ImportError naming a gym_core module that
moved, not on the API-version check: the loader then says which plugin API the plugin was
probably built for and what to do, in the same one line."""

from __future__ import annotations

from importlib import metadata

import pytest

from gym_core import __version__
from gym_core.plugin.manager import PluginError, load_plugins
from tests.conftest import run_cli
from tests.test_plugin_policy import make_distribution

# gym-core 0.1 (API 1): names came from the core's modules, gym_core.api did not exist
API1 = """
from dataclasses import dataclass
from gym_core import hookimpl
from gym_core.delta import Quantizer
"""
# gym-core 0.2 (API 2): the hooks from gym_core.api, but a name from 0.2's flat module path
API2 = """
from gym_core.api import hookimpl
from gym_core.delta import Quantizer

GYM_API_VERSION = "2"
"""
# a name gym_core.api does not have (yet)
NEWER = """
from gym_core.api import hookimpl, QuantumAnnealer
"""


def _load(tmp_path, monkeypatch, source):
    make_distribution(tmp_path, "gym-old", "0.1.4", "gym_old", source, "old")
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [*metadata.entry_points(group="gym_core"),
           *metadata.distribution("gym-old").entry_points]
    with pytest.raises(PluginError) as info:
        load_plugins(eps)
    message = str(info.value)
    assert "\n" not in message
    assert "plugin 'old' (gym_old) from distribution gym-old 0.1.4 failed to import" in message
    return message


@pytest.mark.parametrize(("source", "api"), [(API1, "1"), (API2, "2")], ids=["api1", "api2"])
def test_an_old_module_path_names_the_plugin_api_and_the_fix(tmp_path, monkeypatch, source,
                                                              api):
    message = _load(tmp_path, monkeypatch, source)
    assert "No module named 'gym_core.delta'" in message
    era = "0.1's module paths" if api == "1" else "0.2's module paths"
    assert f"probably built for gym plugin API {api} (gym-core {era}" in message
    assert "import the names from gym_core.api" in message
    assert f"install a release of gym-old made for gym-core {__version__}" in message


def test_a_name_the_api_lacks_points_at_a_newer_gym_core(tmp_path, monkeypatch):
    message = _load(tmp_path, monkeypatch, NEWER)
    assert "gym_core.api.QuantumAnnealer is not in plugin API" in message
    assert "probably built for a newer gym-core" in message


def test_other_import_errors_get_no_api_guess(tmp_path, monkeypatch):
    message = _load(tmp_path, monkeypatch, "import gym_no_such_dependency\n")
    assert "No module named 'gym_no_such_dependency'" in message
    assert "plugin API" not in message


def test_the_command_line_prints_it_as_one_error_line(tmp_path):
    make_distribution(tmp_path, "gym-old", "0.1.4", "gym_old", API1, "old")
    proc = run_cli(["--plugins"], tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("gym: error: plugin 'old'"), proc.stderr
    assert "probably built for gym plugin API 1" in lines[0]
