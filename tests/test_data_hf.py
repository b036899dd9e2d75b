"""data=hf: TRL's dataset types from parquet, save_to_disk folders and JSONL; mixtures;
LLaMA-Factory's dataset_info.json; verifiers beyond integers; the bad inputs. Every
dataset is written here: nothing reaches a hub."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

datasets = pytest.importorskip("datasets")

from gym_core.base.errors import GymError  # noqa: E402
from gym_core.config.schema import HfConfig  # noqa: E402
from gym_core.data.formats import check_task, detect_type, rows_to_check  # noqa: E402
from gym_core.data.hf import hf_task  # noqa: E402
from gym_core.data.tasks import render_prompts  # noqa: E402

U = {"role": "user", "content": "What is 2 + 2?"}
A4 = {"role": "assistant", "content": "4"}
A5 = {"role": "assistant", "content": "5"}


def rows_of(kind: str, conversational: bool, n: int = 12) -> list[dict]:
    """n rows of one TRL type, standard or conversational."""
    out = []
    for i in range(n):
        q, good, bad = f"What is {i} + 2?", str(i + 2), str(i + 3)
        if conversational:
            p = [{"role": "user", "content": q}]
            c, r = [{"role": "assistant", "content": good}], [{"role": "assistant", "content": bad}]
        else:
            p, c, r = q, good, bad
        if kind == "language_modeling":
            out.append({"messages": [*p, *c]} if conversational else {"text": f"{q} {good}"})
        elif kind == "prompt_only":
            out.append({"prompt": p, "answer": good})
        elif kind == "prompt_completion":
            out.append({"prompt": p, "completion": c})
        elif kind == "preference":
            out.append({"prompt": p, "chosen": c, "rejected": r})
        elif kind == "implicit_preference":  # conversational only: the prompt is shared
            out.append({"chosen": [*p, *c], "rejected": [*p, *r]})
        elif kind == "unpaired_preference":
            out.append({"prompt": p, "completion": c if i % 2 else r, "label": bool(i % 2)})
    return out


def write(tmp_path: Path, rows: list[dict], storage: str, name: str = "d") -> str:
    ds = datasets.Dataset.from_list(rows)
    if storage == "parquet":
        path = tmp_path / f"{name}.parquet"
        ds.to_parquet(str(path))
    elif storage == "arrow":
        path = tmp_path / f"{name}_folder"
        datasets.DatasetDict({"train": ds}).save_to_disk(str(path))
    else:
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def hf(tmp_path, **kw):
    cfg = OmegaConf.structured(HfConfig(cache_dir=str(tmp_path / "cache"), **kw))
    return hf_task(cfg)


def method(name: str):
    """The algorithm ``name`` on the tiny model's tokenizer (no weights: a placeholder
    module), as the UI's Data page builds it."""
    import torch

    from gym_core.model.policy import Policy, tiny_tokenizer
    from gym_core.plugin.startup import bootstrap

    cls = bootstrap().component("algorithm", name).load()
    cfg = OmegaConf.structured(cls.Config())
    policy = Policy(torch.nn.Linear(1, 1), tiny_tokenizer(), lora=False, system_prompt=None)
    return cls, cls(cfg, policy)


def through(name: str, task) -> None:
    """The rows as method ``name`` trains on them: its type check, its check_data and
    (offline methods) the batch its collate builds; online methods render prompts."""
    cls, algo = method(name)
    cfg = OmegaConf.create({"algorithm": {"name": name}, "data": {"name": "hf"}})
    check_task(cfg, cls, task.train)
    algo.check_data(rows_to_check(task.train))
    rows = task.train[:4]
    if cls.online:
        texts = render_prompts(algo.policy.tokenizer, [r["prompt"] for r in rows], None)
        assert all("What is" in t for t in texts)
        return
    batch = algo.collate(rows)
    mask = getattr(batch, "completion_mask", None)
    if mask is None:
        mask = batch.target_mask
    assert int(mask.sum()) > 0


TAKES = {
    "language_modeling": ["sft"],
    "prompt_only": ["grpo", "rloo"],
    "prompt_completion": ["sft"],
    "preference": ["dpo", "orpo", "kto"],
    "implicit_preference": ["dpo"],
    "unpaired_preference": ["kto"],
}


@pytest.mark.parametrize("storage", ["parquet", "arrow", "jsonl"])
@pytest.mark.parametrize("conversational", [False, True], ids=["standard", "conversational"])
@pytest.mark.parametrize("kind", list(TAKES))
def test_every_trl_type_trains_through_its_methods(tmp_path, kind, conversational, storage):
    if kind == "implicit_preference" and not conversational:
        pytest.skip("TRL's implicit prompt exists only for conversations")
    path = write(tmp_path, rows_of(kind, conversational), storage)
    task = hf(tmp_path, path=path, test_size=2)
    assert len(task.train) == 10 and len(task.test) == 2
    want = "preference" if kind == "implicit_preference" else kind
    assert detect_type(task.train.columns) == want
    ex = task.train[0]
    assert isinstance(ex["prompt"], list if conversational else str)
    if kind == "implicit_preference":
        assert ex["prompt"][0]["role"] == "user" and ex["chosen"][0]["role"] == "assistant"
    for name in TAKES[kind]:
        through(name, task)
    assert task.metric == ("accuracy" if kind == "prompt_only" else None)


def test_a_method_given_a_type_it_cannot_use_names_columns_and_types(tmp_path):
    path = write(tmp_path, rows_of("prompt_completion", False), "parquet")
    task = hf(tmp_path, path=path, test_size=2)
    with pytest.raises(GymError) as err:
        through("dpo", task)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("algorithm=dpo needs preference pairs")
    assert "columns completion, prompt (prompt_completion)" in msg
    text = hf(tmp_path, path=write(tmp_path, rows_of("language_modeling", False), "jsonl", "t"),
              test_size=2)
    with pytest.raises(GymError, match=r"algorithm=grpo needs prompts \(prompt_only: prompt\); "
                                       r"data=hf has rows with columns text \(language_modeling\)"):
        through("grpo", text)


def test_system_and_tools_columns_reach_the_chat_template(tmp_path):
    from gym_core.data.tasks import render_completion

    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    rows = [{"prompt": f"q{i}", "completion": f"a{i}", "system": "Be terse.",
             "tools": json.dumps(tools)} for i in range(6)]
    task = hf(tmp_path, path=write(tmp_path, rows, "parquet"), test_size=1)
    ex = task.train[0]
    assert ex["prompt"][0] == {"role": "system", "content": "Be terse.", "tools": tools}

    class Recorder:
        def __init__(self):
            self.calls = []

        def apply_chat_template(self, messages, **kw):
            self.calls.append((messages, kw))
            return "".join(f"<{m['role']}>{m['content']}" for m in messages) + (
                "<assistant>" if kw.get("add_generation_prompt") else "")

    tok = Recorder()
    text = render_prompts(tok, [ex["prompt"]], None)[0]
    assert text.startswith("<system>Be terse.<user>q")
    messages, kw = tok.calls[0]
    assert kw["tools"] == tools and all("tools" not in m for m in messages)
    render_completion(tok, ex["prompt"], ex["completion"], None)
    assert all(kw.get("tools") == tools for _, kw in tok.calls)


def test_columns_rename_eval_split_and_lazy_rows(tmp_path):
    rows = [{"question": f"{i}+1?", "solution": i + 1} for i in range(20)]
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:15]),
                          "validation": datasets.Dataset.from_list(rows[15:])}
                         ).save_to_disk(str(folder))
    task = hf(tmp_path, path=str(folder), eval_split="validation",
              columns={"question": "prompt", "solution": "answer"})
    assert len(task.train) == 15 and len(task.test) == 5
    assert task.test[0] == {"prompt": "15+1?", "answer": "16"}
    assert task.metric == "accuracy"
    # the rows are read from the Arrow table when asked for, not copied up front
    assert not isinstance(task.train, list)
    # the held-out split is seeded: the same seed holds out the same rows
    a = hf(tmp_path, path=str(folder), split="train", test_size=3, seed=1,
           columns={"question": "prompt", "solution": "answer"})
    b = hf(tmp_path, path=str(folder), split="train", test_size=3, seed=1,
           columns={"question": "prompt", "solution": "answer"})
    assert a.test[:] == b.test[:] and a.train.digest() == b.train.digest()
    # training and held-out rows split the table: each row in exactly one, none lost
    whole = hf(tmp_path, path=str(folder), split="train", test_size=0.25, seed=3,
               columns={"question": "prompt", "solution": "answer"})
    train, test = [r["prompt"] for r in whole.train[:]], [r["prompt"] for r in whole.test[:]]
    assert len(test) == 3 and len(train) == 12 and not set(train) & set(test)
    assert sorted(train + test) == sorted(f"{i}+1?" for i in range(15))
    other = hf(tmp_path, path=str(folder), split="train", test_size=0.25, seed=4,
               columns={"question": "prompt", "solution": "answer"})
    assert other.test[:] != whole.test[:] and other.train.digest() != whole.train.digest()


def test_builder_with_data_files_and_streaming(tmp_path):
    path = write(tmp_path, rows_of("prompt_only", False, 30), "jsonl")
    task = hf(tmp_path, path="json", data_files=path, test_size=5)
    assert len(task.train) == 25
    streamed = hf(tmp_path, path=path, streaming=True, max_samples=12, test_size=2)
    assert len(streamed.train) == 10 and streamed.train[0]["prompt"].startswith("What is")
    with pytest.raises(GymError, match="data.streaming=true .* set data.max_samples"):
        hf(tmp_path, path=path, streaming=True)


# ----------------------------------------------------------------------------------------
# mixtures
# ----------------------------------------------------------------------------------------


def test_mixture_weights_seed_and_counts(tmp_path):
    a = write(tmp_path, rows_of("prompt_only", False, 40), "parquet", "a")
    b = write(tmp_path, [{"prompt": [U], "answer": "4"} for _ in range(40)], "jsonl", "b")
    mix = [{"path": a, "weight": 3.0, "name": "sums"}, {"path": b, "weight": 1.0}]
    task = hf(tmp_path, mixture=mix, test_size=4)
    counts = task.train.counts()
    assert set(counts) == {"sums", "b"} and sum(counts.values()) == 72
    assert 2.0 < counts["sums"] / counts["b"] < 4.5  # about 3:1
    same = hf(tmp_path, mixture=mix, test_size=4)
    other = hf(tmp_path, mixture=mix, test_size=4, seed=5)
    assert [r["source"] for r in task.train] == [r["source"] for r in same.train]
    assert [r["prompt"] for r in task.train[:20]] == [r["prompt"] for r in same.train[:20]]
    assert [r["source"] for r in task.train] != [r["source"] for r in other.train]
    assert len(task.test) == 8 and {r["source"] for r in task.test} == {"sums", "b"}
    assert task.metric == "accuracy"
    with pytest.raises(GymError, match=r"data.mixture\[1\].weight=0 must be a number above 0"):
        hf(tmp_path, mixture=[{"path": a}, {"path": b, "weight": 0}])


def test_mixture_counts_are_step_metrics(tmp_path, tiny_overrides):
    from gym_core.plugin.startup import compose
    from gym_core.train.job import run_job

    a = write(tmp_path, rows_of("preference", False, 20), "parquet", "a")
    b = write(tmp_path, rows_of("preference", True, 20), "arrow", "b")
    offline = [o for o in tiny_overrides if not o.startswith("algorithm.")]
    cfg = compose([*offline, "algorithm=dpo", "data=hf", "trainer.max_steps=2",
                   "trainer.batch_size=4", "trainer.eval_before=false",
                   f"data.cache_dir={tmp_path / 'cache'}",
                   f"data.mixture=[{{path:'{a}',weight:1}},{{path:'{b}',weight:1,name:chat}}]"])
    run_job(cfg, run_dir=tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert r["data/rows_a"] + r["data/rows_chat"] == 4


# ----------------------------------------------------------------------------------------
# LLaMA-Factory's dataset_info.json
# ----------------------------------------------------------------------------------------


def test_llamafactory_dataset_info(tmp_path):
    alpaca = [{"instruction": f"Add {i} and 2.", "input": "Be quick." if i % 2 else "",
               "output": str(i + 2), "history": [["hi", "hello"]], "sys": "You add."}
              for i in range(10)]
    ranked = [{"instruction": f"Add {i} and 2.", "chosen": str(i + 2), "rejected": str(i)}
              for i in range(10)]
    share = [{"conversations": [{"from": "human", "value": f"Add {i} and 2."},
                                {"from": "gpt", "value": str(i + 2)}], "system": "You add."}
             for i in range(10)]
    share_rank = [{"conversations": [{"from": "human", "value": f"Add {i} and 2."}],
                   "chosen": {"from": "gpt", "value": str(i + 2)},
                   "rejected": {"from": "gpt", "value": str(i)}} for i in range(10)]
    kto = [{"messages": [{"role": "user", "content": f"Add {i} and 2."},
                         {"role": "assistant", "content": str(i + 2 + i % 2)}],
            "ok": i % 2 == 0} for i in range(10)]
    for name, rows in [("alpaca", alpaca), ("ranked", ranked), ("share", share),
                       ("share_rank", share_rank), ("kto", kto)]:
        (tmp_path / f"{name}.json").write_text(json.dumps(rows))
    info = {
        "my_alpaca": {"file_name": "alpaca.json",
                      "columns": {"history": "history", "system": "sys"}},
        "my_ranked": {"file_name": "ranked.json", "ranking": True},
        "my_share": {"file_name": "share.json", "formatting": "sharegpt",
                     "columns": {"messages": "conversations", "system": "system"}},
        "my_share_rank": {"file_name": "share_rank.json", "formatting": "sharegpt",
                          "ranking": True},
        "my_kto": {"file_name": "kto.json", "formatting": "sharegpt",
                   "columns": {"messages": "messages", "kto_tag": "ok"},
                   "tags": {"role_tag": "role", "content_tag": "content",
                            "user_tag": "user", "assistant_tag": "assistant"}},
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))

    def load(name):
        return hf(tmp_path, dataset_info=str(tmp_path), dataset=name, test_size=2)

    t = load("my_alpaca")
    ex = next(r for r in t.train if "Be quick." in r["prompt"][-1]["content"])
    assert ex["prompt"] == [{"role": "system", "content": "You add."},
                            {"role": "user", "content": "hi"},
                            {"role": "assistant", "content": "hello"},
                            {"role": "user", "content": ex["prompt"][-1]["content"]}]
    assert ex["prompt"][-1]["content"].endswith("and 2.\nBe quick.")
    through("sft", t)
    r = load("my_ranked")
    assert set(r.train[0]) >= {"prompt", "chosen", "rejected"}
    through("dpo", r)
    s = load("my_share")
    assert s.train[0]["messages"][0] == {"role": "system", "content": "You add."}
    assert [m["role"] for m in s.train[0]["messages"]] == ["system", "user", "assistant"]
    through("sft", s)
    sr = load("my_share_rank")
    assert sr.train[0]["chosen"][0]["role"] == "assistant"
    through("orpo", sr)
    k = load("my_kto")
    assert {r["label"] for r in k.train} == {True, False}
    through("kto", k)
    with pytest.raises(GymError, match="'nope' is not in .*dataset_info.json .*my_alpaca"):
        load("nope")
    info["broken"] = {"file_name": "alpaca.json", "ranking": True}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(GymError, match=r"missing column\(s\) chosen, rejected"):
        load("broken")


# ----------------------------------------------------------------------------------------
# verifiers beyond integers
# ----------------------------------------------------------------------------------------


def test_boxed_and_math_verify_rewards():
    from gym_core.data.verify import boxed, last_boxed, math_verify

    assert last_boxed(r"so \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    ex = [{"answer": r"\frac{1}{2}"}] * 4
    outs = [r"The answer is $\boxed{\dfrac{1}{2}}$.", r"\boxed{0.5}", r"\boxed{1/3}", "half"]
    assert boxed(None, outs, ex) == [1.0, 0.0, 0.0, 0.0]
    pytest.importorskip("math_verify")
    assert math_verify(None, outs, ex) == [1.0, 1.0, 0.0, 0.0]
    sets = math_verify(None, [r"\boxed{x = 2}", r"$\{1, 2\}$"], [{"answer": "2"},
                                                                   {"answer": r"\{2, 1\}"}])
    assert sets == [1.0, 1.0]


# ----------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["missing_columns", "misnamed_rename", "wrong_type",
                                  "empty_split", "corrupt_parquet", "mixture_weight"])
def test_bad_inputs_are_one_line(tmp_path, case):
    good = write(tmp_path, rows_of("prompt_only", False), "parquet", "good")
    kw: dict = {"test_size": 2}
    if case == "missing_columns":
        kw["path"], want = write(tmp_path, [{"question": "q", "reply": "r"}] * 4, "jsonl"), \
            "columns question, reply fit no dataset type"
    elif case == "misnamed_rename":
        kw.update(path=good, columns={"query": "prompt"})
        want = "data.columns renames query, which the data does not have"
    elif case == "wrong_type":
        kw["path"] = write(tmp_path, [{"prompt": i, "answer": i} for i in range(6)], "parquet")
        want = "column 'prompt' holds int, but it must be text"
    elif case == "empty_split":
        empty = tmp_path / "empty.parquet"
        datasets.Dataset.from_dict({"prompt": [], "answer": []},
                                   features=datasets.load_dataset(
                                       "parquet", data_files=good, cache_dir=str(tmp_path / "c")
                                   )["train"].features).to_parquet(str(empty))
        kw.update(path="parquet", data_files={"train": good, "test": str(empty)},
                  eval_split="test")
        want = "the split 'test' is empty"
    elif case == "corrupt_parquet":
        bad = tmp_path / "bad.parquet"
        bad.write_bytes(Path(good).read_bytes()[:200] + b"garbage")
        kw["path"], want = str(bad), "cannot be read"
    else:
        kw["mixture"], want = [{"path": good, "weight": -1}], "weight=-1 must be a number above 0"
    with pytest.raises(GymError) as err:
        hf(tmp_path, **kw)
    assert want in str(err.value) and "\n" not in str(err.value)


def written(folder: Path) -> set[str]:
    return {p.name for p in folder.rglob("*") if p.is_file()}


def test_cli_bad_input_exit_2_nothing_written(tmp_path):
    from tests.conftest import run_cli

    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really a parquet file")
    runs = tmp_path / "runs"
    proc = run_cli(["model=tiny", "data=hf", f"data.path={bad}", "run.name=x",
                    f"run.root={runs}", f"data.cache_dir={tmp_path / 'c'}"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("gym: error:")]
    assert len(lines) == 1 and "bad.parquet" in lines[0] and "Traceback" not in proc.stderr
    assert written(runs) <= {"__main__.log", ".gym.lock"}  # Hydra's log and the run's lock
    # a hub id that is not in the local cache, offline: one line saying so
    proc = run_cli(["model=tiny", "data=hf", "data.path=someone/not-cached-anywhere",
                    f"run.root={runs}", "run.name=y", f"data.cache_dir={tmp_path / 'c'}"],
                   cwd=tmp_path, env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("gym: error:")]
    assert len(lines) == 1 and "someone/not-cached-anywhere" in lines[0]
    assert "offline" in lines[0] and "Traceback" not in proc.stderr
    assert written(runs) <= {"__main__.log", ".gym.lock"}  # Hydra's log and the run's lock


def hub_cache(cache: Path, repo: str, rows: list[dict]) -> None:
    """What an earlier online ``load_dataset(repo)`` leaves in ``cache``: the prepared
    Arrow table under ``<org>___<name>/default/0.0.0/<hash>`` (datasets' layout, which
    its offline mode searches); built here from a local file, with no hub."""
    import shutil

    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.json.json import Json

    src = cache.parent / "hub_rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    org, name = repo.split("/")
    builder = Json(cache_dir=str(cache.parent / "build"), dataset_name=name,
                   config_name="default", hash="0123abcd",
                   data_files=DataFilesDict.from_patterns({"train": [str(src)]}))
    builder.download_and_prepare()
    shutil.copytree(builder.cache_dir, cache / f"{org}___{name}" / "default" / "0.0.0" / "0123abcd")


def test_a_cached_hub_dataset_trains_offline(tmp_path):
    """HF_DATASETS_OFFLINE=1 and a hub id whose dataset is in the local cache: it loads
    (datasets finds the cached table) and the run trains on its rows."""
    from tests.conftest import run_cli

    rows = [{"prompt": f"What is {i} + 1?", "completion": str(i + 1)} for i in range(40)]
    hub_cache(tmp_path / "cache", "someorg/tiny_rows", rows)
    runs = tmp_path / "runs"
    proc = run_cli(["model=tiny", "algorithm=sft", "data=hf", "data.path=someorg/tiny_rows",
                    "data.test_size=8", f"data.cache_dir={tmp_path / 'cache'}",
                    "trainer.max_steps=1", "trainer.batch_size=2", f"run.root={runs}",
                    "run.name=offline"], cwd=tmp_path,
                   env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((runs / "offline" / "summary.json").read_text())
    assert summary["steps"] == 1


def test_the_data_page_shows_hf_mixture_and_reasoning_gym_rows(tmp_path):
    from gym_core.ui.data_view import view

    path = write(tmp_path, rows_of("preference", True), "parquet")
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    page = view(["model=tiny", "algorithm=dpo", "data=hf", f"data.path={path}", cache],
                "train", 0, 2)
    assert page.problem is None and page.total == 11 and len(page.rows) == 2
    for row in page.rows:
        labels = [s.label for s in row.sequences]
        assert labels == ["prompt", "chosen", "rejected"]
        assert "What is" in row.sequences[0].text and "<|im_start|>user" in row.sequences[0].text
    wrong = view(["model=tiny", "algorithm=grpo", "data=hf", cache,
                  f"data.path={write(tmp_path, rows_of('language_modeling', False), 'jsonl')}"])
    assert wrong.problem.startswith("algorithm=grpo needs prompts")
    mixed = view(["model=tiny", "algorithm=dpo", "data=hf", cache,
                  f"data.mixture=[{{path:'{path}',name:one}},{{path:'{path}',name:two}}]"],
                 "train", 0, 6)
    assert {r.source["source"] for r in mixed.rows} <= {"one", "two"} and mixed.total == 22
    pytest.importorskip("reasoning_gym")
    rg = view(["model=tiny", "algorithm=grpo", "data=reasoning_gym", "data.train_size=20",
               "data.test_size=4", "data.tasks={leg_counting:{weight:1}}"], "test", 0, 2)
    assert rg.problem is None and rg.total == 4
    for row in rg.rows:
        assert "<answer>" in row.sequences[0].text  # the task's system prompt, rendered
        assert row.target == row.source["answer"]


def test_the_sampler_of_a_large_dataset_is_seeded_and_resumable():
    from gym_core.data.tasks import Sampler

    n = Sampler.LARGE + 5  # numpy's permutation, made once per epoch
    a, b = Sampler(n, seed=3), Sampler(n, seed=3)
    first = a.take(6) + a.take(6)
    assert first == b.take(12) and len(set(first)) == 12 and all(0 <= i < n for i in first)
    resumed = Sampler(n, seed=3, position=6)
    assert resumed.take(6) == first[6:]
    assert Sampler(n, seed=4).take(12) != first
