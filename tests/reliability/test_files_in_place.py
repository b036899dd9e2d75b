"""Files written only where they belong (issue 28): an export or a soup never replaces
what it was not asked to, a run name stays one folder inside run.root, a finished run
whose checkpoints are gone is not trained again over its final/, a damaged checkpoint is
not resumed, a disabled plugin's option leaves nothing behind; and the odd places
(a checkpoints file, a lock folder, an unwritable or impossible out=, a truncated
adapter, a port out of range) are one line each, exit 2, no traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from gym_core.train.checkpoint import WEIGHTS, list_checkpoints
from tests.reliability.conftest import TINY, assert_one_line_error, gym, tree

FAST = ["model=tiny", "trainer.progress=false"]  # refused before any model is loaded


def cli(args, cwd, env, app="gym_core", timeout=300):
    return subprocess.run([sys.executable, "-m", app, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, gym_env):
    """A finished 2-step run with a BitDelta delta, copied afresh for each test."""
    cwd = tmp_path_factory.mktemp("finished")
    proc = gym([*TINY, "trainer.max_steps=2", "trainer.save_every=1", "quant=bitdelta",
                "run.name=r"], cwd, gym_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "runs" / "r"


@pytest.fixture
def run(finished, tmp_path):
    target = tmp_path / "runs" / "r"
    shutil.copytree(finished, target)
    return target


# ----------------------------------------------------------------------------------------
# export and soup outputs
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["delta", "gguf"])
def test_export_to_an_existing_file_needs_overwrite(run, tmp_path, gym_env, fmt):
    target = tmp_path / f"mine.{fmt}"
    target.write_bytes(b"the user's own file")
    proc = cli([f"run={run}", f"format={fmt}", f"out={target}"], tmp_path, gym_env,
               app="gym_core.export")
    assert_one_line_error(proc, f"out={target} already exists", "overwrite=true")
    assert target.read_bytes() == b"the user's own file"
    if fmt == "delta":  # overwrite=true replaces it with the export
        proc = cli([f"run={run}", "format=delta", f"out={target}", "overwrite=true"], tmp_path,
                   gym_env, app="gym_core.export")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert target.read_bytes() == (run / "delta" / "bitdelta.safetensors").read_bytes()


def test_export_where_nothing_can_be_written(run, tmp_path, gym_env):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = cli([f"run={run}", "format=delta", f"out={blocker}/sub/d.safetensors"], tmp_path,
               gym_env, app="gym_core.export")
    assert_one_line_error(proc, "is inside", "which is a file", "out=")
    proc = cli([f"run={run}", "format=delta", "out=/proc/gym-export.safetensors"], tmp_path,
               gym_env, app="gym_core.export")
    assert_one_line_error(proc, "cannot write out=/proc/gym-export.safetensors")


@pytest.mark.parametrize("fmt", ["hf", "lora", "gguf"])
def test_export_of_a_truncated_adapter(run, tmp_path, gym_env, fmt):
    """format=lora, which copies the adapter, used to export the damaged file as it was."""
    adapter = run / "final" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 2])
    proc = cli([f"run={run}", f"format={fmt}", f"out={tmp_path / 'out'}"], tmp_path, gym_env,
               app="gym_core.export")
    assert_one_line_error(proc, f"{adapter} is damaged", "cut short or edited")
    assert not (tmp_path / "out").exists()


def test_a_soup_is_not_written_into_a_run_nor_over_a_file(run, tmp_path, gym_env):
    delta = run / "delta" / "bitdelta.safetensors"
    before = tree(run)
    proc = cli([f"soup.inputs=[{delta},{delta}]", f"out={run}"], tmp_path, gym_env,
               app="gym_core.soup")
    assert_one_line_error(proc, f"out={run} holds a training run")
    assert tree(run) == before and not (run / "soup.safetensors").exists()
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    proc = cli([f"soup.inputs=[{delta},{delta}]", f"out={file}"], tmp_path, gym_env,
               app="gym_core.soup")
    assert_one_line_error(proc, f"out={file} is a file")
    assert file.read_text() == "mine"


def test_a_soup_into_a_read_only_place(run, tmp_path, gym_env):
    delta = run / "delta" / "bitdelta.safetensors"
    ro = tmp_path / "ro"
    ro.mkdir()
    got = subprocess.run(["mount", "--bind", str(ro), str(ro)], capture_output=True, text=True)
    if got.returncode != 0:
        pytest.skip(f"cannot mount here ({got.stderr.strip()}): needs root with CAP_SYS_ADMIN")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        proc = cli([f"soup.inputs=[{delta},{delta}]", f"out={ro}/soup"], tmp_path, gym_env,
                   app="gym_core.soup")
        assert_one_line_error(proc, f"cannot write out={ro}/soup", "Read-only file system")
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)


# ----------------------------------------------------------------------------------------
# run names and run directories
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "../../escaped", "a/b", ".."])
def test_a_run_name_is_one_folder_inside_run_root(tmp_path, gym_env, name):
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    proc = cli([*FAST, f"run.name='{name}'"], work, gym_env)
    assert_one_line_error(proc, "is not a folder name", "one path component")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["here", "work"]  # nothing made


def test_every_swept_run_name_is_checked(tmp_path, gym_env):
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    proc = cli([*FAST, "-m", "run.name=ok,../escaped"], work, gym_env)
    assert_one_line_error(proc, "'../escaped' is not a folder name")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["here", "work"]  # nothing made


def test_a_finished_run_without_its_checkpoints_is_not_trained_again(run, gym_env):
    shutil.rmtree(run / "checkpoints")
    before = tree(run)
    proc = cli([*TINY, "trainer.max_steps=2", "trainer.save_every=1", "quant=bitdelta",
                "run.name=r"], run.parents[1], gym_env)
    assert_one_line_error(proc, "runs/r is a finished run", "checkpoints/ are gone",
                          "another run.name", "model.init=runs/r")
    assert tree(run) == before  # final/ untouched


def test_a_damaged_checkpoint_is_not_resumed(run, gym_env):
    step, newest = list_checkpoints(run)[-1]
    weights = newest / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x10  # one bit of the tensor data, past the header
    weights.write_bytes(bytes(data))
    before = tree(run)
    proc = cli([*TINY, "trainer.max_steps=3", "trainer.save_every=1", "quant=bitdelta",
                "run.name=r"], run.parents[1], gym_env)
    assert_one_line_error(proc, f"checkpoint {newest} is damaged", WEIGHTS,
                          "Delete that directory")
    assert tree(run) == before  # run.json and .hydra/ too: checked before the start's record


@pytest.mark.parametrize("checksum", ["absent", "recomputed", "recomputed, no run.json"])
def test_a_damaged_tensor_name_is_called_damage_not_other_settings(run, gym_env, checksum):
    """A name in the checkpoint's header damaged where the checksum cannot tell (a
    checkpoint written before checksums, or one whose checksum was written again after the
    edit). The message names the file, the name it holds and the one it lacks, and what to
    do; with the run's record (run.json: same model and adapter) it blames the file, not
    the LoRA settings; without one it names both causes and both fixes."""
    import json

    from gym_core.train.checkpoint import INFO, file_sha256
    from gym_core.train.resume import RECORD

    step, newest = list_checkpoints(run)[-1]
    weights = newest / WEIGHTS
    data = weights.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    header = data[:header_end]
    key = next(k for k in json.loads(header[8:]) if "lora_A" in k)
    header = header.replace(key.encode(), key.replace("lora_A", "lora_Q").encode(), 1)
    weights.write_bytes(header + data[header_end:])
    info = json.loads((newest / INFO).read_text())
    if checksum == "absent":
        info.pop("sha256")
    else:
        info["sha256"][WEIGHTS] = file_sha256(weights)
    (newest / INFO).write_text(json.dumps(info))
    if checksum.endswith("no run.json"):
        (run / RECORD).unlink()
    before = tree(run)
    proc = cli([*TINY, "trainer.max_steps=3", "trainer.save_every=1", "quant=bitdelta",
                "run.name=r"], run.parents[1], gym_env)
    named = [str(weights), f"holds '{key.replace('lora_A', 'lora_Q')}'", f"lacks '{key}'"]
    if checksum.endswith("no run.json"):
        line = assert_one_line_error(proc, f"checkpoint {newest} does not fit this run",
                                     *named, "Either the file is damaged (delete that "
                                     "directory", "or it was written with another model")
    else:
        line = assert_one_line_error(proc, f"checkpoint {newest} is damaged", *named,
                                     "Delete that directory to resume from the one before")
        assert "written with another model" not in line
    assert line.count("\n") == 0 and len(line) < 700, line
    assert tree(run) == before  # nothing written: no checkpoint, not the start's record



def test_a_checkpoint_of_another_model_shape(run, tmp_path, gym_env):
    """Copied into a run of a wider model (no run.json to compare: a run from before it)."""
    other = tmp_path / "runs" / "wide"
    shutil.copytree(run / "checkpoints", other / "checkpoints")
    proc = cli([*TINY, "model.tiny.hidden_size=96", "model.tiny.intermediate_size=128",
                "trainer.max_steps=3", "run.name=wide"], tmp_path, gym_env)
    assert_one_line_error(proc, "checkpoint", "of shape", "another shape")


def test_checkpoints_that_is_a_file_and_a_lock_that_is_a_folder(run, gym_env):
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").write_text("not a folder")
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    proc = cli([*TINY, "trainer.max_steps=3", "run.name=r"], run.parents[1], gym_env)
    assert_one_line_error(proc, "runs/r/checkpoints is a file")
    (run / "checkpoints").unlink()
    (run / ".gym.lock").unlink()
    (run / ".gym.lock").mkdir()
    proc = cli([*TINY, "trainer.max_steps=3", "run.name=r"], run.parents[1], gym_env)
    assert_one_line_error(proc, ".gym.lock is a folder")


def test_a_disabled_plugins_options_get_one_message_and_leave_nothing(tmp_path, gym_env):
    """A reward (a value) and an algorithm (a config group) of disabled plugins."""
    env = {**gym_env, "GYM_DISABLE_PLUGINS": "digits,grpo"}
    reward = cli([*TINY, "algorithm=rloo", "run.name=r1"], tmp_path, env)
    line = assert_one_line_error(reward, "reward=digit_share is not loaded",
                                 "plugin 'digits'", "GYM_DISABLE_PLUGINS")
    algorithm = cli([*FAST, "algorithm=grpo", "run.name=r2"], tmp_path, env)
    other = assert_one_line_error(algorithm, "algorithm=grpo is not loaded",
                                  "plugin 'grpo'", "GYM_DISABLE_PLUGINS")
    # the same sentence: only the option (and the options listed) differ
    def reasons(text):
        return set(text.split(" is not loaded: ")[1].split(" (options: ")[0].split("; "))

    assert reasons(line) == reasons(other)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args,needle", [
    (["--port", "8000000"], "--port 8000000 is not a port number"),
    (["--max-num-seqs", "0"], "--max-num-seqs 0 must be at least 1"),
    (["--max-model-len", "1"], "--max-model-len 1 must be at least 2"),
    (["--max-body-bytes", "10"], "--max-body-bytes 10 is too small"),
])
def test_serve_with_a_port_out_of_range(tmp_path, gym_env, args, needle):
    proc = cli(["--base", "tiny", *args], tmp_path, gym_env, app="gym_core.serve")
    assert_one_line_error(proc, needle)
