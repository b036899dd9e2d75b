"""gym's lm-evaluation-harness model (GymLM) against the harness's own ``hf`` model on
the same weights (the tiny random model saved to a folder), on task YAMLs written here
over local JSONL files (no hub): the same generations, log-likelihoods and scores for
generate_until, multiple-choice (loglikelihood) and perplexity (loglikelihood_rolling)
tasks; and a LoRA policy scored through the wrapper."""

from __future__ import annotations

import json
import math
import os

import pytest

pytestmark = pytest.mark.filterwarnings("ignore:Use TaskManager.load:DeprecationWarning")

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

from gym_core.eval.harness import GymLM, evaluate_harness, task_manager  # noqa: E402
from gym_core.model.policy import load_base  # noqa: E402
from tests.conftest import compose  # noqa: E402

QUESTIONS = [("What is 2 + 3?", "5"), ("Name a colour.", "red"), ("Say hi", "hi"),
             ("Count: 1 2 3", "4"), ("The sea is", "blue"), ("12 + 7 =", "19")]


def write_tasks(folder, data):
    data.mkdir(parents=True, exist_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    with (data / "qa.jsonl").open("w") as fh:
        for q, a in QUESTIONS:
            fh.write(json.dumps({"question": q, "answer": a}) + "\n")
    with (data / "mc.jsonl").open("w") as fh:
        for i, (q, a) in enumerate(QUESTIONS):
            fh.write(json.dumps({"question": q, "choices": [a, "no", "maybe so"],
                                 "label": i % 3}) + "\n")
    with (data / "text.jsonl").open("w") as fh:
        for q, a in QUESTIONS:
            fh.write(json.dumps({"text": f"{q} The answer is {a}. " * 3}) + "\n")

    def yaml(name, body):
        source = {"gym_gen": "qa", "gym_gen_fewshot": "qa", "gym_mc": "mc",
                  "gym_ppl": "text"}[name]
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {data / (source + '.jsonl')}\ntest_split: test\n{body}")

    yaml("gym_gen", 'output_type: generate_until\ndoc_to_text: "Q: {{question}}\\nA:"\n'
         'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n", "."]\n'
         "  max_gen_toks: 12\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    # the same with three fixed worked examples before each question (the harness's
    # first_n sampler, as gsm8k-cot and bbh use): every prompt begins alike
    yaml("gym_gen_fewshot", 'output_type: generate_until\ndoc_to_text: "Q: {{question}}\\nA:"\n'
         'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n", "."]\n'
         "  max_gen_toks: 12\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n"
         "num_fewshot: 3\nfewshot_config:\n  sampler: first_n\n  samples:\n" +
         "".join(f'    - question: "What is {a} + {b}?"\n      answer: "{a + b}"\n'
                 for a, b in [(40, 2), (13, 8), (25, 25)]))
    yaml("gym_mc", 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
         'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
         "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    yaml("gym_ppl", 'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
         'doc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n'
         "  - metric: bits_per_byte\n")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    model, tok = load_base(compose(["model=tiny"]).model)
    # a random delta makes the random model's answers differ from prompt to prompt
    from gym_core.deltas.delta import apply_delta
    from tests.serve_helpers import random_delta

    apply_delta(model, random_delta(model, 1, 0.5))
    folder = root / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    write_tasks(root / "tasks", root / "data")
    return {"root": root, "folder": folder, "tasks": root / "tasks",
            "manager": task_manager([str(root / "tasks")], builtin=False)}


@pytest.fixture(scope="module")
def hf_lm(setup):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(setup["folder"]), batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def gym_lm(setup):
    return GymLM(pretrained=str(setup["folder"]), base="tiny", batch_size=4)


def instances(setup, name):
    task = setup["manager"].load_task_or_group([name])[name]
    task.build_all_requests(limit=None, rank=0, world_size=1)
    return task.instances


def test_generate_until_matches_hf(setup, hf_lm, gym_lm):
    reqs = instances(setup, "gym_gen")
    ours, theirs = gym_lm.generate_until(reqs), hf_lm.generate_until(reqs)
    assert ours == theirs
    assert all("\n" not in s and "." not in s for s in ours)
    assert len(set(ours)) == len(ours)  # distinct answers, some cut by a stop string
    assert any(len(gym_lm.tok_encode(s)) < 12 for s in ours)


def test_few_shot_prompts_run_their_examples_once_and_match_hf(setup, hf_lm, gym_lm):
    """Few-shot prompts with fixed examples begin alike: gym's engine computes the
    examples once (its prefix cache) and each prompt's own question after them; the
    answers are the hf model's."""
    reqs = instances(setup, "gym_gen_fewshot")
    assert all(r.args[0].startswith("Q: What is 40 + 2?\nA: 42") for r in reqs)
    ours, theirs = gym_lm.generate_until(reqs), hf_lm.generate_until(reqs)
    assert ours == theirs
    stats = gym_lm.engine_stats
    examples = len(gym_lm.tok_encode(reqs[0].args[0].split("Q: ")[-2]))  # one example at least
    assert stats["prefix_hits"] == len(reqs) and \
        stats["prefix_tokens_reused"] >= len(reqs) * 3 * examples


def test_rows_join_as_others_leave_and_keep_their_own_settings(setup, gym_lm):
    """generate_until runs up to batch_size rows and a waiting request joins as one
    leaves; each request keeps its own stop strings, length and seed, so the answers do
    not depend on the batch size or on which requests share a call."""
    from lm_eval.api.instance import Instance

    def req(i, q, **kw):
        return Instance("generate_until", None, (f"Q: {q}\nA:", kw), i)

    greedy = {"until": ["\n"], "max_gen_toks": 10, "do_sample": False}
    sampled = {"until": ["."], "max_gen_toks": 6, "do_sample": True, "temperature": 0.9}
    reqs = [req(i, q, **(sampled if i % 2 else greedy)) for i, (q, _) in enumerate(QUESTIONS)]
    one_by_one = [gym_lm.generate_until([r]) for r in reqs]
    wide = GymLM(pretrained=str(setup["folder"]), base="tiny", batch_size=16)
    narrow = GymLM(pretrained=str(setup["folder"]), base="tiny", batch_size=2)
    together = narrow.generate_until(reqs)
    assert together == wide.generate_until(reqs)
    for i, (r, text) in enumerate(zip(reqs, together)):
        assert all(s not in text for s in r.args[1]["until"])
        if i % 2 == 0:  # greedy rows: the same alone (seeds are the request's index)
            assert [text] == one_by_one[i]


def test_loglikelihood_and_rolling_match_hf(setup, hf_lm, gym_lm):
    reqs = instances(setup, "gym_mc")
    ours, theirs = gym_lm.loglikelihood(reqs), hf_lm.loglikelihood(reqs)
    assert len(ours) == len(reqs) == 3 * len(QUESTIONS)
    for (a, ga), (b, gb) in zip(ours, theirs):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    reqs = instances(setup, "gym_ppl")
    for a, b in zip(gym_lm.loglikelihood_rolling(reqs), hf_lm.loglikelihood_rolling(reqs)):
        assert a == pytest.approx(b, abs=1e-3) and a < 0


def test_simple_evaluate_scores_equal(setup, hf_lm, gym_lm):
    names = ["gym_gen", "gym_mc", "gym_ppl"]
    ours = evaluate_harness(gym_lm, names, manager=setup["manager"])
    theirs = evaluate_harness(hf_lm, names, manager=setup["manager"])
    assert set(ours) == set(names)
    assert ours["gym_mc"]["examples"] == len(QUESTIONS)
    for name in names:
        assert ours[name]["metrics"].keys() == theirs[name]["metrics"].keys()
        for metric, value in ours[name]["metrics"].items():
            assert value == pytest.approx(theirs[name]["metrics"][metric], rel=1e-4), metric
    assert math.isfinite(ours["gym_ppl"]["metrics"]["word_perplexity"])


def test_lora_policy_through_the_wrapper(setup):
    """A LoRA policy (peft model, adapter unmerged) scores as its merged model does."""
    from tests.conftest import tiny_lora_policy

    policy = tiny_lora_policy()
    reqs = instances(setup, "gym_mc")
    lora = GymLM(model=policy.model, tokenizer=policy.tokenizer, batch_size=4).loglikelihood(reqs)
    import copy

    plain = copy.deepcopy(policy.model).merge_and_unload()
    again = GymLM(model=plain, tokenizer=policy.tokenizer, batch_size=4).loglikelihood(reqs)
    for (a, _), (b, _) in zip(lora, again):
        assert a == pytest.approx(b, abs=1e-4)
    base, _ = load_base(compose(["model=tiny"]).model)
    other = GymLM(model=base, tokenizer=policy.tokenizer, batch_size=4).loglikelihood(reqs)
    assert any(abs(a - b) > 1e-3 for (a, _), (b, _) in zip(lora, other))
