"""Values outside what the schema declares, refused once, before anything is created: one
line naming the field, the value and what is allowed, exit 2 (issue 21's "choices declared
once", issue 28's remaining bad inputs).

Most cases run gym's real command line in-process (``gym_core.__main__.entry`` with the
arguments, in a fresh folder: the same checks as ``python -m gym_core``, without a
3-second interpreter start each); a few run it as a subprocess to show the exit status and
stderr a user sees.
"""

from __future__ import annotations

import json
import sys
import typing

import pytest
from omegaconf import OmegaConf

from gym_core.base.errors import GymError
from gym_core.config.fields import bounded, check_values, declarations, one_of, undeclared_numbers
from tests.reliability.conftest import assert_one_line_error, gym_lines, tree

FAST = ["model=tiny", "trainer.progress=false", "trainer.tensorboard=false", "run.name=x"]


def refuse(args, cwd, monkeypatch, capsys) -> str:
    """``python -m gym_core ARGS`` in ``cwd``, in-process: exit status 2, exactly one
    line on stderr (``gym: error: ...``), no traceback, and nothing created in ``cwd``.
    Returns the line."""
    from gym_core.__main__ import entry

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["gym", *args])
    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")  # entry() sets it; keep the test's env
    before = tree(cwd)
    with pytest.raises(SystemExit) as exc:
        entry()
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err
    lines = gym_lines(err)
    assert len(lines) == 1 and lines[0].startswith("gym: error: "), err
    assert tree(cwd) == before, tree(cwd)
    return lines[0]


# ----------------------------------------------------------------------------------------
# issue 28's list, and the core's and plugins' declared ranges and choices
# ----------------------------------------------------------------------------------------

CASES = [
    # (overrides, what the line must say)
    (["algorithm.temperature=0"], "algorithm.temperature=0.0 must be greater than 0"),
    (["algorithm.temperature=-0.5"], "algorithm.temperature=-0.5 must be greater than 0"),
    (["algorithm.top_k=-1"], "algorithm.top_k=-1 must be at least 0 (0: off)"),
    (["model.lora.r=0"], "model.lora.r=0 must be at least 1"),
    (["algorithm.adam_betas=[0.9]"], "algorithm.adam_betas=[0.9] must hold 2 numbers, has 1"),
    (["algorithm.adam_betas=[0.9,1.5]"], "each value must be in [0, 1), 1.5 is not"),
    (["algorithm.beta=-0.1"], "algorithm.beta=-0.1 must be at least 0"),
    (["algorithm.epsilon=-0.2"], "algorithm.epsilon=-0.2 must be at least 0"),
    (["algorithm.top_p=1.5"], "algorithm.top_p=1.5 must be in (0, 1]"),
    (["algorithm.top_p=0"], "algorithm.top_p=0.0 must be in (0, 1]"),
    (["algorithm.epsilon_high=0.1"],
     "algorithm.epsilon_high=0.1 is below algorithm.epsilon=0.2"),
    (["trainer.eval_size=-1"], "trainer.eval_size=-1 must be at least 1 (null: the whole split)"),
    (["algorithm.lr=0"], "algorithm.lr=0.0 must be greater than 0"),
    (["algorithm.lr=nan"], "algorithm.lr=nan must be a finite number greater than 0"),
    (["trainer.save_every=-1"], "trainer.save_every=-1 must be at least 1 (null: only at the end)"),
    (["trainer.save_every=0"], "trainer.save_every=0 must be at least 1 (null: only at the end)"),
    (["trainer.max_grad_norm=0"], "trainer.max_grad_norm=0.0 must be greater than 0"),
    (["trainer.threads=0"], "trainer.threads=0 must be at least 1"),
    (["trainer.device=tpu"], "trainer.device='tpu' is not one of auto, cpu, cuda"),
    (["trainer.lr_scheduler=step"],
     "trainer.lr_scheduler='step' is not one of constant, linear, cosine"),
    (["model.finetune=half"], "model.finetune='half' is not one of lora, full"),
    (["model.lora.dropout=1.0"], "model.lora.dropout=1.0 must be in [0, 1)"),
    (["model.tiny.num_hidden_layers=0"], "model.tiny.num_hidden_layers=0 must be at least 1"),
    (["algorithm.num_generations=1"], "algorithm.num_generations=1 must be at least 2"),
    (["algorithm.reward_weights=[1.0,2.0]"],
     "algorithm.reward_weights has 2 values for 1 rewards"),
    (["algorithm.importance_sampling_mode=tis"],
     "algorithm.importance_sampling_mode='tis' is not one of token_truncate"),
    (['data.template="What is {c}?"'],
     "data.template='What is {c}?' names {c}, which is not a field of the task"),
    (["data.test_size=0"], "data.test_size=0 must be at least 1"),
    (["data=jsonl", "data.train_file=x.jsonl", "data.format=csv"],
     "data.format='csv' is not one of auto, answer, pairs"),
    # plugins' declarations get the same check (their configs subclass the core's bases)
    (["algorithm.loss_type=nope"], "algorithm.loss_type='nope' is not one of grpo, bnpo"),
    (["algorithm.importance_sampling_level=seq"],
     "algorithm.importance_sampling_level='seq' is not one of token, sequence"),
    (["algorithm=dr_grpo", "algorithm.scale_rewards=std"],
     "algorithm.scale_rewards='std' is not one of group, batch, none"),
    (["algorithm=dpo", "algorithm.beta=-1"], "algorithm.beta=-1.0 must be greater than 0"),
    (["algorithm=dpo", "algorithm.loss_type=[sigmoid,nope]"], "names 'nope', which is not one"),
    (["algorithm=kto", "algorithm.desirable_weight=0"],
     "algorithm.desirable_weight=0.0 must be greater than 0"),
    (["algorithm=ppo", "algorithm.gamma=1.5"], "algorithm.gamma=1.5 must be in [0, 1]"),
    (["algorithm=ppo", "algorithm.kl_estimator=k2"], "algorithm.kl_estimator='k2' is not one"),
    (["algorithm=rloo", "algorithm.reward_clip_range=[1.0]"],
     "algorithm.reward_clip_range=[1.0] must hold 2 numbers"),
    (["quant=deltaquant", "quant.bits=5"], "quant.bits=5 is not one of 2, 3, 4, 8"),
    (["quant=bitdelta", "quant.sign_of_zero=0"], "quant.sign_of_zero=0 is not one of 1, -1"),
    # a group a plugin declares for its own method (cl_grpo's llm)
    (["algorithm=cl_grpo", "llm.temperature=-1"], "llm.temperature=-1.0 must be at least 0"),
    # each value of a sweep is checked before the first job starts
    (["-m", "algorithm.lr=1e-5,0"], "algorithm.lr=0.0 must be greater than 0"),
]


@pytest.mark.parametrize("overrides,needle", CASES, ids=lambda v: " ".join(v)
                         if isinstance(v, list) else None)
def test_a_value_outside_its_declaration_is_one_line(tmp_path, monkeypatch, capsys,
                                                     overrides, needle):
    line = refuse([*FAST, *overrides], tmp_path, monkeypatch, capsys)
    assert needle in line, line


def test_a_run_root_in_proc_and_a_run_name_that_is_a_file(tmp_path, monkeypatch, capsys):
    line = refuse([*FAST, "run.root=/proc/gym-runs"], tmp_path, monkeypatch, capsys)
    assert "run.root=/proc/gym-runs is inside /proc" in line
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "notes").write_text("mine\n")
    line = refuse([*FAST[:-1], "run.name=notes"], tmp_path, monkeypatch, capsys)
    assert "run.name=notes" in line and "is a file, not a run folder" in line
    assert (tmp_path / "runs" / "notes").read_text() == "mine\n"
    (tmp_path / "root-file").write_text("x")
    line = refuse([*FAST, "run.root=root-file"], tmp_path, monkeypatch, capsys)
    assert "run.root=root-file is a file, not a folder" in line


def test_the_soup_app_checks_its_declarations_too(tmp_path, monkeypatch, capsys):
    from gym_core.soup import entry

    monkeypatch.chdir(tmp_path)
    for args, needle in ((["soup=dare", "soup.p=1.0"], "soup.p=1.0 must be in [0, 1)"),
                         (["soup=ties", "soup.density=0"], "soup.density=0.0 must be in (0, 1]"),
                         (["soup.weights=[1.0,-1.0]"], "each value must be at least 0"),
                         (["soup.weights=[1.0]"], "soup.weights=[1.0] must be 2 non-negative")):
        monkeypatch.setattr(sys, "argv", ["soup", "soup.inputs=[a,b]", *args])
        with pytest.raises(SystemExit) as exc:
            entry()
        lines = gym_lines(capsys.readouterr().err)
        assert exc.value.code == 2 and len(lines) == 1, lines
        assert lines[0].startswith("gym: error: ") and needle in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_the_exit_status_and_stderr_a_user_sees(tmp_path, gym_env):
    """The same checks through a real process: exit 2, one line, no runs/ folder."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "gym_core", *FAST, "algorithm.top_k=-1"],
                          cwd=tmp_path, env=gym_env, capture_output=True, text=True, timeout=300)
    assert_one_line_error(proc, "algorithm.top_k=-1 must be at least 0 (0: off)")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------
# every numeric option has a declared range; every choice is declared once
# ----------------------------------------------------------------------------------------


def registered_configs():
    """Every config class the installed plugins and the core register."""
    from gym_core.config.schema import MODEL_OPTIONS, RunConfig, SoupConfig, TrainerConfig
    from gym_core.plugin.startup import bootstrap

    plugins = bootstrap()
    out = {"trainer": TrainerConfig, "run": RunConfig, "soup_base": SoupConfig,
           **{f"model={k}": type(v) for k, v in MODEL_OPTIONS.items()}}
    for family in plugins.families.values():
        for comp in plugins.registries[family.name]:
            if comp.config is not None:
                out[f"{family.name}={comp.name}"] = comp.config
    return out


def test_every_numeric_option_declares_its_range():
    configs = registered_configs()
    assert {"algorithm=grpo", "algorithm=dpo", "quant=deltaquant", "soup=dare",
            "llm=openai", "data=jsonl"} <= set(configs)
    missing = {name: undeclared_numbers(cls) for name, cls in configs.items()}
    assert {k: v for k, v in missing.items() if v} == {}


def test_every_default_is_allowed_by_its_declaration():
    """A default outside its own declaration would refuse every run that keeps it."""
    for name, cls in registered_configs().items():
        node = OmegaConf.structured(cls)
        for key in [k for k in node if OmegaConf.is_missing(node, k)]:
            node[key] = ["a", "b"] if key == "inputs" else "x"
        check_values(node, name.split("=")[0])


def test_choices_are_read_from_a_literal_and_subclasses_keep_them():
    from gym_grpo import DrGRPOConfig, GRPOConfig, LossType

    assert declarations(GRPOConfig)["loss_type"]["choices"] == typing.get_args(LossType)
    # DrGRPOConfig only changes the default: the declaration is GRPOConfig's
    assert declarations(DrGRPOConfig)["loss_type"] is declarations(GRPOConfig)["loss_type"]
    with pytest.raises(GymError, match=r"algorithm.loss_type='x' is not one of grpo"):
        check_values(OmegaConf.structured(DrGRPOConfig(loss_type="x")), "algorithm")


def test_a_plugin_config_declares_its_own_fields_and_rules():
    """What docs/plugins.md shows a plugin author: a Literal choice, a range, a rule."""
    from dataclasses import dataclass

    from gym_core.api import OnlineAlgorithmConfig

    Baseline = typing.Literal["mean", "median"]

    @dataclass
    class MyConfig(OnlineAlgorithmConfig):
        name: str = "mine"
        baseline: str = one_of(Baseline, "mean")
        alpha: float = bounded(0.5, ge=0, le=1)
        alpha_max: float = bounded(1.0, ge=0, le=1)

        @staticmethod
        def validate(cfg, key):
            if cfg.alpha > cfg.alpha_max:
                raise GymError(f"{key}.alpha={cfg.alpha} is above {key}.alpha_max")

    check_values(OmegaConf.structured(MyConfig), "algorithm")
    for kw, message in (({"baseline": "mode"}, "algorithm.baseline='mode' is not one of mean, "
                                               "median"),
                        ({"alpha": 2.0}, r"algorithm.alpha=2.0 must be in \[0, 1\]"),
                        ({"alpha": 0.9, "alpha_max": 0.5}, "is above algorithm.alpha_max"),
                        ({"top_p": 0.0}, r"algorithm.top_p=0.0 must be in \(0, 1\]"),  # a base's
                        ({"reward_weights": [1.0, 1.0]}, "2 values for 1 rewards")):
        with pytest.raises(GymError, match=message):
            check_values(OmegaConf.structured(MyConfig(**kw)), "algorithm")


# ----------------------------------------------------------------------------------------
# data rows (read when the job starts)
# ----------------------------------------------------------------------------------------


def rows_file(folder, rows):
    path = folder / "rows.jsonl"
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
    return path


def nothing_but(cwd, *names):
    """Nothing but ``names`` in ``cwd``: the start locked runs/x before the job read the
    data, and removed it again when the job refused (gym_core/__main__.py)."""
    return sorted(tree(cwd)) == sorted(names)


@pytest.mark.parametrize("method,rows,needle", [
    ("grpo", [{"prompt": "1+1?", "answer": "2"}, {"prompt": "2+2?", "answer": {"value": 4}}],
     "rows.jsonl:2: field 'answer' must be a string or a finite number, got an object"),
    ("grpo", [{"prompt": "1+1?", "answer": "2"}, '{"prompt": "2+2?", "answer": NaN}\n'],
     "rows.jsonl:2: field 'answer' must be a string or a finite number, got float nan"),
    ("dpo", [{"prompt": "1+1?", "chosen": "2", "rejected": "3"},
             {"prompt": "2+2?", "chosen": 4, "rejected": "5"}],
     "rows.jsonl:2: field 'chosen' must be a string or a list of messages, got int 4"),
    ("kto", [{"prompt": "1+1?", "completion": "2", "label": True},
             {"prompt": "2+2?", "completion": "5", "label": "false"}],
     "rows.jsonl:2: field 'label' must be true or false (a JSON boolean), got the string "
     "'false'"),
])
def test_bad_rows_name_the_file_line_and_field(tmp_path, monkeypatch, capsys, method, rows,
                                               needle):
    """Each with the method that trains on such rows (DPO's pairs, KTO's labels)."""
    from gym_core.__main__ import entry

    path = rows_file(tmp_path, rows)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["gym", *FAST, f"algorithm={method}", "data=jsonl",
                                      f"data.train_file={path}"])
    with pytest.raises(SystemExit) as exc:
        entry()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and gym_lines(err) == [f"gym: error: {path.parent}/{needle}"], err
    assert nothing_but(tmp_path, "rows.jsonl"), tree(tmp_path)


def test_kto_string_labels_are_refused_not_counted_as_desirable(tmp_path):
    from gym_core.data.tasks import jsonl_task
    from gym_core.plugin.startup import compose

    path = rows_file(tmp_path, [{"prompt": f"{a}+1?", "completion": str(a), "label": lab}
                                for a, lab in enumerate([True, False, 1, 0] * 3)])
    cfg = compose(["data=jsonl", f"data.train_file={path}", "data.test_fraction=0.25"]).data
    task = jsonl_task(cfg)
    labels = [r["label"] for r in task.train + task.test]
    assert labels.count(False) == 6 and labels.count(True) == 6  # 0 / 1 are fine too
    path.write_text(path.read_text().replace("false", '"false"', 1))
    with pytest.raises(GymError, match=r"rows.jsonl:2: field 'label' must be true or false"):
        jsonl_task(cfg)


def test_a_train_file_that_is_not_a_regular_file(tmp_path, monkeypatch, capsys):
    from gym_core.__main__ import entry

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["gym", *FAST, "data=jsonl", "data.train_file=/dev/null"])
    with pytest.raises(SystemExit) as exc:
        entry()
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert gym_lines(err) == ["gym: error: data file '/dev/null' is not a regular file (a "
                              "character device); name a JSONL file"], err
    assert nothing_but(tmp_path), tree(tmp_path)
