"""The web UI's logic without a browser: what the Runs page reads from a runs folder
(and never writes), how metrics are followed while a run trains, the New run page's form
built from the installed plugins' schemas and its overrides, the launcher's refusals,
and that the CLI never imports the UI library. The pages themselves are driven in a real
browser in tests/test_ui_browser.py."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from gym_core.base.errors import GymError
from gym_core.ui import configs
from gym_core.ui.launcher import Launcher
from gym_core.ui.runs import MetricsTail, lock_holder, metric_names, scan
from tests.conftest import REPO


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``root`` with its mode and bytes: 'nothing on disk changed'."""
    return {str(p.relative_to(root)): (p.stat().st_mode, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()} | \
        {str(p.relative_to(root)) + "/": (p.stat().st_mode, b"")
         for p in sorted(root.rglob("*")) if p.is_dir()}


def write_run(root: Path, name: str, *, after: float | None, steps: int = 3,
              summary: str | None = None) -> Path:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(
        "model:\n  source: tiny\nalgorithm:\n  name: dpo\nquant:\n  name: bitdelta\n")
    rows = [{"step": s, "loss": 1.0 / s, "tokens_per_second": 10.0 * s} for s in range(1, steps + 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary is None and after is not None:
        summary = json.dumps({
            "algorithm": "dpo", "quant": "bitdelta", "model": "tiny-llama", "steps": steps,
            "eval": {"metric": "accuracy", "before": 0.25, "after": after, "after_quant": None},
            "quant_stats": {"delta_bytes": 12888, "bits_per_weight": 1.0061},
            "overrides": [f"algorithm.lr={after}", "model=tiny"]})
    if summary is not None:
        (run / "summary.json").write_text(summary)
    return run


def test_scan_lists_runs_and_sweeps_and_reports_a_half_written_summary(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "good", after=0.5)
    bad = write_run(root, "half", after=None, summary='{"algorithm": "dpo", "eval": {"bef')
    (bad / "checkpoints" / "step-000002").mkdir(parents=True)
    for job, after in (("0", 0.25), ("1", 0.75), ("2", None)):
        write_run(root / "sweep", job, after=after)
    before = snapshot(root)

    runs, sweeps = scan(root)
    by_name = {r.name: r for r in runs}
    assert set(by_name) == {"good", "half"}
    row = by_name["good"].row()
    assert (row["status"], row["algorithm"], row["quant"], row["steps"]) == \
        ("finished", "dpo", "bitdelta", 3)
    assert (row["before"], row["after"], row["after_quant"], row["delta"], row["bits"]) == \
        ("0.250", "0.500", "", "12.9 KB", 1.0061)
    half = by_name["half"]
    assert half.summary is None and half.status == "unreadable"
    assert "summary.json: not valid JSON at line 1 column" in half.error
    assert "half-written or damaged" in half.error
    assert half.checkpoints == [2] and half.algorithm == "dpo"  # read from .hydra
    (sweep,) = sweeps
    assert [j.path.name for j in sweep.ranked()] == ["1", "0", "2"]  # best first, unscored last
    assert snapshot(root) == before


def test_a_missing_runs_folder_is_a_message_and_is_not_created(tmp_path):
    with pytest.raises(GymError, match=r"runs folder '.*missing' does not exist"):
        scan(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(GymError, match="is a file, not a folder"):
        scan(tmp_path / "file")


def test_metrics_tail_follows_a_growing_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert tail.read() == ([], False)  # not there yet
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')  # a line being written
    assert tail.read() == ([{"step": 1, "loss": 0.5}], False)
    with path.open("a") as fh:
        fh.write('ss": 0.25, "kl": 0.1}\n')
    assert tail.read() == ([{"step": 2, "loss": 0.25, "kl": 0.1}], False)
    assert tail.read() == ([], False)
    # a resumed run rewrites the file (atomically: a new inode) without rows past its step
    tmp = tmp_path / "new"
    tmp.write_text('{"step": 1, "loss": 0.5}\n')
    os.replace(tmp, path)
    assert tail.read() == ([{"step": 1, "loss": 0.5}], True)
    assert metric_names([{"step": 1, "kl": 0.1, "loss": 0.5, "zeta": 1, "flag": True,
                          "note": "x"}]) == ["loss", "kl", "zeta"]


def test_form_fields_come_from_the_schemas_and_plugin_groups_follow_the_option():
    base = configs.compose([])
    assert "experience_store" not in base.choices  # cl_grpo's family: only with cl_grpo
    cl = configs.compose(["algorithm=cl_grpo"])
    assert cl.choices["experience_store"] == "json" and cl.choices["llm"] == "local"
    cards = configs.sections(cl)
    assert [c for c, _ in cards[:6]] == configs.CORE_ORDER
    # cl_grpo's groups, and the sections of fields without options
    assert {c for c, _ in cards[6:]} == {"experience_store", "llm", "policy", "logger", "ray",
                                         "rollout"}
    assert [c for c, is_group in cards if not is_group] == ["run", "logger", "ray", "rollout"]
    fields = {f.key: f for g, _ in cards for f in configs.fields(cl.cfg, g, cl.choices.get(g))}
    assert "algorithm.name" not in fields and "model.source" not in fields  # the option itself
    assert (fields["algorithm.lessons_per_group"].kind, fields["algorithm.lessons_per_group"].default
            ) == ("int", 2)
    assert fields["trainer.eval_size"].optional and fields["trainer.eval_size"].kind == "int"
    assert fields["trainer.progress"].kind == "bool"
    assert fields["algorithm.rewards"].kind == "list"
    assert fields["llm.temperature"].kind == "float"
    assert fields["run.name"].computed and fields["run.name"].default_text == ""
    openai = configs.compose(["algorithm=cl_grpo", "llm=openai"])
    model = {f.key: f for f in configs.fields(openai.cfg, "llm", "openai")}["llm.model"]
    assert model.required and configs.check_value(model, "") == "llm.model needs a value"


def test_values_are_checked_and_become_overrides_hydra_reads_back():
    cfg = configs.compose(["model=tiny"]).cfg
    fields = {f.key: f for g in ("data", "trainer", "algorithm")
              for f in configs.fields(cfg, g)}
    steps = fields["trainer.max_steps"]
    assert configs.check_value(steps, "abc") == "trainer.max_steps: 'abc' is not an integer"
    assert configs.check_value(steps, "12") is None
    assert configs.check_value(fields["trainer.eval_size"], "null") is None
    assert "cannot be null" in configs.check_value(steps, "null")
    assert configs.check_value(fields["algorithm.lr"], "fast") == \
        "algorithm.lr: 'fast' is not a number"
    values = {"trainer.max_steps": "12", "data.system_prompt": "Be brief, it's = fine [ok]",
              "algorithm.rewards": "[accuracy]", "trainer.progress": "false",
              "trainer.eval_size": "null", "algorithm.lr": "5e-05"}
    selected = {"model": "tiny", "algorithm": "dpo"}
    overrides = configs.build_overrides(selected, {"model": "smollm2", "algorithm": "dpo"},
                                        values, fields)
    # unchanged values and the default choice are left out; the rest round-trips
    assert overrides[0] == "model=tiny" and not any(o.startswith("algorithm=") for o in overrides)
    assert "trainer.eval_size=null" not in overrides  # null is already its default
    got = configs.compose(overrides).cfg
    assert got.data.system_prompt == "Be brief, it's = fine [ok]"
    assert got.trainer.max_steps == 12 and got.trainer.progress is False
    assert configs.command(overrides).startswith("python -m gym_core model=tiny")
    # what the form cannot catch, composition does, with gym's one-line message
    with pytest.raises(GymError, match="max_steps"):
        configs.checked(["trainer.max_steps=many"])


def test_a_third_party_plugins_options_appear_in_the_form(tmp_path):
    from gym_core.plugin.startup import bootstrap

    eps = [*metadata.entry_points(group="gym_core"),
           metadata.EntryPoint("digits", "tests.digits_plugin", "gym_core")]
    bootstrap(entry_points=eps)
    try:
        options = configs.groups()
        plugins = bootstrap()
        added = plugins.options("digits")
        assert added, "the test plugin registers options"
        for family, names in added.items():
            if plugins.families[family].config_group:
                assert set(names) <= set(options[family])
    finally:
        bootstrap(reload=True)


def test_the_launcher_refuses_a_run_directory_another_process_holds(tmp_path):
    run = tmp_path / "runs" / "busy"
    run.mkdir(parents=True)
    lock = run / ".gym.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"),
        str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert lock_holder(run) == holder.pid
        before = snapshot(tmp_path)
        launcher = Launcher(cwd=tmp_path)
        with pytest.raises(GymError, match=f"in use by process {holder.pid}"):
            launcher.launch(["model=tiny", "run.name=busy"], Path("runs/busy"))
        assert launcher.jobs == {} and snapshot(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()
    assert lock_holder(run) is None  # the kernel dropped the lock with its holder
    fd = os.open(lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again
    os.close(fd)


def test_the_cli_does_not_import_the_ui_library(tmp_path):
    code = ("import runpy, sys; sys.argv = ['gym_core', '--help']; "
            "import contextlib, io\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: runpy.run_module('gym_core', run_name='__main__')\n"
            "    except SystemExit: pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('nicegui', 'httpx', 'fastapi', 'gym_core')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    loaded = out.stdout.strip().splitlines()[-1]
    assert "nicegui" not in loaded and "fastapi" not in loaded and "gym_core.ui" not in loaded


def test_ui_help_and_a_missing_library_message():
    out = subprocess.run([sys.executable, "-m", "gym_core.ui", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--serve-url" in out.stdout and "--runs" in out.stdout
    out = subprocess.run([sys.executable, "-m", "gym_core.ui", "--port", "70000"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "gym: error: --port 70000 is not a port number (0..65535; 0 picks a free one)"]
    # other machines may reach it: its token stays on
    out = subprocess.run([sys.executable, "-m", "gym_core.ui", "--host", "0.0.0.0", "--token",
                          ""], capture_output=True, text=True, timeout=60)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith("gym: error: --host 0.0.0.0") and "token" in lines[0]


def test_resume_reuses_the_recorded_overrides(tmp_path):
    from gym_core.ui.runs import read_run, resume_overrides

    run = write_run(tmp_path / "runs", "r", after=None)
    OmegaConf.save(OmegaConf.create(["model=tiny", "run.name=r", "trainer.max_steps=9"]),
                   run / ".hydra" / "overrides.yaml")
    got = resume_overrides(read_run(run, tmp_path / "runs"))
    assert got == ["model=tiny", "trainer.max_steps=9", f"run.root={tmp_path / 'runs'}",
                   "run.name=r"]


def test_data_view_shows_what_each_method_trains_on():
    from gym_core.data.tasks import render_completion, render_prompts
    from gym_core.model.policy import tiny_tokenizer
    from gym_core.ui.data_view import view

    tok = tiny_tokenizer()
    online = view(["model=tiny", "algorithm=grpo", "data.system_prompt=Be brief."], "test", 3, 2)
    assert online.online and online.total == 100 and [r.index for r in online.rows] == [3, 4]
    row = online.rows[0]
    (prompt,) = row.sequences
    assert prompt.text == render_prompts(tok, [row.source["prompt"]], "Be brief.")[0]
    assert prompt.text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert row.target == row.source["answer"] and "accuracy" in online.reads

    dpo = view(["model=tiny", "algorithm=dpo"], "train", 0, 3)
    assert not dpo.online and dpo.problem is None
    for row in dpo.rows:
        labels = [s.label for s in row.sequences]
        assert labels == ["prompt", "chosen", "rejected"]
        for seq in row.sequences[1:]:
            want = render_completion(tok, row.source["prompt"], row.source[seq.label], None)
            assert seq.text == want and not seq.cut  # byte tokens: the text itself
    # a length limit that cuts both answers to the same tokens is plain to see
    cut = view(["model=tiny", "algorithm=dpo", "algorithm.max_completion_length=8"], "train", 0, 1)
    chosen, rejected = cut.rows[0].sequences[1:]
    assert chosen.cut and rejected.cut and chosen.tokens == rejected.tokens == 8
    assert chosen.text == rejected.text == cut.rows[0].source["chosen"][:8]

    kto = view(["model=tiny", "algorithm=kto", "data=arithmetic_labels"], "train", 0, 4)
    assert {s.label for r in kto.rows for s in r.sequences[1:]} <= {
        "completion (desirable)", "completion (undesirable)"}
    wrong = view(["model=tiny", "algorithm=dpo", "data=arithmetic_labels"], "train", 0, 2)
    assert wrong.problem.startswith("algorithm=dpo needs preference pairs")
    with pytest.raises(GymError, match=r"data=jsonl needs data\.train_file"):
        view(["model=tiny", "data=jsonl"])


def ws_handshake(url: str, cookie: str | None = None) -> str:
    """The first line of the answer to a websocket handshake on NiceGUI's socket.io."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as sock:
        sock.sendall((f"GET /_nicegui_ws/socket.io/?EIO=4&transport=websocket HTTP/1.1\r\n"
                      f"Host: {u.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      "Sec-WebSocket-Version: 13\r\n"
                      + (f"Cookie: {cookie}\r\n" if cookie else "") + "\r\n").encode())
        return sock.recv(4096).decode("latin-1").split("\r\n")[0]


def test_every_page_asset_and_websocket_needs_the_token(tmp_path):
    """The UI launches processes: without its token a page, an asset and the websocket
    are refused, whatever the page; the printed address (?token=) sets an HttpOnly,
    SameSite=Strict cookie and drops the token from the address; then pages open. (The
    browser tests log in with that cookie: tests/test_ui_browser.py start_ui.)"""
    import httpx

    from tests.test_ui_browser import start_ui

    runs = tmp_path / "runs"
    write_run(runs, "secret-run", after=0.5)
    ui = start_ui(None, tmp_path, runs)
    try:
        cookie_name = f"gym_ui_token_{ui.url.rsplit(':', 1)[1]}"
        for path in ("/", "/new", "/variants", f"/run?root={runs}&name=secret-run",
                     "/_nicegui_ws/socket.io/?EIO=4&transport=polling"):
            for token in (None, "not-it"):
                r = httpx.get(ui.url + path, timeout=30,
                              params={"token": token} if token else None)
                assert r.status_code == 401 and "needs the UI's token" in r.text, (path, token)
                assert "secret-run" not in r.text
        assert not ws_handshake(ui.url).startswith("HTTP/1.1 101")
        assert not ws_handshake(ui.url, f"{cookie_name}=not-it").startswith("HTTP/1.1 101")
        assert ws_handshake(ui.url, f"{cookie_name}={ui.token}").startswith("HTTP/1.1 101")
        # the printed address: a cookie, and the same page without the token
        first = httpx.get(ui.printed, timeout=30)
        assert first.status_code == 303 and first.headers["location"] == "/"
        set_cookie = first.headers["set-cookie"]
        assert set_cookie.startswith(f"{cookie_name}={ui.token};")
        assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
        with httpx.Client(cookies={cookie_name: ui.token}, timeout=30) as browser:
            page = browser.get(ui.url + f"/run?root={runs}&name=secret-run")
            assert page.status_code == 200 and "<title>" in page.text
        # a script may send it as a header
        assert httpx.get(ui.url + "/", timeout=30, headers={
            "Authorization": f"Bearer {ui.token}"}).status_code == 200
    finally:
        assert ui.stop() == 0, ui.output



def write_rollouts(run: Path, step: int, n: int = 3) -> None:
    from gym_core.sampling.buffer import RolloutBuffer

    RolloutBuffer(run).write(step, [{
        "step": step, "policy_version": step - 2, "staleness": 1, "group": 0,
        "prompt": f"what is {step}+{i}?", "completion": f"answer-{step}-{i}",
        "completion_ids": [1, 2], "behaviour_logprobs": [-0.5, -1.5],
        "reward": float(i), "truncated": False, "answer": str(step + i)} for i in range(n)])


def test_run_page_shows_sample_completions_of_a_step_from_the_rollout_buffer(tmp_path):
    """The run page's Samples: the last step by default, another by ?step=; a step with no
    file, a damaged file and a run outside the runs folder are messages in the page."""
    import httpx

    from gym_core.ui.runs import read_samples
    from tests.test_ui_browser import start_ui

    runs = tmp_path / "runs"
    run = write_run(runs, "r", after=0.5)
    for step in (1, 2):
        write_rollouts(run, step)
    got = read_samples(run, limit=2)
    assert (got.step, got.total, [r["completion"] for r in got.rows]) == \
        (2, 3, ["answer-2-0", "answer-2-1"])
    assert got.rows[1] | {"prompt": None} == {
        "prompt": None, "completion": "answer-2-1", "reward": 1.0, "tokens": 2,
        "logp_sum": -2.0, "logp_mean": -1.0, "staleness": 1, "policy_version": 0}
    outside = write_run(tmp_path, "outside", after=0.5)
    write_rollouts(outside, 1)
    (runs / "link").symlink_to(outside)
    before = snapshot(tmp_path)
    ui = start_ui(None, tmp_path, runs)
    try:
        cookie = {f"gym_ui_token_{ui.url.rsplit(':', 1)[1]}": ui.token}
        with httpx.Client(cookies=cookie, timeout=60) as browser:
            def page(**params) -> str:
                r = browser.get(ui.url + "/run", params={"root": str(runs), **params})
                assert r.status_code == 200, r.text
                return r.text

            last = page(name="r")
            assert "step 2: 3 of 3 completions" in last and "answer-2-2" in last
            assert "answer-1-0" not in last
            first = page(name="r", step="1")
            assert "answer-1-0" in first and "answer-2-0" not in first
            missing = page(name="r", step="9")
            assert "step 9 has no rollouts in" in missing and "recorded steps: 1-2" in missing
            assert "answer-" not in missing
            assert "is not a step number" in page(name="r", step="x")
            for escape in ("../outside", "link", str(outside)):
                text = page(name=escape)
                assert "there is no run" in text and "answer-1-0" not in text, escape
            (run / "rollouts" / "step-000003.parquet").write_bytes(b"PAR1 half a file")
            damaged = page(name="r")
            assert "step-000003.parquet is not a readable Parquet file" in damaged
            assert "answer-2-0" in page(name="r", step="2")  # the rest stays readable
        assert ui.alive()
    finally:
        assert ui.stop() == 0, ui.output
    (run / "rollouts" / "step-000003.parquet").unlink()
    assert snapshot(tmp_path) == before
