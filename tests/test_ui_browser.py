"""`python -m gym_core.ui` driven in a real browser: Debian's headless Chromium through
Playwright, against the UI (and a `python -m gym_core.serve` with tiny-model variants)
on 127.0.0.1. Each test saves a screenshot in its temporary folder, and every request the
page makes must stay on this machine (every asset ships with the packages).

Bad input (a runs folder that does not exist, a half-written summary, a value of the
wrong type, a launch while the run is training, a removed variant) must give a message
in the page, leave the server running and change nothing on disk."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_ui import snapshot

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
FAST = ["model=tiny", "trainer.eval_size=8", "trainer.batch_size=2",
        "algorithm.num_generations=4", "algorithm.max_completion_length=8",
        "trainer.eval_max_new_tokens=8", "trainer.progress=false", "trainer.tensorboard=false"]


class Program:
    """A program on 127.0.0.1 that prints its address when it listens; output collected."""

    def __init__(self, args: list[str], cwd: Path, pattern: str, timeout: float = 300):
        env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
        env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self.url = None
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line)
                m = re.search(pattern, line)
                if m and self.url is None:
                    self.url = m.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(timeout) or self.url is None:
            self.stop()
            raise RuntimeError(f"{args} did not start:\n{self.output}")

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def start_ui(page, cwd: Path, runs: Path, serve_url: str = "http://127.0.0.1:9") -> Program:
    """The UI with the token it prints; ``page`` (if given) holds its cookie, as after a
    first visit to the printed address. ``ui.url`` is the address without the token."""
    ui = Program(["-m", "gym_core.ui", "--port", "0", "--runs", str(runs),
                  "--serve-url", serve_url], cwd, r"gym ui: (http://\S+)")
    printed = ui.url
    m = re.fullmatch(r"(http://[^/]+)/\?token=(\S+)", printed)
    assert m, f"the UI printed {printed!r}, not its address with ?token="
    ui.url, ui.token, ui.printed = m.group(1), m.group(2), printed
    if page is not None:
        port = ui.url.rsplit(":", 1)[1]
        page.context.add_cookies([{"name": f"gym_ui_token_{port}", "value": ui.token,
                                   "url": ui.url}])
    return ui


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)  # a fresh profile
        yield b
        b.close()


@pytest.fixture
def page(browser, tmp_path, request):
    """A page whose requests are recorded; the test's screenshot is saved at the end."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    pg.requests = []
    pg.on("request", lambda r: pg.requests.append(r.url))
    yield pg
    pg.screenshot(path=tmp_path / f"{request.node.name}.png", full_page=True)
    context.close()
    outside = [u for u in pg.requests if not re.match(r"(http|ws)://127\.0\.0\.1:\d+/", u)
               and not u.startswith("data:")]
    assert not outside, f"the page fetched from elsewhere: {outside}"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A folder with one finished tiny run (GRPO + BitDelta), made by the real CLI."""
    home = tmp_path_factory.mktemp("ui")
    out = subprocess.run([sys.executable, "-m", "gym_core", *FAST, "trainer.max_steps=3",
                          "quant=bitdelta", "run.name=done", f"run.root={home / 'runs'}"],
                         cwd=home, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    return home


def text_of(page, testid: str) -> str:
    return page.get_by_test_id(testid).inner_text().strip()


def wait_text(page, testid: str, pattern: str, timeout: float = 60) -> re.Match:
    """Wait until the element's text matches ``pattern``; the match."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        loc = page.get_by_test_id(testid)
        if loc.count():
            last = loc.first.inner_text()
            m = re.search(pattern, last)
            if m:
                return m
        time.sleep(0.25)
    raise AssertionError(f"{testid}: {pattern!r} never matched; last text {last!r}")


def pick(page, testid: str, option: str) -> None:
    """Choose ``option`` in a Quasar select."""
    page.get_by_test_id(testid).click()
    page.locator(".q-menu .q-item", has_text=re.compile(rf"^\s*{re.escape(option)}\s*$")).click()


# ----------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------


def test_runs_page_shows_a_finished_runs_numbers_and_curves(finished, page, tmp_path):
    runs = finished / "runs"
    summary = json.loads((runs / "done" / "summary.json").read_text())
    rows = (runs / "done" / "metrics.jsonl").read_text().splitlines()
    ui = start_ui(page, finished, runs)
    try:
        page.goto(ui.url)
        row = page.get_by_test_id("runs-table").locator("tr", has_text="done")
        row.wait_for()
        cells = [c.strip() for c in row.locator("td").all_inner_texts()]
        ev, q = summary["eval"], summary["quant_stats"]
        assert cells[:6] == ["done", "finished", "grpo", "bitdelta", "tiny-llama", "3"]
        assert cells[6:9] == [f"{ev['before']:.3f}", f"{ev['after']:.3f}",
                              f"{ev['after_quant']:.3f}"]
        assert cells[9] == f"{q['delta_bytes'] / 1000:.1f} KB"
        assert cells[10] == str(q["bits_per_weight"])
        page.screenshot(path=tmp_path / "runs.png")
        row.get_by_role("link", name="done").click()
        wait_text(page, "summary-status", "finished")
        assert text_of(page, "summary-after-quant") == f"{ev['after_quant']:.3f}"
        assert text_of(page, "summary-delta-size") == f"{q['delta_bytes'] / 1000:.1f} KB"
        wait_text(page, "curve-loss", rf"loss: {len(rows)} points")
        # the rollout buffer's last step as sample completions (2 prompts x 4 generations)
        wait_text(page, "samples-caption", r"step 3: 8 of 8 completions")
        assert page.get_by_test_id("samples-table").locator("tbody tr").count() == 8
    finally:
        assert ui.stop() == 0, ui.output


def test_sweeps_are_ranked_by_their_objective_with_curves_overlaid(finished, page, tmp_path):
    runs = tmp_path / "runs"
    for job, after in (("0", 0.25), ("1", 0.75), ("2", 0.5)):  # the real run's files, scored
        shutil.copytree(finished / "runs" / "done", runs / "sweep" / job)
        s = json.loads((runs / "sweep" / job / "summary.json").read_text())
        s["eval"]["after_quant"] = after
        s["overrides"] = [f"algorithm.lr={job}e-5", "model=tiny"]
        (runs / "sweep" / job / "summary.json").write_text(json.dumps(s))
    ui = start_ui(page, tmp_path, runs)
    try:
        page.goto(ui.url)
        page.get_by_test_id("sweeps-table").get_by_role("link", name="sweep").click()
        table = page.get_by_test_id("sweep-table")
        table.locator("tbody tr").nth(2).wait_for()
        ranked = [[c.strip() for c in r.locator("td").all_inner_texts()][:3]
                  for r in table.locator("tbody tr").all()]
        assert ranked == [["1", "1", "0.750"], ["2", "2", "0.500"], ["3", "0", "0.250"]]
        assert "algorithm.lr=1e-5" in table.locator("tbody tr").first.inner_text()
        # one curve per job on the chart, best first
        wait_text(page, "sweep-curves",
                  r"loss, one curve per job: job 1 \(3 points\), job 2 \(3 points\), "
                  r"job 0 \(3 points\)")
    finally:
        assert ui.stop() == 0, ui.output


def test_bad_runs_folders_give_a_message_and_change_nothing(finished, page, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(finished / "runs" / "done", runs / "done")
    shutil.copytree(finished / "runs" / "done", runs / "half")
    text = (runs / "half" / "summary.json").read_text()
    (runs / "half" / "summary.json").write_text(text[: len(text) // 2])  # half-written
    before = snapshot(tmp_path)
    ui = start_ui(page, tmp_path, runs)
    try:
        page.goto(ui.url)
        page.get_by_test_id("runs-table").locator("tr", has_text="half").wait_for()
        wait_text(page, "run-problem-half", r"half/summary.json: not valid JSON at line \d+")
        row = page.get_by_test_id("runs-table").locator("tr", has_text="half")
        assert "unreadable" in row.inner_text()
        assert "finished" in page.get_by_test_id("runs-table").locator(
            "tr", has_text="done").inner_text()
        page.get_by_role("link", name="half").click()
        wait_text(page, "run-error", "not valid JSON")
        page.goto(ui.url)
        page.get_by_test_id("runs-folder").fill(str(tmp_path / "no-such-folder"))
        page.get_by_test_id("runs-open").click()
        wait_text(page, "runs-error", r"runs folder '.*no-such-folder' does not exist")
        assert page.get_by_test_id("runs-table").locator("tbody tr", has_text="done").count() == 0
        page.goto(f"{ui.url}/run?root={tmp_path / 'elsewhere'}&name=x")
        wait_text(page, "run-error", "does not exist")
        assert ui.alive()
        page.goto(ui.url)  # the server still serves
        page.get_by_test_id("runs-table").locator("tr", has_text="done").wait_for()
    finally:
        assert ui.stop() == 0, ui.output
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "no-such-folder").exists() and not (tmp_path / "elsewhere").exists()


# ----------------------------------------------------------------------------------------
# New run
# ----------------------------------------------------------------------------------------


def fill_tiny_run(page, name: str, steps: int) -> None:
    """Pick the tiny model and DPO on the New run page and make the run small."""
    page.goto(page.ui_url + "/new")
    pick(page, "group-model", "tiny")
    wait_text(page, "new-command", "model=tiny")
    pick(page, "group-algorithm", "dpo")
    wait_text(page, "new-command", "algorithm=dpo")
    for key, value in {"trainer.max_steps": str(steps), "trainer.batch_size": "2",
                       "trainer.eval_size": "4", "trainer.eval_max_new_tokens": "4",
                       "trainer.save_every": "1", "algorithm.max_completion_length": "16",
                       "run.name": name}.items():
        page.get_by_test_id(f"field-{key}").fill(value)
    page.get_by_test_id("field-trainer.tensorboard").click()  # a switch: off


def test_launch_from_the_page_watch_the_curve_stop_and_resume(page, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    ui = start_ui(page, tmp_path, runs)
    page.ui_url = ui.url
    try:
        fill_tiny_run(page, "live", 20000)  # far more than the test waits for
        cmd = wait_text(page, "new-command", r"trainer\.tensorboard=false").string
        assert cmd.startswith("python -m gym_core model=tiny algorithm=dpo")
        assert f"run.root={runs}" in cmd and "run.name=live" in cmd
        wait_text(page, "new-yaml", r"max_steps: 20000")  # the YAML view follows the fields
        page.get_by_test_id("new-launch").click()
        page.wait_for_url(re.compile(r"/run\?"))
        wait_text(page, "run-job", r"job: training \(pid \d+\)")
        first = int(wait_text(page, "curve-loss", r"loss: (\d+) points", 300).group(1))
        later = int(wait_text(page, "curve-loss", rf"loss: (?!{first} )(\d+) points", 120).group(1))
        assert later > first >= 1
        steps = [json.loads(ln)["step"] for ln in (runs / "live" / "metrics.jsonl").read_text(
            ).splitlines()]
        assert steps[:later] == list(range(1, later + 1))
        page.screenshot(path=tmp_path / "live.png")

        # the same run.name again while it trains: refused in the page, nothing started
        page.goto(ui.url + "/new")
        page.get_by_test_id("field-run.name").fill("live")
        page.get_by_test_id("new-launch").click()
        wait_text(page, "new-error", r"run 'live' is already training \(process \d+")
        assert page.url.endswith("/new")

        page.goto(f"{ui.url}/run?root={runs}&name=live")
        page.get_by_test_id("run-stop").click()
        wait_text(page, "run-job", r"job: stopped", 120)
        ckpts = sorted((runs / "live" / "checkpoints").iterdir())
        assert ckpts, "a checkpoint is kept"
        stopped_at = int(ckpts[-1].name.split("-")[1])
        wait_text(page, "summary-status", rf"stopped at step {stopped_at}")
        assert not (runs / "live" / "summary.json").exists()

        page.get_by_test_id("run-resume").click()
        wait_text(page, "run-job", r"job: training", 60)
        resumed = int(wait_text(page, "curve-loss", r"loss: (\d+) points", 300).group(1))
        wait_text(page, "curve-loss", rf"loss: (?!{resumed} )(\d+) points", 300)
        log = wait_text(page, "run-job", r"job: training").string
        assert "training" in log
        page.get_by_test_id("run-stop").click()
        wait_text(page, "run-job", r"job: stopped", 120)
        rows = [json.loads(ln) for ln in (runs / "live" / "metrics.jsonl").read_text(
            ).splitlines()]
        # resumed from the checkpoint: the steps go on from there, none repeated or lost
        assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
        assert len(rows) > stopped_at
    finally:
        assert ui.stop() == 0, ui.output


def test_a_value_of_the_wrong_type_is_refused_before_launch(page, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    before = snapshot(tmp_path)
    ui = start_ui(page, tmp_path, runs)
    page.ui_url = ui.url
    try:
        fill_tiny_run(page, "typo", 2)
        page.get_by_test_id("field-trainer.max_steps").fill("ten")
        page.get_by_test_id("new-launch").click()
        wait_text(page, "new-error", r"trainer\.max_steps: 'ten' is not an integer")
        page.get_by_test_id("field-trainer.max_steps").fill("2")
        page.get_by_test_id("field-algorithm.beta").fill("[1,2]")
        page.get_by_test_id("new-launch").click()
        wait_text(page, "new-error", r"algorithm\.beta: '\[1,2\]' is not a number")
        assert page.url.endswith("/new") and ui.alive()
    finally:
        assert ui.stop() == 0, ui.output
    assert snapshot(tmp_path) == before


def test_a_run_another_process_trains_is_not_launched_again(page, tmp_path):
    """A run directory locked by a job started elsewhere (gym_core.runlock's flock): the
    page names the process and starts nothing."""
    runs = tmp_path / "runs"
    (runs / "busy").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)"),
        str(runs / "busy" / ".gym.lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    before = snapshot(tmp_path)
    ui = start_ui(page, tmp_path, runs)
    page.ui_url = ui.url
    try:
        fill_tiny_run(page, "busy", 2)
        page.get_by_test_id("new-launch").click()
        wait_text(page, "new-error", rf"in use by process {holder.pid}")
        assert page.url.endswith("/new")
    finally:
        assert ui.stop() == 0, ui.output
        holder.kill()
        holder.wait()
    assert snapshot(tmp_path) == before


def test_data_page_renders_rows_as_the_method_sees_them(page, tmp_path):
    ui = start_ui(page, tmp_path, tmp_path / "runs")
    try:
        page.goto(ui.url + "/data")
        pick(page, "data-model", "tiny")
        pick(page, "data-algorithm", "dpo")
        page.get_by_test_id("data-overrides").fill("data.system_prompt='Answer with a sum.'")
        page.get_by_test_id("data-show").click()
        wait_text(page, "data-info", r"data=arithmetic: 300 train rows; showing 0\.\.7")
        prompt = page.get_by_test_id("data-seq-0-prompt").inner_text()
        assert prompt.startswith("<|im_start|>system\nAnswer with a sum.<|im_end|>")
        assert re.search(r"\d+ \+ \d+ = \d+<\|im_end\|>",
                         page.get_by_test_id("data-seq-0-chosen").inner_text())
        page.get_by_test_id("data-seq-0-rejected").wait_for()
        pick(page, "data-option", "arithmetic_labels")  # unpaired rows cannot train DPO
        page.get_by_test_id("data-show").click()
        wait_text(page, "data-problem", "algorithm=dpo needs preference pairs")
        pick(page, "data-option", "jsonl")
        page.get_by_test_id("data-overrides").fill("")
        page.get_by_test_id("data-show").click()
        wait_text(page, "data-error", r"data=jsonl needs data\.train_file")
        assert ui.alive()
    finally:
        assert ui.stop() == 0, ui.output


# ----------------------------------------------------------------------------------------
# Playground and Variants (a real gym_core.serve with tiny-model variants)
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(finished):
    """Two BitDelta variants with random deltas (so they answer unlike the base), served
    by python -m gym_core.serve on the tiny base."""
    from tests.serve_helpers import make_run

    variants = finished / "variants"
    make_run(variants, "bd1", "bitdelta", 1)
    make_run(variants, "bd2", "bitdelta", 2)
    (finished / "to-serve").mkdir()  # where the Variants page's runs are (--variant-dirs)
    server = Program(["-m", "gym_core.serve", "--base", "tiny", "--port", "0", "--variants",
                      str(variants / "bd1"), str(variants / "bd2"), "--variant-dirs",
                      str(finished / "to-serve")], finished,
                     r"listening on (http://\S+)/v1", timeout=600)
    yield server
    assert server.stop() == 0, server.output


def api_chat(url: str, model: str, prompt: str, max_tokens: int) -> str:
    import httpx

    r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": prompt}],
        "temperature": 0, "max_tokens": max_tokens})
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def test_playground_chat_matches_the_api_and_a_removed_variant_is_a_message(
        finished, served, page, tmp_path):
    ui = start_ui(page, tmp_path, finished / "runs", served.url)
    variant_files = snapshot(finished / "variants")
    try:
        page.goto(ui.url + "/playground?models=tiny,bd1")
        wait_text(page, "play-models", "tiny, bd1")
        page.get_by_test_id("play-max-tokens").fill("12")
        page.get_by_test_id("play-prompt").fill("What is 2 + 3?")
        page.get_by_test_id("play-send").click()
        got = {m: page.get_by_test_id(f"answer-{m}-1-done").text_content() for m in ("tiny", "bd1")}
        want = {m: api_chat(served.url, m, "What is 2 + 3?", 12) for m in ("tiny", "bd1")}
        assert got == want
        assert got["bd1"] != got["tiny"]  # the variant is not the base
        page.screenshot(path=tmp_path / "playground.png")

        # remove bd1 on the Variants page, then ask it again
        page.goto(ui.url + "/variants")
        page.get_by_test_id("remove-bd1").click()
        page.get_by_test_id("served-bd1").wait_for(state="detached")
        page.get_by_test_id("served-bd2").wait_for()
        page.goto(ui.url + "/playground")
        wait_text(page, "play-models", "tiny")
        page.get_by_test_id("play-models").click()
        page.locator(".q-menu .q-item", has_text="bd2").wait_for()
        assert page.locator(".q-menu .q-item", has_text="bd1").count() == 0
    finally:
        assert ui.stop() == 0, ui.output
    assert snapshot(finished / "variants") == variant_files


def test_a_playground_request_for_a_removed_variant_is_a_message(finished, served, page,
                                                                 tmp_path):
    import httpx

    ui = start_ui(page, tmp_path, finished / "runs", served.url)
    before = snapshot(finished)
    try:
        page.goto(ui.url + "/playground?models=tiny,bd2")
        wait_text(page, "play-models", "tiny, bd2")
        r = httpx.delete(f"{served.url}/v1/variants/bd2", timeout=30)  # removed meanwhile
        assert r.status_code == 200
        page.get_by_test_id("play-max-tokens").fill("4")
        page.get_by_test_id("play-prompt").fill("hello")
        page.get_by_test_id("play-send").click()
        wait_text(page, "play-error", r"bd2: The model `bd2` does not exist")
        wait_text(page, "answer-bd2-1", r"error: The model `bd2` does not exist")
        page.get_by_test_id("answer-tiny-1-done").wait_for()  # the base still answered
        assert httpx.get(f"{served.url}/health", timeout=10).json()["status"] == "ok"
        assert ui.alive()
    finally:
        assert ui.stop() == 0, ui.output
    assert snapshot(finished) == before


def test_variants_page_exports_a_run_and_serves_it(finished, served, page, tmp_path):
    import httpx

    runs = finished / "to-serve" / tmp_path.name  # inside the server's --variant-dirs
    shutil.copytree(finished / "runs" / "done", runs / "done")
    ui = start_ui(page, tmp_path, runs, served.url)
    try:
        page.goto(ui.url + "/variants")
        page.get_by_test_id("var-run-done").wait_for()
        pick(page, "export-format-done", "delta")
        page.get_by_test_id("export-done").click()
        out = wait_text(page, "var-output", r"wrote (\S+)", 300)
        written = Path(out.group(1))
        written = written if written.is_absolute() else tmp_path / written
        assert written.is_file()
        page.get_by_test_id("serve-name-done").fill("mine")
        page.get_by_test_id("serve-done").click()
        page.get_by_test_id("served-mine").wait_for()
        assert "bitdelta" in text_of(page, "served-mine")
        models = [m["id"] for m in httpx.get(f"{served.url}/v1/models", timeout=10).json()["data"]]
        assert "mine" in models
        # the same name again: the server refuses, the page says so
        page.get_by_test_id("serve-name-done").fill("mine")
        page.get_by_test_id("serve-done").click()
        wait_text(page, "var-error", "already being served")
        httpx.delete(f"{served.url}/v1/variants/mine", timeout=30)
    finally:
        assert ui.stop() == 0, ui.output
