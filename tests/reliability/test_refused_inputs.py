"""Bad input, as a user hits it on the command line: one line naming the file, line,
field or option (and the fix), exit 2, and nothing already on disk written over."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import uuid

import pytest
import torch

from gym_core.base.errors import GymError
from gym_core.train.checkpoint import list_checkpoints
from tests.conftest import compose
from tests.reliability.conftest import (
    TINY,
    assert_one_line_error,
    gym,
    gym_lines,
    metrics,
    temporaries,
    tree,
)

FAST = ["model=tiny", "trainer.progress=false"]  # refused before any model is loaded


def cli(args, cwd, env, app="gym_core", timeout=300):
    return subprocess.run([sys.executable, "-m", app, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------


def test_non_utf8_bytes_in_a_jsonl_file(tmp_path, gym_env):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"prompt": "1 + 1?", "answer": "2"}\n'
                     b'{"prompt": "2 + 2?", "answer": "4"}\n'
                     b'{"prompt": "caf\xe9?", "answer": "3"}\n')  # latin-1, not UTF-8
    proc = cli([*FAST, "data=jsonl", f"data.train_file={path}", "run.name=enc"], tmp_path,
               gym_env)
    assert_one_line_error(proc, f"{path}:3", "not UTF-8", "0xe9", "iconv")


def test_jsonl_without_a_train_file(tmp_path, gym_env):
    proc = cli([*FAST, "data=jsonl", "run.name=nofile"], tmp_path, gym_env)
    assert_one_line_error(proc, "data=jsonl needs data.train_file=PATH")
    assert not (tmp_path / "runs").exists()


def test_a_train_file_that_is_a_directory(tmp_path, gym_env):
    (tmp_path / "data").mkdir()
    proc = cli([*FAST, "data=jsonl", "data.train_file=data", "run.name=dir"], tmp_path,
               gym_env)
    assert_one_line_error(proc, "'data' is a directory", "name the JSONL file itself")


def test_a_long_prompt_keeps_its_end_in_online_methods(tmp_path, gym_env):
    """A 100,000-character prompt (it tried to allocate 10 GB): an online method cuts it to
    algorithm.max_prompt_length tokens, keeping its end, and says so once."""
    rows = tmp_path / "long.jsonl"
    filler = "lorem ipsum " * 8400  # 100,800 characters
    rows.write_text("".join(json.dumps({"prompt": f"{filler} What is {a} + 1?",
                                        "answer": str(a + 1)}) + "\n" for a in range(12)))
    args = [*TINY, "data=jsonl", f"data.train_file={rows}", "data.test_fraction=0.2",
            "trainer.max_steps=1", "algorithm.max_prompt_length=64", "run.name=long"]
    proc = gym(args, tmp_path, gym_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warned = [ln for ln in gym_lines(proc.stderr) if "max_prompt_length=64" in ln]
    assert len(warned) == 1 and "keep their last tokens" in warned[0], proc.stderr[-3000:]
    assert metrics(tmp_path / "runs" / "long")[0]["prompts_cut"] == 2  # batch_size prompts


def test_sampling_keeps_a_long_prompts_end():
    from gym_core.data.tasks import render_prompts
    from gym_core.model.policy import load_policy
    from gym_core.sampling.generation import Sampling, sample

    policy = load_policy(compose(["model=tiny"]).model, torch.device("cpu"))
    prompts = ["x" * 5000 + " What is 2 + 2?", "What is 1 + 1?"]
    full = policy.tokenizer(render_prompts(policy.tokenizer, prompts, None),
                            add_special_tokens=False).input_ids
    limit = len(full[1])  # the short prompt fits exactly
    out = sample(policy.model, policy.tokenizer, prompts, system_prompt=None, max_new_tokens=2,
                 sampling=Sampling(do_sample=False), max_prompt_length=limit)
    assert out.prompts_cut == 1 and out.prompt_ids.shape[1] == limit
    assert out.prompt_ids[0].tolist() == full[0][-limit:]  # the end: question, assistant turn
    assert out.prompt_ids[1].tolist() == full[1]
    assert out.prompt_mask.all()


# ----------------------------------------------------------------------------------------
# model, trainer, config
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("override,needles", [
    ("model.tiny.num_key_value_heads=3", ["num_attention_heads=4", "num_key_value_heads=3"]),
    ("model.tiny.hidden_size=66", ["hidden_size=66", "num_attention_heads=4"]),
    ("model.tiny.num_hidden_layers=0", ["num_hidden_layers=0", "at least 1"]),
])
def test_an_impossible_tiny_model(tmp_path, gym_env, override, needles):
    assert_one_line_error(cli([*FAST, override, "run.name=shape"], tmp_path, gym_env), *needles)


@pytest.fixture(scope="module")
def done_run(tmp_path_factory, gym_env):
    """A finished 2-step run (checkpoint every step), copied afresh for each test."""
    cwd = tmp_path_factory.mktemp("done")
    proc = gym([*TINY, "trainer.max_steps=2", "trainer.save_every=1", "run.name=r"], cwd,
               gym_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "runs" / "r"


@pytest.fixture
def run_copy(done_run, tmp_path):
    target = tmp_path / "runs" / "r"
    shutil.copytree(done_run, target)
    return target


def test_max_steps_below_one(run_copy, gym_env):
    """It used to run 0 steps and save the untrained model as final/."""
    before = tree(run_copy)
    proc = cli([*TINY, "trainer.max_steps=0", "run.name=r"], run_copy.parents[1], gym_env)
    assert_one_line_error(proc, "trainer.max_steps=0 must be at least 1")
    assert tree(run_copy) == before


def test_max_steps_below_the_steps_a_run_has_taken(run_copy, gym_env):
    """It used to be accepted without a word (the finished run stayed as it was)."""
    before = tree(run_copy)
    proc = cli([*TINY, "trainer.max_steps=1", "run.name=r"], run_copy.parents[1], gym_env)
    assert_one_line_error(proc, "runs/r has already trained 2 steps", "trainer.max_steps=1 is "
                          "below that", "give trainer.max_steps=2 or more to continue it")
    assert tree(run_copy) == before


def test_a_corrupt_eval_before_json(run_copy, gym_env):
    (run_copy / "eval_before.json").write_text('{"accuracy": 0.5, "prefer')
    before = tree(run_copy)
    proc = cli([*TINY, "trainer.max_steps=3", "trainer.eval_before=true", "run.name=r"],
               run_copy.parents[1], gym_env)
    assert_one_line_error(proc, str(run_copy / "eval_before.json"), "unreadable",
                          "delete it to score the starting model again")
    assert tree(run_copy) == before


def test_a_nan_loss_stops_in_one_line_and_keeps_the_checkpoint(run_copy, gym_env):
    before = {p: (p / "trainable.safetensors").read_bytes()
              for _, p in list_checkpoints(run_copy)}
    # weights of ~1e20 are finite; the logits they give overflow, and the loss is NaN
    proc = cli([*TINY, "trainer.max_steps=5", "trainer.save_every=1", "algorithm.lr=1e20",
                "run.name=r"], run_copy.parents[1], gym_env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = gym_lines(proc.stderr)
    assert lines[-1].startswith("gym: error: the loss became nan at step 4"), lines
    assert "the last checkpoint is kept" in lines[-1]
    assert any("updates are exploding" in ln for ln in lines[:-1])  # step 3 warned first
    assert [s for s, _ in list_checkpoints(run_copy)] == [2, 3]  # keep_last=2
    assert (list_checkpoints(run_copy)[0][1] / "trainable.safetensors").read_bytes() == \
        before[list_checkpoints(run_copy)[0][1]]


def test_exploding_weights_warn_once(tmp_path, with_digit_reward, capsys):
    """A learning rate that blows the weights up without a NaN (lr 100: 500 times their
    norm after one step) is a metric and one warning."""
    from gym_core.train.job import run_job

    run_job(compose([*TINY, "algorithm.lr=100", "trainer.max_steps=3"]), run_dir=tmp_path)
    rows = metrics(tmp_path)
    assert rows[0]["weight_norm_ratio"] > 100
    err = capsys.readouterr().err
    warned = [ln for ln in err.splitlines() if "updates are exploding" in ln]
    assert len(warned) == 1 and warned[0].startswith("gym: warning: at step 1 ")
    assert "lower algorithm.lr (now 100)" in warned[0]


def test_weight_norm_ratio_stays_near_one_in_a_sound_run(tmp_path, with_digit_reward, capsys):
    from gym_core.train.job import run_job

    run_job(compose([*TINY, "trainer.max_steps=3"]), run_dir=tmp_path)
    assert all(1.0 <= r["weight_norm_ratio"] < 1.1 for r in metrics(tmp_path))
    assert "exploding" not in capsys.readouterr().err


# ----------------------------------------------------------------------------------------
# the disk: read-only, full
# ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path, size: str):
    """A small tmpfs at ``path`` (we run as root in CI; elsewhere the test is skipped)."""
    path.mkdir(parents=True, exist_ok=True)
    got = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                         capture_output=True, text=True)
    if got.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({got.stderr.strip()}): the disk tests need "
                    "root with CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def mount(*args):
    got = subprocess.run(["mount", *args], capture_output=True, text=True)
    if got.returncode != 0:
        pytest.skip(f"cannot mount here ({got.stderr.strip()}): the disk tests need root "
                    "with CAP_SYS_ADMIN")


def test_a_read_only_run_directory(done_run, tmp_path, gym_env):
    """Checked by writing, before the first step: root ignores permission bits, so the
    folder is a read-only mount."""
    with tmpfs(tmp_path / "disk", "8m") as disk:
        shutil.copytree(done_run, disk / "runs" / "r")
        before = tree(disk / "runs" / "r")
        mount("-o", "remount,ro", str(disk))
        proc = cli([*TINY, "trainer.max_steps=3", "run.name=r", f"run.root={disk}/runs"],
                   tmp_path, gym_env)
        assert_one_line_error(proc, f"{disk}/runs/r", "Read-only file system")
        assert tree(disk / "runs" / "r") == before


def test_a_read_only_checkpoints_folder(run_copy, gym_env):
    ckpts = run_copy / "checkpoints"
    mount("--bind", str(ckpts), str(ckpts))  # a read-only view of the folder itself
    try:
        mount("-o", "remount,bind,ro", str(ckpts))
        before = tree(run_copy)
        proc = cli([*TINY, "trainer.max_steps=3", "run.name=r"], run_copy.parents[1], gym_env)
        assert_one_line_error(proc, f"cannot write in {ckpts}", "Read-only file system")
        assert tree(run_copy) == before  # no step was taken
    finally:
        subprocess.run(["umount", str(ckpts)], capture_output=True)


def test_a_full_disk(done_run, tmp_path, gym_env):
    """Extending a run on a full disk: one line naming the folder and the free space; the
    run's checkpoints and rows are intact; with space again it resumes and finishes."""
    with tmpfs(tmp_path / "disk", "2m") as disk:
        run_dir = disk / "runs" / "r"
        shutil.copytree(done_run, run_dir)
        ckpts = {p.name: tree(p) for _, p in list_checkpoints(run_dir)}
        rows = (run_dir / "metrics.jsonl").read_bytes()
        filler = disk / f"filler-{uuid.uuid4().hex}"
        with open(filler, "wb") as fh:  # leave ~24 KB: a checkpoint needs more
            free = shutil.disk_usage(disk).free
            fh.write(b"\0" * (free - 24 * 1024))
        args = [*TINY, "trainer.max_steps=4", "trainer.save_every=1", "run.name=r",
                f"run.root={disk}/runs"]
        proc = cli(args, tmp_path, gym_env)
        line = assert_one_line_error(proc, "no space left on ", f"{run_dir}", "MB")
        assert "free 0 MB" in line or "free 1 MB" in line
        assert {p.name: tree(p) for _, p in list_checkpoints(run_dir)
                if p.name in ckpts} == ckpts
        assert (run_dir / "metrics.jsonl").read_bytes().startswith(rows)
        filler.unlink()
        again = cli(args, tmp_path, gym_env)
        assert again.returncode == 0, again.stderr[-3000:]
        assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4]
        assert temporaries(run_dir) == []


# ----------------------------------------------------------------------------------------
# Hydra's own paths: sweeps, --cfg, the soup app, values that fail at run time
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,needles", [
    (["-m", "algorithm.lr=1e-5,abc"], ["algorithm.lr", "'abc'"]),  # the second value
    (["-m", "algorithm=grpo,nope"], ["algorithm=nope", "grpo"]),
    (["algorithm.no_such_knob=1", "--cfg", "job"], ["no_such_knob"]),
    (["run.name=${nope}"], ["nope", "run.name"]),
    (["data.system_prompt=${oc.env:GYM_TEST_UNSET_VARIABLE}"], ["GYM_TEST_UNSET_VARIABLE"]),
    (["trainer.lr_scheduler=step"], ["trainer.lr_scheduler='step'", "cosine"]),
])
def test_hydra_errors_are_one_line(tmp_path, gym_env, args, needles):
    assert_one_line_error(cli([*FAST, *args], tmp_path, gym_env), *needles)
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------
# soups
# ----------------------------------------------------------------------------------------


def _delta_files(folder, n=2):
    from gym_core.deltas.delta import FullPrecision, save_packed

    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        delta = {"layer.q_proj.weight": torch.randn(8, 16, generator=g) * 1e-3,
                 "layer.norm.weight": torch.randn(16, generator=g) * 1e-3}
        paths.append(folder / f"d{i}.safetensors")
        save_packed(FullPrecision().quantize(delta), paths[-1])
    return paths


def test_soup_input_missing_a_tensor(tmp_path, gym_env):
    from gym_core.deltas.delta import PackedDelta, load_packed, save_packed

    a, b = _delta_files(tmp_path)
    packed = load_packed(b)
    del packed.tensors["layer.norm.weight.full"]  # written whole, checksum and all
    save_packed(PackedDelta(packed.tensors, packed.meta, packed.num_params), b)
    proc = cli([f"soup.inputs=[{a},{b}]", f"out={tmp_path}/soup"], tmp_path, gym_env,
               app="gym_core.soup")
    assert_one_line_error(proc, str(b), "layer.norm.weight.full")
    assert not (tmp_path / "soup" / "soup.safetensors").exists()


def test_soup_input_with_a_nan_scale(tmp_path):
    """A NaN in an input (here a file written whole, its checksum matching) would spread
    into the soup: refused naming the file and the tensor."""
    from omegaconf import OmegaConf

    from gym_core.deltas.aggregate import make_soup
    from gym_core.deltas.delta import PackedDelta, load_packed, save_packed
    from gym_core.plugin.startup import bootstrap
    from gym_soup import MeanConfig

    a, b = _delta_files(tmp_path)
    packed = load_packed(b)
    packed.tensors["layer.norm.weight.full"][3] = float("nan")
    save_packed(PackedDelta(packed.tensors, packed.meta, packed.num_params), b)
    cfg = OmegaConf.structured(MeanConfig(inputs=[str(a), str(b)]))
    with pytest.raises(GymError, match=r"d1.safetensors: delta tensor 'layer.norm.weight' "
                                       "decodes to NaN"):
        make_soup(cfg, tmp_path / "soup", bootstrap())
    assert not (tmp_path / "soup" / "soup.safetensors").exists()


@pytest.mark.parametrize("inputs,needles", [
    (None, ["soup.inputs=[a,b,...]"]),
    ("[]", ["soup.inputs has 0 delta(s)"]),
])
def test_soup_without_inputs(tmp_path, gym_env, inputs, needles):
    args = [f"out={tmp_path}/soup"] + ([f"soup.inputs={inputs}"] if inputs else [])
    assert_one_line_error(cli(args, tmp_path, gym_env, app="gym_core.soup"), *needles)


@pytest.mark.parametrize("override,needles", [
    ("soup.no_such_knob=1", ["soup.no_such_knob"]),
    ("soup=nope", ["soup=nope", "median"]),
    ("soup.clip_norm=abc", ["soup.clip_norm", "'abc'"]),
])
def test_soup_app_override_errors_are_one_line(tmp_path, gym_env, override, needles):
    proc = cli(["soup.inputs=[a,b]", override], tmp_path, gym_env, app="gym_core.soup")
    assert_one_line_error(proc, *needles)
    assert list(tmp_path.iterdir()) == []
