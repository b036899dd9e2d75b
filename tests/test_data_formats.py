"""JSONL data in the formats people already have (TRL's included)."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from gym_core.base.errors import GymError
from gym_core.config.schema import JsonlConfig
from gym_core.data.tasks import jsonl_task, render_completion
from gym_core.model.policy import tiny_tokenizer


def task(tmp_path, rows, **kw):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = OmegaConf.structured(JsonlConfig(train_file=str(path), test_file=str(path), **kw))
    return jsonl_task(cfg)


def test_pairs_with_identical_rows_skipped(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"},
            {"prompt": "q", "chosen": "same", "rejected": "same"}]
    with pytest.warns(UserWarning, match="skipped 1 rows"):
        t = task(tmp_path, rows)
    assert [r["prompt"] for r in t.train] == ["p"] and t.metric is None


def test_conversational_pairs_with_implicit_prompt(tmp_path):
    user = {"role": "user", "content": "2+2?"}
    rows = [{"chosen": [user, {"role": "assistant", "content": "4"}],
             "rejected": [user, {"role": "assistant", "content": "5"}]}]
    t = task(tmp_path, rows)
    ex = t.train[0]
    assert ex["prompt"] == [user]
    assert ex["chosen"] == [{"role": "assistant", "content": "4"}]
    text = render_completion(tiny_tokenizer(), ex["prompt"], ex["chosen"], None)
    assert text == "4<|im_end|>\n"


def test_labels_format_and_bad_rows_name_file_line_field(tmp_path):
    t = task(tmp_path, [{"prompt": "p", "completion": "c", "label": 1},
                        {"prompt": "q", "completion": "d", "label": 0}])
    assert [r["label"] for r in t.train] == [True, False]
    with pytest.raises(GymError, match=r"d.jsonl:2: missing field 'rejected'"):
        task(tmp_path, [{"prompt": "p", "chosen": "a", "rejected": "b"},
                        {"prompt": "p", "chosen": "a"}])
    with pytest.raises(GymError, match="fits no data format"):
        task(tmp_path, [{"question": "hello"}])


def test_auto_reads_a_row_as_its_trl_type_like_data_hf(tmp_path):
    """data.format=auto and data=hf detect a row's shape the same way (TRL's types), the
    renamed prompt and answer fields included."""
    from gym_core.data.formats import detect_type
    from gym_core.data.tasks import FORMAT_OF_TYPE

    t = task(tmp_path, [{"question": "2+2?", "target": 4}], prompt_field="question",
             answer_field="target")
    assert t.train[0]["prompt"] == "2+2?" and t.train[0]["answer"] == "4"
    assert t.metric == "accuracy"
    row = {"prompt": "p", "completion": "c"}
    assert FORMAT_OF_TYPE[detect_type(row)] == "completion"
    assert task(tmp_path, [row]).metric is None
    # an answer beside a completion: still a verifiable row, scored by held-out accuracy
    # (SFT trains on its completion: tests/test_smollm2.py)
    assert task(tmp_path, [{**row, "answer": "a"}]).metric == "accuracy"
    with pytest.raises(GymError, match="line 1 fits no data format"):
        task(tmp_path, [{"prompt": "p"}])  # prompt-only, but nothing to verify


# ----------------------------------------------------------------------------------------
# TRL's SFT shapes: prompt-completion, conversational, plain text
# ----------------------------------------------------------------------------------------


def test_sft_shapes_are_detected(tmp_path):
    user = {"role": "user", "content": "2+2?"}
    reply = {"role": "assistant", "content": "4"}
    t = task(tmp_path, [{"prompt": "p", "completion": "c"}])
    assert t.train[0]["completion"] == "c" and t.metric is None
    t = task(tmp_path, [{"messages": [user, reply, {"role": "user", "content": "and 3+3?"},
                                      {"role": "assistant", "content": "6"}]}])
    # the prompt is the conversation before the last assistant turn
    assert t.train[0]["prompt"] == [user, reply, {"role": "user", "content": "and 3+3?"}]
    t = task(tmp_path, [{"text": "Once upon a time"}])
    assert t.train[0]["prompt"] == "Once upon a time"
    t = task(tmp_path, [{"prompt": [user], "completion": [reply]}])
    assert t.train[0]["completion"] == [reply]


@pytest.mark.parametrize("row,message", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "has no assistant turn"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]},
     "has no assistant turn"),
    ({"prompt": "p", "completion": ""}, "field 'completion' is empty"),
    ({"prompt": "p", "completion": "   "}, "field 'completion' is empty"),
    ({"messages": [{"role": "assistant", "content": "4"}, {"role": "user", "content": "2+2?"}]},
     "out of turn order at message 0"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "out of turn order at message 1"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "c"}]}, "out of turn order at message 1"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "out of turn order at message 2"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},
     "message 1 is an empty assistant turn"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
     "message 1 has role 'bot'"),
    ({"messages": "hello"}, "must be a non-empty list of messages"),
    ({"text": ""}, "field 'text' is empty"),
])
def test_bad_sft_rows_name_file_line_and_field(tmp_path, row, message):
    good = {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}
    if "prompt" in row:
        good = {"prompt": "1+1?", "completion": "2"}
    elif "text" in row:
        good = {"text": "fine"}
    with pytest.raises(GymError, match=r"d.jsonl:2: .*" + message):
        task(tmp_path, [good, row])
