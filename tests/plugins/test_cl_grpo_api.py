"""Training-free GRPO the paper's way (docs/algorithms.md §8.4-8.5): an OpenAI-compatible
endpoint as the policy and as the lesson LLM, usage and budget, structured replies, and
the paper's options. The real path runs against ``python -m gym_core.serve`` serving the
tiny model and a LoRA variant of it; the error cases against a scripted fake endpoint."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

import gym_core.train.job as run_mod
from gym_cl_grpo import prompts
from gym_cl_grpo.experience import Experience, labels
from gym_cl_grpo.math import aime_task
from gym_cl_grpo.replies import parse_operations
from gym_core.base.errors import GymError
from tests.conftest import REPO, compose
from tests.plugins.fake_chat_server import FakeChatServer
from tests.serve_helpers import ServerProcess, make_run

KEY = "sk-gym-test-9f8e7d"  # the served endpoint's key: must never be written anywhere
SHOWN = labels([Experience(1, "When adding, carry the ten."), Experience(4, "Check units.")])


# ---------------------------------------------------------------------------------------
# gym_core.serve as the endpoint: the tiny model and a LoRA variant, behind a key
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("api") / "runs"
    make_run(root, "teacher", "lora", 3)
    old = os.environ.get("GYM_SERVE_API_KEY")
    os.environ["GYM_SERVE_API_KEY"] = KEY  # the server reads it; never on a command line
    try:
        srv = ServerProcess(["--base", "tiny", "--variants", str(root)],
                            cwd=tmp_path_factory.mktemp("cwd"))
    finally:
        if old is None:
            os.environ.pop("GYM_SERVE_API_KEY")
        else:
            os.environ["GYM_SERVE_API_KEY"] = old
    assert srv.url, srv.output
    yield srv
    assert srv.stop() == 0, srv.output


def post(url, body, key=KEY):
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json",
                                                         "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def test_served_replies_follow_their_schema_across_seeds_and_temperatures(served):
    ops = prompts.operations_schema(SHOWN, 3, max_chars=16)
    lessons = prompts.lessons_schema(2, max_chars=16)
    messages = [{"role": "user", "content": "Update the library."}]
    for schema in (ops, lessons):
        for temperature in (0.0, 0.8, 1.5):
            for seed in range(2):
                status, r = post(served.url, {
                    "model": "teacher", "messages": messages, "max_tokens": 400,
                    "temperature": temperature, "seed": seed,
                    "response_format": {"type": "json_schema", "json_schema": {
                        "name": schema["title"], "schema": schema, "strict": True}}})
                assert status == 200, r
                text = r["choices"][0]["message"]["content"]
                assert r["choices"][0]["finish_reason"] == "stop", text
                jsonschema.validate(json.loads(text), schema)
    # json_object: any JSON object, unbounded, so a random model may run out of tokens
    # first ("length"); what it finished is an object
    ended = 0
    for seed in range(4):
        status, r = post(served.url, {"model": "tiny", "messages": messages, "max_tokens": 200,
                                      "temperature": 1.0, "seed": seed,
                                      "response_format": {"type": "json_object"}})
        choice = r["choices"][0]
        assert status == 200 and choice["message"]["content"].startswith("{")
        if choice["finish_reason"] == "stop":
            ended += 1
            assert isinstance(json.loads(choice["message"]["content"]), dict)
    assert ended, "no json_object reply ended within 200 tokens"
    # free text without response_format is not JSON (the constraint did the work)
    status, r = post(served.url, {"model": "teacher", "messages": messages, "max_tokens": 30,
                                  "temperature": 1.0, "seed": 0})
    with pytest.raises(ValueError):
        json.loads(r["choices"][0]["message"]["content"])


def test_a_bad_schema_and_a_bad_key_get_clear_errors(served):
    status, r = post(served.url, {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                  "response_format": {"type": "json_schema", "json_schema": {
                                      "name": "x", "schema": {"type": "nonsense"}}}})
    assert status == 400 and r["error"]["param"] == "response_format"
    status, r = post(served.url, {"model": "tiny", "messages": [{"role": "user", "content": "x"}]},
                     key="wrong")
    assert status == 401


def test_the_sampler_constrains_each_row(tiny_overrides):
    """gym's own sampler (llm=local): constrained rows follow the schema, at any
    temperature and seed."""
    import torch

    from gym_core.model.policy import load_policy
    from gym_core.sampling.generation import Sampling, sample
    from gym_core.sampling.structured import json_masks

    policy = load_policy(compose(tiny_overrides).model, torch.device("cpu"))
    schema = prompts.operations_schema(SHOWN, 2, max_chars=12)
    convs = [[{"role": "user", "content": f"q{i}"}] for i in range(4)]
    for temperature, seed in ((0.7, 0), (1.5, 1)):
        torch.manual_seed(seed)
        out = sample(policy.model, policy.tokenizer, convs, system_prompt=None,
                     max_new_tokens=300, sampling=Sampling(True, temperature),
                     logits_mask=json_masks(policy.tokenizer, schema, len(convs)))
        assert not out.truncated.any()
        for text in out.texts:  # valid operations, by construction
            ops = parse_operations(text, SHOWN, max_words=32)
            jsonschema.validate(json.loads(text), schema)
            assert ops is not None and ops[1] == 0 and ops[0], text


# ---------------------------------------------------------------------------------------
# whole runs against gym_core.serve
# ---------------------------------------------------------------------------------------


SHORT = {  # the tiny model's context is 1024 byte-level tokens: terse stage templates
    "summary.txt": "Summarize.{groundtruth}\nQ: {problem}\nA: {trajectory}\n{grade}",
    "group_comparison.txt": "Up to {max_lessons} lessons.{groundtruth}\n{problem}\n{attempts}",
    "batch_update.txt": "Library:\n{library}\nNew:\n{lessons}\nAt most {max_operations} ops.",
}


@pytest.fixture
def api_overrides(tiny_overrides, served, monkeypatch, tmp_path):
    monkeypatch.setenv("GYM_TEST_KEY", KEY)
    url = f"{served.url}/v1"
    (tmp_path / "short").mkdir()
    for name, text in SHORT.items():
        (tmp_path / "short" / name).write_text(text)
    return [*tiny_overrides, "algorithm=cl_grpo", "algorithm.num_generations=4",
            "algorithm.max_completion_length=8", "algorithm.rewards=[digit_share]",
            "trainer.eval_size=4", "experience_store=json", f"algorithm.prompts_dir={tmp_path}/short",
            "algorithm.max_experience_words=2", "algorithm.max_operations=1",
            "algorithm.lessons_per_group=1", "algorithm.summary_max_new_tokens=40",
            "policy=api", f"policy.base_url={url}", "policy.model=tiny",
            "policy.api_key_env=GYM_TEST_KEY", "policy.input_price=0.5",
            "policy.output_price=2", "llm=openai", f"llm.base_url={url}", "llm.model=teacher",
            "llm.api_key_env=GYM_TEST_KEY", "llm.max_new_tokens=150", "llm.input_price=1",
            "llm.output_price=4"]


def rows_of(run: Path):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_api_policy_and_structured_lessons_against_gym_serve(tmp_path, api_overrides,
                                                             with_digit_reward, capfd):
    run = tmp_path / "run"
    summary = run_mod.run_job(compose([*api_overrides, "trainer.max_steps=2"]), run_dir=run)
    rows = rows_of(run)
    usage = json.loads((run / "api_usage.json").read_text())
    # every step records its calls, tokens, cost and latency
    for r in rows:
        assert r["api_calls"] >= 2 * 4  # the rollouts: G requests per question
        assert r["api_input_tokens"] > 0 and r["api_output_tokens"] > 0
        assert r["api_seconds"] > 0 and r["api_cost"] > 0
    # the cost is the endpoints' token counts at their prices
    by = usage["by_endpoint"]
    cost = sum(by[e]["input_tokens"] * pin / 1e6 + by[e]["output_tokens"] * pout / 1e6
               for e, (pin, pout) in {"policy": (0.5, 2), "llm": (1, 4)}.items() if e in by)
    assert usage["total"]["cost"] == pytest.approx(cost)
    stats = summary["algorithm_stats"]
    assert stats["api_cost_usd"] == pytest.approx(cost, abs=1e-6)
    # the held-out answers came from the endpoint too: more policy calls than rollouts
    rollout_calls = 2 * 2 * 4
    assert by["policy"]["calls"] == rollout_calls + 2 * 4  # + eval before and after
    assert summary["eval"]["before"] is not None and summary["eval"]["after"] is not None
    # the lesson LLM (the served LoRA variant) answered under the schema: every lesson and
    # operation reply parsed, whatever the random model wrote
    assert sum(r["groups_contrasted"] for r in rows) > 0, rows
    assert sum(r["lesson_replies_unparsed"] + r["op_replies_unparsed"] for r in rows) == 0
    assert sum(r["lessons"] for r in rows) > 0
    # the key is nowhere: run files, config record, output
    out = capfd.readouterr()
    assert KEY not in out.out + out.err
    for path in run.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_the_same_endpoint_reflects_with_llm_policy(tmp_path, api_overrides, with_digit_reward):
    over = [o for o in api_overrides if not o.startswith("llm.")]
    over = [o for o in over if o != "llm=openai"] + ["llm=policy", "llm.max_new_tokens=150"]
    run = tmp_path / "run"
    run_mod.run_job(compose([*over, "trainer.max_steps=1", "trainer.eval_before=false"]),
                    run_dir=run)
    by = json.loads((run / "api_usage.json").read_text())["by_endpoint"]
    assert set(by) == {"policy"}  # one endpoint acted and reflected
    row = rows_of(run)[0]
    assert row["llm_calls"] > 0 and by["policy"]["calls"] == 2 * 4 + row["llm_calls"] + 4


def test_the_tfgrpo_api_recipe_against_gym_serve(tmp_path, tiny_overrides, served, monkeypatch,
                                                 with_digit_reward):
    """``gym train +recipe=tfgrpo_api`` (conf/recipe/tfgrpo_api.yaml) with the endpoint,
    model and key variable a user gives: the served model acts and reflects under the
    operations schema, the library fills, the budget and usage are on record."""
    monkeypatch.setenv("GYM_TEST_KEY", KEY)
    (tmp_path / "short").mkdir()
    for name, text in SHORT.items():
        (tmp_path / "short" / name).write_text(text)
    cfg = compose(["+recipe=tfgrpo_api", *tiny_overrides, f"policy.base_url={served.url}/v1",
                   "policy.model=tiny", "policy.api_key_env=GYM_TEST_KEY",
                   "policy.input_price=0.5", "policy.output_price=2",
                   "algorithm.num_generations=4", "algorithm.max_completion_length=8",
                   "algorithm.rewards=[digit_share]", "algorithm.max_experience_words=2",
                   "algorithm.lessons_per_group=1", "algorithm.summary_max_new_tokens=40",
                   f"algorithm.prompts_dir={tmp_path}/short", "llm.max_new_tokens=150",
                   "algorithm.max_operations=1",  # one operation fits in 150 byte tokens
                   "trainer.eval_size=4", "trainer.max_steps=2", "trainer.eval_before=false"])
    assert (cfg.algorithm.name, cfg.policy.name, cfg.llm.name) == ("cl_grpo", "api", "policy")
    assert cfg.llm.structured and cfg.trainer.save_every == 1
    run = tmp_path / "run"
    summary = run_mod.run_job(cfg, run_dir=run)
    by = json.loads((run / "api_usage.json").read_text())["by_endpoint"]
    assert set(by) == {"policy"}  # one endpoint acted and reflected, as in the paper
    rows = rows_of(run)
    assert sum(r["llm_calls"] for r in rows) > 0
    assert sum(r["groups_contrasted"] for r in rows) > 0, rows
    assert sum(r["lesson_replies_unparsed"] + r["op_replies_unparsed"] for r in rows) == 0
    # every operation reply follows the schema of the library it was shown, and the
    # library is what the applied operations make of it (the random tiny model picks ADD
    # or NONE by chance, so how many it adds differs between CPUs; the bookkeeping not)
    size = 0
    for row in rows:
        rec = json.loads((run / "reflections" / f"step-{row['step']:06d}.json").read_text())
        schema = prompts.operations_schema(rec["library_shown"], 1, prompts.text_limit(2))
        for reply in rec["operation_replies"]:
            jsonschema.validate(json.loads(reply), schema)
        kinds = [op["operation"] for op in rec["operations_applied"]]
        assert len(kinds) == len(rec["operation_replies"])  # one operation per reply (the cap)
        counted = row["ops_added"] + row["ops_updated"] + row["ops_deleted"] + row["ops_skipped"]
        assert counted == len(kinds) and row["ops_added"] <= kinds.count("ADD"), (row, kinds)
        size += row["ops_added"] - row["ops_deleted"]
        assert row["library_size"] == size, (row, kinds)
    library = json.loads((run / "experiences" / "library.json").read_text())["experiences"]
    assert len(library) == size
    assert 0 < summary["algorithm_stats"]["api_cost_usd"] <= cfg.algorithm.max_api_cost
    assert (run / "checkpoints").is_dir()


# ---------------------------------------------------------------------------------------
# a scripted endpoint: budget, resume, bad input
# ---------------------------------------------------------------------------------------


def teacher(messages):
    text = messages[-1]["content"]
    if "<trajectory>" in text:
        return "1. The agent answered."
    if "<attempts>" in text:
        return json.dumps({"lessons": ["When asked a sum, give digits.", "When unsure, recheck."]})
    if "<library>" in text:
        return json.dumps({"operations": [
            {"operation": "ADD", "id": None, "content": "When asked a sum, give digits."},
            {"operation": "ADD", "id": None, "content": "When unsure, recheck the sum."},
            {"operation": "ADD", "id": None, "content": "When done, stop."},
            {"operation": "ADD", "id": None, "content": "When tired, rest."}]})
    return "The answer is 12"  # the policy


@pytest.fixture
def fake_overrides(tiny_overrides, monkeypatch):
    monkeypatch.setenv("GYM_TEST_KEY", KEY)

    def make(url, *extra):
        return [*tiny_overrides, "algorithm=cl_grpo", "algorithm.num_generations=4",
                "algorithm.rewards=[digit_share]", "trainer.eval_size=4",
                "experience_store=json", "policy=api", f"policy.base_url={url}",
                "policy.model=p", "policy.api_key_env=GYM_TEST_KEY", "policy.backoff_s=0.01",
                "policy.max_retries=1", "policy.input_price=1000", "policy.output_price=1000",
                "llm=policy", *extra]
    return make


_answers = itertools.count()


def mixed(messages):
    """The policy answers in digits every other time (groups contrast under
    digit_share), the lessons from teacher()."""
    text = messages[-1]["content"]
    if any(t in text for t in ("<trajectory>", "<attempts>", "<library>")):
        return teacher(messages)
    return "12" if next(_answers) % 2 else "twelve"


def test_the_budget_stops_cleanly_and_the_run_resumes(tmp_path, fake_overrides,
                                                      with_digit_reward):
    run = tmp_path / "run"
    with FakeChatServer(mixed) as server:
        base = fake_overrides(server.base_url, "trainer.max_steps=3",
                              "trainer.eval_before=false", "trainer.save_every=100")
        # one step costs about 3 USD at these prices: a second would not fit in 5
        with pytest.raises(GymError, match="stopping at the API budget after step 1"):
            run_mod.run_job(compose([*base, "algorithm.max_api_cost=5"]), run_dir=run)
        from gym_core.train.checkpoint import list_checkpoints

        assert [s for s, _ in list_checkpoints(run)] == [1]
        lib = json.loads((run / "experiences/library.json").read_text())
        assert lib["step"] == 1
        spent = json.loads((run / "api_usage.json").read_text())["total"]["cost"]
        assert 0 < spent <= 5
        # the same budget again: refused at once, nothing sent
        before = len(server.requests)
        with pytest.raises(GymError, match="has no room for another step: 3[0-9]* tokens"):
            run_mod.run_job(compose([*base, "algorithm.max_api_cost=5"]), run_dir=run)
        assert len(server.requests) == before
        # raised: the run resumes from step 1 and finishes
        summary = run_mod.run_job(compose([*base, "algorithm.max_api_cost=1000"]), run_dir=run)
        assert len(server.requests) > before
    assert summary["steps"] == 3
    assert [r["step"] for r in rows_of(run)] == [1, 2, 3]
    total = json.loads((run / "api_usage.json").read_text())["total"]["cost"]
    assert summary["algorithm_stats"]["api_cost_usd"] == pytest.approx(total, abs=1e-6)
    assert total > spent


def test_a_zero_budget_is_refused_before_any_request(tmp_path, fake_overrides,
                                                     with_digit_reward):
    with FakeChatServer(mixed) as server:
        for opt in ("algorithm.max_api_cost=0", "algorithm.max_api_tokens=0"):
            with pytest.raises(GymError, match=f"{opt.split('=')[0]}=0 allows no API call"):
                run_mod.run_job(compose([*fake_overrides(server.base_url), opt,
                                         "trainer.max_steps=1"]), run_dir=tmp_path / "r")
        assert server.requests == []


@pytest.mark.parametrize("case, expect", [
    ("garbage", "not a chat completion"),
    ("401", "HTTP 401.*GYM_TEST_KEY"),
    ("429", r"after 2 attempts \(last: HTTP 429"),
    ("slow", r"after 2 attempts \(last: .*timed out"),
])
def test_a_failing_endpoint_gives_one_line_and_keeps_the_library(
        tmp_path, fake_overrides, with_digit_reward, case, expect):
    run = tmp_path / "run"
    # a first step with a healthy endpoint writes the library and a checkpoint
    with FakeChatServer(mixed) as ok:
        run_mod.run_job(compose([*fake_overrides(ok.base_url), "trainer.max_steps=1",
                                 "trainer.eval_before=false"]), run_dir=run)
    library = (run / "experiences/library.json").read_bytes()
    script = {"garbage": dict(forever="garbage"), "401": dict(script=[401]),
              "429": dict(forever=429), "slow": dict(forever="slow", slow_s=1.0)}[case]
    with FakeChatServer(mixed, **script) as bad, pytest.raises(GymError, match=expect) as err:
        run_mod.run_job(compose([*fake_overrides(bad.base_url), "trainer.max_steps=2",
                                 "policy.timeout_s=0.3"]), run_dir=run)
    assert "\n" not in str(err.value) and KEY not in str(err.value)
    assert (run / "experiences/library.json").read_bytes() == library  # never half-written
    # the endpoint is back: the run continues from its last complete step
    with FakeChatServer(mixed) as ok:
        summary = run_mod.run_job(compose([*fake_overrides(ok.base_url), "trainer.max_steps=2"]),
                                  run_dir=run)
    assert summary["steps"] == 2 and [r["step"] for r in rows_of(run)] == [1, 2]


# ---------------------------------------------------------------------------------------
# the paper's options
# ---------------------------------------------------------------------------------------


def test_groundtruth_cap_templates_epochs_and_the_paper_library_format(
        tmp_path, fake_overrides, with_digit_reward):
    tpl = tmp_path / "prompts"
    tpl.mkdir()
    (tpl / "summary.txt").write_text("MY SUMMARY {problem} {trajectory} {grade}{groundtruth}")
    lib_in = tmp_path / "paper.json"
    lib_in.write_text(json.dumps({"G1": "When stuck, restate.", "G0": "When adding, carry."}))
    run = tmp_path / "run"
    with FakeChatServer(mixed) as server:
        # 9 operand pairs, 3 held out: 6 questions, 4 steps of 2 = more than one epoch
        run_mod.run_job(compose([
            *fake_overrides(server.base_url), "data.max_value=2", "data.test_size=3",
            "trainer.max_steps=4", "trainer.eval_before=false",
            "algorithm.use_groundtruth=false", "algorithm.max_operations=2",
            f"algorithm.prompts_dir={tpl}", f"algorithm.library_init={lib_in}"]), run_dir=run)
    reflections = [r["messages"][-1]["content"] for r in server.requests
                   if "<attempts>" in r["messages"][-1]["content"]
                   or r["messages"][-1]["content"].startswith("MY SUMMARY")]
    summaries = [t for t in reflections if t.startswith("MY SUMMARY")]
    assert summaries and all("<groundtruth>" not in t for t in reflections)
    rows = rows_of(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # 4 ADDs per reply, at most 2 applied
    assert sum(r["ops_over_cap"] for r in rows) > 0
    assert all(r["ops_added"] + r["ops_skipped"] <= 2 * r["lessons"] for r in rows)
    # the imported library is what the first rollouts saw, in id order
    first = server.requests[0]["messages"][0]["content"]
    assert "[G0]. When adding, carry.\n[G1]. When stuck, restate." in first
    # export in the paper's format and import into a new run
    out = tmp_path / "export.json"
    proc = subprocess.run([sys.executable, "-m", "gym_cl_grpo.experience", "show",
                           str(run / "experiences/library.json"), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    exported = json.loads(out.read_text())
    assert list(exported)[:2] == ["G0", "G1"] and "When adding, carry." in exported.values()


def test_a_library_file_that_is_not_one_is_refused_and_left_alone(tmp_path, fake_overrides,
                                                                  with_digit_reward):
    for content, why in [("{not json", "not valid JSON"), ('["a", "b"]', "expected an object"),
                         ('{"X1": "a"}', "not an id like"), ('{"G0": ""}', "non-empty")]:
        bad = tmp_path / "bad.json"
        bad.write_text(content)
        with pytest.raises(GymError, match=why):
            run_mod.run_job(compose([*fake_overrides("http://127.0.0.1:9/v1"),
                                     f"algorithm.library_init={bad}", "trainer.max_steps=1"]),
                            run_dir=tmp_path / "r")
        assert bad.read_text() == content
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "batch_update.txt").write_text("no placeholders")
    with pytest.raises(GymError, match="batch_update.txt.*missing"):
        run_mod.run_job(compose([*fake_overrides("http://127.0.0.1:9/v1"),
                                 f"algorithm.prompts_dir={tmp_path / 'p'}",
                                 "trainer.max_steps=1"]), run_dir=tmp_path / "r2")
    # a usage record that is not one
    run = tmp_path / "r3"
    run.mkdir()
    (run / "api_usage.json").write_text("[1, 2]")
    with pytest.raises(GymError, match="api_usage.json is not gym's API usage record"):
        run_mod.run_job(compose([*fake_overrides("http://127.0.0.1:9/v1"),
                                 "trainer.max_steps=1"]), run_dir=run)
    assert (run / "api_usage.json").read_text() == "[1, 2]"


# ---------------------------------------------------------------------------------------
# the math domain
# ---------------------------------------------------------------------------------------


def test_boxed_answers_are_verified_mathematically(tmp_path):
    from gym_core.data.verify import math_verify  # the core's reward, which data=aime names

    assert math_verify(["p"] * 3, [r"... \boxed{\frac{1}{2}}", r"\boxed{34}", r"\boxed{2\sqrt{2}}"],
                       [{"answer": "0.5"}, {"answer": "33"}, {"answer": r"\sqrt{8}"}]) == [
        1.0, 0.0, 1.0]
    path = tmp_path / "aime.jsonl"
    path.write_text("\n".join(json.dumps({"ID": i, "Problem": f"Find {i}.", "Answer": i})
                              for i in range(10)))
    from omegaconf import OmegaConf

    from gym_cl_grpo import AimeConfig

    task = aime_task(OmegaConf.structured(AimeConfig(train_file=str(path))))
    assert len(task.train) == 8 and len(task.test) == 2 and task.metric == "math_verify"
    assert task.train[0]["prompt"].endswith(r"within \boxed{}.")
    path.write_text(json.dumps({"question": "no answer"}) + "\n")
    with pytest.raises(GymError, match="needs a problem"):
        aime_task(OmegaConf.structured(AimeConfig(train_file=str(path))))
