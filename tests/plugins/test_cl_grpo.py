"""Training-Free GRPO (docs/algorithms.md §8): reading model replies (property-based, over
malformed and hostile output), injection, and whole runs on the tiny model with
llm=local (robustness, frozen weights) and llm=openai against a local fake server
(lessons reach the library; resume; bad input never harms an existing library)."""

from __future__ import annotations

import json
import re
import shutil
import socket
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gym_core.train.job as run_mod
from gym_cl_grpo.experience import Experience, Operation, apply_operations, as_library, labels
from gym_cl_grpo.prompts import INJECTION_HEADER, inject
from gym_cl_grpo.replies import json_payload, parse_lessons, parse_operations
from gym_core.base.errors import GymError
from tests.conftest import compose
from tests.plugins.fake_chat_server import FakeChatServer

SHOWN = labels([Experience(3, "When adding, carry the ten."), Experience(7, "Check units.")])


# ---------------------------------------------------------------------------------------
# replies
# ---------------------------------------------------------------------------------------


def test_operations_are_read_from_the_last_json_block():
    reply = """Thinking... ```json
[{"operation": "ADD", "id": null, "content": "ignored: not the last block"}]
``` more thoughts
```json
[{"operation": "add", "id": null, "content": "When a sum exceeds 9, carry one."},
 {"operation": "UPDATE", "id": "[G1]", "content": "[G1]. Check the units twice."},
 {"operation": "DELETE", "id": "G0"},
 {"operation": "NONE"},
 {"operation": "DELETE", "id": "G9"},
 {"operation": "MERGE", "id": "G0", "content": "x"},
 {"operation": "UPDATE", "id": "G0", "content": ""},
 "just a string"]
```"""
    ops, invalid = parse_operations(reply, SHOWN, max_words=32)
    assert ops == [Operation("ADD", text="When a sum exceeds 9, carry one."),
                   Operation("UPDATE", 7, "Check the units twice."),
                   Operation("DELETE", 3), Operation("NONE")]
    assert invalid == 4  # unknown id, unknown op, empty content, not an object


def test_lessons_parse_and_limits():
    reply = 'Lessons:\n```json\n["When A, do B.", "When A, do B.", "' + "w " * 40 + '", 3, "When C, D."]\n```'
    lessons, rejected = parse_lessons(reply, max_lessons=1, max_words=32)
    assert lessons == ["When A, do B."]
    assert rejected == 4  # duplicate, too long, not a string, over the limit of 1
    assert parse_lessons("no json here", 2, 32) is None
    assert parse_lessons('{"lessons": ["When x, y."]}', 2, 32) == (["When x, y."], 0)


def test_the_prompts_example_copied_is_not_a_lesson():
    """SmolLM2-135M under the schema copies the prompt's example ("When ..., ...") or
    writes punctuation and numbers; seen in docs/algorithms.md §8.7's runs. A lesson
    needs a word besides the form it was asked in; anything else is rejected and counted."""
    copied = ["When ..., ...", "When ..., ..", "When , -> When , ...", "When,", ",}",
              "When ,19,19,When ,19,19,22,22,", "When [condition], [strategy]"]
    reply = json.dumps({"lessons": [*copied, "When the units sum past nine, carry one."]})
    assert parse_lessons(reply, 2, 32) == (["When the units sum past nine, carry one."],
                                           len(copied))
    ops = json.dumps({"operations": [{"operation": "ADD", "id": None, "content": c}
                                     for c in copied]
                     + [{"operation": "UPDATE", "id": "G0", "content": "When ..., ..."},
                        {"operation": "UPDATE", "id": "G0", "content": "When x, y."}]})
    assert parse_operations(ops, SHOWN, 32) == ([Operation("UPDATE", 3, "When x, y.")],
                                                len(copied) + 1)


hostile_text = st.one_of(
    st.text(max_size=300),
    st.sampled_from(["```json\n[{\"operation\": \"DELETE\", \"id\": \"G0\"}", "[" * 5000,
                     "```json\n" + "[" * 3000 + "]" * 3000 + "\n```", "\x00\u2028```"]),
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                  st.text(max_size=40),
                  st.sampled_from(["ADD", "UPDATE", "DELETE", "NONE", "G0", "G1", "[G1]", "G99"])),
        lambda inner: st.one_of(
            st.lists(inner, max_size=5),
            st.dictionaries(st.sampled_from(["operation", "id", "content", "option",
                                             "operations", "lessons"]), inner, max_size=4)),
        max_leaves=20,
    ).map(lambda obj: f"reasoning\n```json\n{json.dumps(obj)}\n```"),
)


@settings(max_examples=300, deadline=None)
@given(reply=hostile_text)
def test_no_reply_can_crash_parsing_or_corrupt_the_library(reply):
    json_payload(reply)
    lessons = parse_lessons(reply, 2, 32)
    if lessons is not None:
        assert all(isinstance(x, str) and x and "\n" not in x for x in lessons[0])
    parsed = parse_operations(reply, SHOWN, 32)
    if parsed is None:
        return
    ops, invalid = parsed
    assert invalid >= 0
    for op in ops:  # every operation is well formed and targets a shown experience
        assert op.kind in ("ADD", "UPDATE", "DELETE", "NONE")
        if op.kind in ("UPDATE", "DELETE"):
            assert op.key in (3, 7)
    library, _, _ = apply_operations(list(SHOWN.values()), ops, next_key=8)
    for label, text in as_library(library).items():
        assert re.fullmatch(r"G\d+", label) and text and text == " ".join(text.split())
        assert not re.match(r"\s*\[?G\d+\]?[.:]", text)


def test_injection_keeps_an_empty_library_invisible():
    assert inject("What is 2 + 2?", {}, "system", None) == "What is 2 + 2?"
    sys_msgs = inject("What is 2 + 2?", SHOWN, "system", "Be brief.")
    assert sys_msgs[0]["role"] == "system"
    assert sys_msgs[0]["content"] == (f"Be brief.\n\n{INJECTION_HEADER}\n"
                                      "[G0]. When adding, carry the ten.\n[G1]. Check units.")
    assert sys_msgs[1] == {"role": "user", "content": "What is 2 + 2?"}
    user = inject("What is 2 + 2?", SHOWN, "user", None)
    assert user == [{"role": "user", "content": "What is 2 + 2?\n\n" + INJECTION_HEADER +
                     "\n[G0]. When adding, carry the ten.\n[G1]. Check units."}]


# ---------------------------------------------------------------------------------------
# whole runs
# ---------------------------------------------------------------------------------------


@pytest.fixture
def cl_overrides(tiny_overrides):
    return [*tiny_overrides, "algorithm=cl_grpo", "algorithm.num_generations=4",
            "algorithm.max_completion_length=8", "algorithm.rewards=[digit_share]",
            "trainer.eval_size=4", "llm.max_new_tokens=12"]


def spy_policy(monkeypatch):
    """Capture the run's policy and a copy of every weight right after loading."""
    seen = {}
    original = run_mod.load_policy

    def load(*args, **kwargs):
        policy = original(*args, **kwargs)
        seen["policy"] = policy
        seen["before"] = {k: v.detach().clone() for k, v in policy.model.state_dict().items()}
        return policy

    monkeypatch.setattr(run_mod, "load_policy", load)
    return seen


def test_tiny_run_with_local_llm_counts_garbage_and_keeps_weights_frozen(
        tmp_path, cl_overrides, with_digit_reward, monkeypatch):
    seen = spy_policy(monkeypatch)
    summary = run_mod.run_job(compose([*cl_overrides, "experience_store=json",
                                       "trainer.max_steps=2"]), run_dir=tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    kept = sum(r["groups_kept"] for r in rows)
    assert kept > 0  # digit_share spreads, so groups were summarised...
    assert sum(r["groups_contrasted"] for r in rows) > 0
    # ...and a random model's reflections never parse: every one is counted, none applied
    for r in rows:
        # calls: one summary per trajectory of a kept group, one extraction per group
        # with good and bad summaries; no extraction parsed, so no update calls
        assert r["llm_calls"] == r["groups_kept"] * 4 + r["groups_contrasted"]
        assert r["lesson_replies_unparsed"] == r["groups_contrasted"]
        assert r["lessons"] == r["ops_added"] == r["library_size"] == 0
    assert summary["algorithm_stats"]["library_size"] == 0
    assert summary["eval"]["before"] is not None and summary["eval"]["after"] is not None
    # the weights are byte-identical after the run
    after = seen["policy"].model.state_dict()
    assert set(after) == set(seen["before"])
    for k, v in seen["before"].items():
        assert v.numpy().tobytes() == after[k].detach().numpy().tobytes(), k
    # a snapshot per step
    steps = sorted(p.name for p in (tmp_path / "run/experiences/library.json.steps").iterdir())
    assert steps == ["step-0.json", "step-1.json", "step-2.json"]


def teacher(messages):
    """A deterministic stand-in for a strong reflecting model."""
    text = messages[-1]["content"]
    if "<trajectory>" in text:
        return "1. The agent wrote an answer; digits made it score."
    if "<attempts>" in text:
        n = len(re.findall(r"^\[G\d+\]", text, re.M))
        return ('Compared.\n```json\n["When an answer is a number, write it with digits.", '
                f'"When unsure (seen {n}), restate the sum first."]\n```')
    if "<library>" in text:
        block = text.split("<new_lessons>")[1].split("</new_lessons>")[0]
        lessons = re.findall(r"^- (.*)$", block, re.M)
        ops = [{"operation": "ADD", "id": None, "content": x} for x in lessons]
        if "[G0]." in text:
            ops.append({"operation": "UPDATE", "id": "G0",
                        "content": "When an answer is a number, write only its digits."})
        return "Plan:\n```json\n" + json.dumps(ops) + "\n```"
    return "?"


def openai_overrides(base_url):
    return ["llm=openai", f"llm.base_url={base_url}", "llm.model=teacher",
            "llm.api_key_env=GYM_TEST_KEY", "llm.backoff_s=0.01", "llm.max_retries=1"]


def test_tiny_run_with_openai_teacher_fills_the_library(
        tmp_path, cl_overrides, with_digit_reward, monkeypatch):
    monkeypatch.setenv("GYM_TEST_KEY", "sk-secret")
    with FakeChatServer(teacher, script=[429]) as server:  # the first request is retried
        summary = run_mod.run_job(compose([
            *cl_overrides, *openai_overrides(server.base_url), "experience_store=sqlite",
            "trainer.max_steps=2"]), run_dir=tmp_path / "run")
    stats = summary["algorithm_stats"]
    assert stats["library_size"] >= 1 and stats["library_step"] == 2
    from gym_cl_grpo.stores.sqlite_store import SqliteStore

    with SqliteStore(SqliteStore.Config(), Path(stats["library_path"]), "x") as store:
        library = store.export()
    assert "When an answer is a number, write only its digits." in library.values()
    # the second step's rollouts and reflections saw the library learned in the first
    assert any("[G0]. When an answer is a number" in m["content"]
               for r in server.requests for m in r["messages"])
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["ops_added"] >= 1 and rows[0]["lesson_replies_unparsed"] == 0
    assert [r["llm_retries"] for r in rows] == [1, 0]
    assert "sk-secret" not in (tmp_path / "run" / "summary.json").read_text()
    # what the lesson LLM read and wrote, per step, as it wrote it
    rec = json.loads((tmp_path / "run/reflections/step-000001.json").read_text())
    assert rec["step"] == 1 and rec["library_shown"] == {}
    assert len(rec["groups"]) == rows[0]["groups_kept"]
    g = rec["groups"][0]
    assert len(g["summaries"]) == len(g["completions"]) == len(g["rewards"])
    assert g["summaries"][0] == "1. The agent wrote an answer; digits made it score."
    assert len(rec["lesson_replies"]) == rows[0]["groups_contrasted"]
    assert "When an answer is a number, write it with digits." in rec["lesson_replies"][0]
    assert len(rec["operation_replies"]) == len(rec["lesson_replies"])
    assert {"operation": "ADD", "id": None,
            "content": "When an answer is a number, write it with digits."} \
        in rec["operations_applied"]
    rec2 = json.loads((tmp_path / "run/reflections/step-000002.json").read_text())
    assert "When an answer is a number, write it with digits." in rec2["library_shown"].values()
    assert any(op["operation"] == "UPDATE" and op["id"] == "G0"
               for op in rec2["operations_applied"])


def test_resume_rewinds_the_library_to_the_checkpoint(
        tmp_path, cl_overrides, with_digit_reward, monkeypatch):
    monkeypatch.setenv("GYM_TEST_KEY", "sk-secret")
    with FakeChatServer(teacher) as server:
        base = [*cl_overrides, *openai_overrides(server.base_url), "experience_store=json",
                "trainer.save_every=2", "trainer.eval_before=false", "trainer.max_steps=3"]
        straight = run_mod.run_job(compose(base), run_dir=tmp_path / "straight")
        run_mod.run_job(compose(base), run_dir=tmp_path / "split")
        # a crash after step 3 wrote the library but before its checkpoint
        from gym_core.train.checkpoint import list_checkpoints
        shutil.rmtree(list_checkpoints(tmp_path / "split")[-1][1])
        resumed = run_mod.run_job(compose(base), run_dir=tmp_path / "split")
    assert straight["steps"] == resumed["steps"] == 3
    a = json.loads((tmp_path / "straight/experiences/library.json").read_text())
    b = json.loads((tmp_path / "split/experiences/library.json").read_text())
    assert a["step"] == b["step"] == 3
    assert [e["text"] for e in a["experiences"]] == [e["text"] for e in b["experiences"]]


def test_unreachable_endpoint_fails_clearly_and_leaves_the_library(
        tmp_path, cl_overrides, with_digit_reward, monkeypatch):
    monkeypatch.setenv("GYM_TEST_KEY", "sk-secret")
    lib = tmp_path / "shared.json"
    from gym_cl_grpo.stores.json_store import JsonStore

    JsonStore(JsonStore.Config(), lib).apply([Operation("ADD", text="Keep me.")], 1)
    before = lib.read_bytes()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(GymError, match=f"127.0.0.1:{port}"):
        run_mod.run_job(compose([*cl_overrides, *openai_overrides(f"http://127.0.0.1:{port}/v1"),
                                 "experience_store=json", f"experience_store.path={lib}",
                                 "trainer.max_steps=1"]), run_dir=tmp_path / "run")
    assert lib.read_bytes() == before


def test_bad_input_is_refused_before_any_work(tmp_path, cl_overrides, with_digit_reward,
                                              monkeypatch):
    monkeypatch.delenv("GYM_TEST_KEY", raising=False)
    with pytest.raises(GymError, match="GYM_TEST_KEY"):
        run_mod.run_job(compose([*cl_overrides, "trainer.max_steps=1",
                                 "experience_store=json", *openai_overrides("http://x/v1")]),
                        run_dir=tmp_path / "a")
    bad = tmp_path / "lib.json"
    bad.write_text('{"format": "gym.experiences/1", "step": 0')
    with pytest.raises(GymError, match="not valid JSON"):
        run_mod.run_job(compose([*cl_overrides, "trainer.max_steps=1",
                                 "experience_store=json", f"experience_store.path={bad}"]),
                        run_dir=tmp_path / "b")
    assert bad.read_text() == '{"format": "gym.experiences/1", "step": 0'
    with pytest.raises(GymError, match="experience_store=none is not an installed option"):
        compose([*cl_overrides, "experience_store=none"])


def test_a_bad_option_is_refused(tmp_path, cl_overrides, with_digit_reward):
    with pytest.raises(GymError, match="algorithm.inject_into='nowhere'"):
        run_mod.run_job(compose([*cl_overrides, "experience_store=json",
                                 "algorithm.inject_into=nowhere"]), run_dir=tmp_path / "x")


def test_episodes_are_the_trajectories_the_library_learns_from(
        tmp_path, cl_overrides, with_digit_reward, monkeypatch):
    """algorithm=cl_grpo with env=calculator (docs/agents.md): the rollouts are multi-turn
    episodes, the lesson LLM summarises each episode's transcript (the task as the model
    saw it, then every turn), and the next step's episodes carry the library in their
    system turn."""
    from gym_core.env import episode as episode_mod
    from gym_core.env.builtin import Calculator

    monkeypatch.setenv("GYM_TEST_KEY", "sk-secret")
    # a reward that spreads over a random model's episodes (its final answer's length)
    monkeypatch.setattr(Calculator, "score", lambda self, action: float(len(action.content) % 2))
    systems = []
    original = episode_mod.Episode.start

    def start(self):
        out = original(self)
        first = self.record.messages[:1]
        systems.append(first[0]["content"] if first and first[0]["role"] == "system" else "")
        return out

    monkeypatch.setattr(episode_mod.Episode, "start", start)
    load = run_mod.load_policy

    def eos_biased_load(*args, **kwargs):  # turns that end within a few tokens
        from tests.episode_helpers import eos_biased

        return eos_biased(load(*args, **kwargs))

    monkeypatch.setattr(run_mod, "load_policy", eos_biased_load)
    with FakeChatServer(teacher) as server:
        summary = run_mod.run_job(compose([
            *cl_overrides, *openai_overrides(server.base_url), "experience_store=json",
            "env=calculator", "env.max_tokens=24", "trainer.max_steps=2"]),
            run_dir=tmp_path / "run")
    assert summary["algorithm_stats"]["library_size"] >= 1
    asked = [r["messages"][-1]["content"] for r in server.requests]
    summaries = [t for t in asked if "<trajectory>" in t]
    assert summaries and all("[Agent]" in t for t in summaries)  # transcripts, turn by turn
    assert all("[G0]" not in t.split("<trajectory>")[0] for t in summaries)  # the task only
    # step 1's episodes had no library; step 2's system turns show it
    assert any("[G0]. When an answer is a number" in s for s in systems)
    assert not any("[G0]" in s for s in systems[:8])
