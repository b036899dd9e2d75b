"""Plugin contract v0.2: families declared by plugins, one-line messages for what users get
wrong about plugins and overrides, and a core without import cycles."""

from __future__ import annotations

import ast
import textwrap

import pytest

from gym_core.plugin.manager import PluginError, load_plugins
from tests.conftest import REPO, run_cli
from tests.test_plugin_policy import entry_points_with, make_distribution

JUDGE_OWNER = textwrap.dedent('''
    from dataclasses import dataclass, field
    from typing import Any

    from omegaconf import MISSING

    from gym_core.api import OnlineAlgorithmConfig, hookimpl


    from gym_judges import specs


    @dataclass
    class JudgeConfig:
        name: str = MISSING
        strictness: float = 1.0


    @dataclass
    class ExactConfig(JudgeConfig):
        name: str = "exact"


    @dataclass
    class JudgedConfig(OnlineAlgorithmConfig):
        defaults: list[Any] = field(
            default_factory=lambda: [{"/judge@_global_.judge": "exact"}, "_self_"])
        name: str = "judged"


    @hookimpl
    def gym_add_families(families):
        families.add("judge", hook="gym_add_judges", specs=specs)


    @hookimpl
    def gym_add_algorithms(registry):
        registry.add("judged", JudgedConfig, "gym_grpo.grpo:GRPO")


    @hookimpl
    def gym_add_judges(registry):
        registry.add("exact", ExactConfig, "builtins:len")
''')

JUDGE_USER = textwrap.dedent('''
    from dataclasses import dataclass

    from gym_core.api import hookimpl

    from gym_judges import JudgeConfig


    @dataclass
    class FuzzyConfig(JudgeConfig):
        name: str = "fuzzy"
        tolerance: int = 2


    @hookimpl
    def gym_add_judges(registry):
        registry.add("fuzzy", FuzzyConfig, "builtins:len")
''')


@pytest.fixture
def judge_site(tmp_path):
    site = make_distribution(tmp_path / "site", "gym-judges", "1.0", "gym_judges", JUDGE_OWNER,
                             "judges")
    (site / "gym_judges" / "specs.py").write_text(
        "from gym_core.api import hookspec\n\n\n@hookspec\ndef gym_add_judges(registry):\n"
        '    """Register judges: registry.add(name, JudgeConfig subclass, impl)."""\n')
    make_distribution(site, "gym-fuzzy", "0.3", "gym_fuzzy", JUDGE_USER, "fuzzy")
    return site


def test_a_third_party_declares_a_family_another_plugin_fills(judge_site, monkeypatch):
    plugins = load_plugins(entry_points_with(judge_site, monkeypatch, "gym-judges", "gym-fuzzy"))
    assert plugins.families["judge"].owner == "judges"
    assert plugins.registry("judge").names() == ["exact", "fuzzy"]
    assert plugins.component("judge", "fuzzy").plugin == "fuzzy"
    assert plugins.options("fuzzy") == {"judge": ["fuzzy"]}


def test_a_family_group_is_in_the_config_only_with_the_option_that_uses_it(judge_site, tmp_path):
    env = {"PYTHONPATH": str(judge_site)}
    out = run_cli(["algorithm=judged", "judge=fuzzy", "judge.tolerance=5", "--cfg", "job"],
                  cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert "judge:\n  name: fuzzy\n  strictness: 1.0\n  tolerance: 5" in out.stdout
    plain = run_cli(["algorithm=grpo", "--cfg", "job"], cwd=tmp_path, env=env)
    assert "judge" not in plain.stdout
    wrong = run_cli(["algorithm=grpo", "judge=fuzzy"], cwd=tmp_path, env=env)
    assert wrong.returncode == 2
    assert wrong.stderr.strip().splitlines() == [
        "gym: error: judge is a config group of plugin 'judges', part of the config only with "
        "an option that uses it (algorithm=judged): select one of those too"]
    typed = run_cli(["algorithm=judged", "judge=fuzzy", "judge.tolerance=lots"],
                    cwd=tmp_path, env=env)
    assert typed.returncode == 2 and len(typed.stderr.strip().splitlines()) == 1
    assert "judge.tolerance" in typed.stderr


def test_a_hook_of_a_family_whose_owner_is_missing_names_the_plugin(tmp_path, monkeypatch):
    site = make_distribution(tmp_path, "gym-fuzzy", "0.3", "gym_fuzzy_alone",
                             JUDGE_USER.replace("from gym_judges import JudgeConfig",
                                                "JudgeConfig = object"), "fuzzy")
    with pytest.raises(PluginError, match="plugin 'fuzzy'.*implements a hook no loaded plugin "
                                          "declares.*gym_add_judges"):
        load_plugins(entry_points_with(site, monkeypatch, "gym-fuzzy"))


def test_a_grpo_run_config_has_no_training_free_groups(tmp_path):
    out = run_cli(["--cfg", "job"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    keys = [line.split(":")[0] for line in out.stdout.splitlines() if line and line[0] != " "]
    assert keys == ["model", "data", "algorithm", "quant", "trainer", "logger", "run", "ray",
                    "rollout"]
    cl = run_cli(["algorithm=cl_grpo", "experience_store=sqlite", "--cfg", "job"], cwd=tmp_path)
    assert "experience_store:\n  name: sqlite" in cl.stdout and "\nllm:\n  name: local" in cl.stdout


SAME_TWICE = ("from gym_core.api import hookimpl\n\n@hookimpl\ndef gym_add_rewards(registry):\n"
              "    registry.add('same', None, len)\n    registry.add('same', None, len)\n")
CLAIMS_CORE = ("from gym_core.api import DataConfig, hookimpl\n\n@hookimpl\n"
               "def gym_add_datasets(registry):\n    registry.add('arithmetic', DataConfig, 'x:y')\n")


def test_duplicate_names_give_one_piece_of_advice_that_can_be_followed(tmp_path, monkeypatch):
    site = make_distribution(tmp_path / "a", "gym-twice", "1.0", "gym_twice", SAME_TWICE, "twice")
    with pytest.raises(PluginError) as err:
        load_plugins(entry_points_with(site, monkeypatch, "gym-twice"))
    msg = str(err.value)
    assert "plugin 'twice' registers reward 'same' twice" in msg
    assert "registered by both" not in msg
    assert msg.count("GYM_DISABLE_PLUGINS") == 1
    site = make_distribution(tmp_path / "b", "gym-claims", "1.0", "gym_claims", CLAIMS_CORE, "claims")
    with pytest.raises(PluginError) as err:
        load_plugins(entry_points_with(site, monkeypatch, "gym-claims"))
    msg = str(err.value)
    assert "data 'arithmetic' is registered by both plugin 'gym_core' and plugin 'claims'" in msg
    assert msg.count("GYM_DISABLE_PLUGINS") == 1
    assert "GYM_DISABLE_PLUGINS=claims" in msg and "GYM_DISABLE_PLUGINS=gym_core" not in msg


@pytest.mark.parametrize("args,expected", [
    (["trainer.max_steps=abc"],
     "gym: error: trainer.max_steps: Value 'abc' of type 'str' could not be converted to Integer"),
    (["trainer.nope=1"], "gym: error: trainer.nope is not a field of 'trainer'"),
    (["nope=1"], "gym: error: nope is not a config key or group"),
    (["algorithm=nope"], "gym: error: algorithm=nope is not an installed option of 'algorithm'"),
    (["model.lora.r=[1"], "gym: error: cannot parse the overrides"),
])
def test_a_bad_override_is_one_line_and_exit_2(tmp_path, args, expected):
    out = run_cli(args, cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), out.stderr
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_an_option_of_a_disabled_plugin_says_which_plugin_and_how_to_load_it(tmp_path):
    out = run_cli(["algorithm=dpo"], cwd=tmp_path, env={"GYM_DISABLE_PLUGINS": "dpo"})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "gym: error: algorithm=dpo is not loaded: plugin 'dpo' (gym-core 0.3.0) is disabled by "
        "GYM_DISABLE_PLUGINS; remove it from that list to load it (options: cispo, cl_grpo, "
        "dapo, dr_grpo, gmpo, grpo, gspo, kto, orpo, ppo, rloo, sft)"]


def _imports(path) -> set[str]:
    """The gym_core modules ``path`` imports, at module level or inside functions (a
    deferred import is still a dependency), except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gym_core"):
            if node.module == "gym_core":
                out |= {f"gym_core.{a.name}" for a in node.names}
            else:
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("gym_core")}
    return out


def test_the_config_schemas_import_nothing_of_gyms():
    """Plugins' entry modules import the schemas at every start-up (``--help`` included):
    they stay free of the rest of gym (import cycles: tests/test_import_graph.py)."""
    deps = {d for d in _imports(REPO / "gym_core" / "config" / "schema.py")
            if d.startswith("gym_core")}
    # the declarations' helpers and the error they raise: both import nothing of gym's
    assert deps <= {"gym_core.config.fields", "gym_core.base.errors"}, deps
    for helper in ("config/fields.py", "base/errors.py"):
        assert {d for d in _imports(REPO / "gym_core" / helper)
                if d.startswith("gym_core")} <= {"gym_core.base.errors"}, helper
