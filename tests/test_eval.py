"""python -m gym_core.eval: every model kind (base, run, delta:, checkpoints, exported
folder, served variant), every task kind (data options, jsonl:, lm_eval:), greedy
accuracy and pass@k / avg@n, the results store (cache, force, concurrent writers), and
evaluation during training (eval_every, keep_best, objective)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from math import comb

import pytest
from omegaconf import OmegaConf

from gym_core.base.errors import GymError
from gym_core.eval.scoring import Settings, pass_at_k, summarise
from gym_core.eval.store import Store
from tests.conftest import REPO, compose

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUICK = ["model=tiny", "algorithm=dpo", "algorithm.lr=1e-2", "trainer.batch_size=2",
         "trainer.eval_size=4", "trainer.eval_before=false", "trainer.progress=false",
         "trainer.tensorboard=false", "trainer.eval_max_new_tokens=6", "quant=bitdelta"]


def eval_cfg(overrides):
    from hydra.core.config_store import ConfigStore

    from gym_core.eval.config import EvalConfig

    ConfigStore.instance().store(name="eval_schema", node=EvalConfig, package="eval")
    return compose(["model=tiny", *overrides], config_name="eval")


def evaluate(overrides):
    from gym_core.eval.runner import evaluate as run
    from gym_core.plugin.startup import bootstrap

    return run(eval_cfg(overrides), bootstrap(), log=lambda m: None)


def values(report, **where):
    return {(r.model, r.step, r.task, r.metric): r.value for r in report.rows
            if all(getattr(r, k) == v for k, v in where.items())}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step LoRA DPO run (BitDelta delta), scored every 2 steps during training,
    keeping the checkpoint of its lowest loss with keep_last=1; its export; a JSONL task."""
    from gym_core.export import ExportAppConfig, export
    from gym_core.plugin.startup import bootstrap
    from gym_core.train.job import run_job

    root = tmp_path_factory.mktemp("evalruns")
    cfg = compose([*QUICK, "trainer.max_steps=4", "trainer.save_every=1",
                   "trainer.keep_last=1", "trainer.eval_every=2", f"run.root={root}",
                   "trainer.keep_best=loss", "trainer.keep_best_mode=min",
                   "trainer.objective=eval/data/accuracy"])
    run = root / "first"
    summary = run_job(cfg, run_dir=run)
    (run / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    out = root / "exported"
    export(OmegaConf.structured(ExportAppConfig(run=str(run), out=str(out))), bootstrap())
    data = root / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"Write {i} digits", "target": i}) + "\n"
                            for i in range(1, 7)))
    return {"root": root, "run": run, "export": out, "data": data, "summary": summary}


def test_pass_at_k_is_the_unbiased_estimator():
    for n, c, k in [(5, 2, 1), (5, 2, 2), (10, 3, 4), (6, 0, 3), (6, 6, 2), (7, 5, 3)]:
        # the share of k-subsets of the n samples holding at least one correct one
        subsets = list(itertools.combinations([1] * c + [0] * (n - c), k))
        brute = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute)
        assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k))
    s = Settings(n=4, ks=(1, 2, 4))
    got = summarise([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], s, "accuracy")
    assert got["pass@1"] == pytest.approx(got["avg@4"]) == pytest.approx(3 / 12)
    assert got["pass@2"] == pytest.approx((0.5 + (1 - 1 / 6) + 0) / 3)
    assert got["pass@4"] == pytest.approx(2 / 3)
    assert summarise([[1.0], [0.0]], Settings(), "accuracy") == {"accuracy": 0.5}
    with pytest.raises(GymError, match="eval.k"):
        Settings(n=2, ks=(4,)).check()


def test_eval_every_keep_best_and_objective(trained):
    run = trained["run"]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/data/accuracy" in r] == [2, 4]
    assert all("eval/data/accuracy" not in r for r in rows if r["step"] % 2)
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    losses = {r["step"]: r["loss"] for r in rows}
    assert best["step"] == min(losses, key=losses.get) and best["metric"] == "loss"
    from gym_core.train.checkpoint import list_checkpoints

    assert {s for s, _ in list_checkpoints(run)} == {best["step"], 4}  # keep_last=1 + best
    stored = Store(trained["root"]).query(source="train")
    assert sorted((r.step, r.task, r.metric) for r in stored) == [
        (2, "data", "accuracy"), (4, "data", "accuracy")]
    assert stored[0].model == str(run.resolve()) and stored[0].examples == 4
    last = [r for r in rows if "eval/data/accuracy" in r][-1]["eval/data/accuracy"]
    assert trained["summary"]["objective"] == last


@pytest.fixture
def digits(with_digit_reward):
    return None


def test_every_model_kind_on_data_and_jsonl_tasks(trained, digits):
    run, root = trained["run"], trained["root"]
    common = [f"eval.root={root}", "eval.max_new_tokens=6", "eval.limit=4",
              "eval.prompt_field=question", "eval.answer_field=target",
              "eval.verifier=digit_share", "eval.pass_threshold=0.01"]
    models = ["base", str(run), f"delta:{run}", str(run / "checkpoints"),
              str(trained["export"])]
    tasks = ["data", f"jsonl:{trained['data']}"]
    report = evaluate([*common, f"eval.models=[{','.join(models)}]",
                       f"eval.tasks=[{','.join(tasks)}]"])
    assert not report.failures
    # the data task of the run's steps was scored in training, and the final model is its
    # step-4 checkpoint: read from the store, not scored again
    assert {i for i, r in enumerate(report.rows) if r.source == "train"} <= report.cached
    assert {report.rows[i].model for i in report.cached} == {str(run.resolve())}
    got = values(report, metric="digit_share")
    key = str(run.resolve())
    steps = sorted(s for m, s, _, _ in got if m == key)
    best = json.loads((run / "checkpoints" / "best.json").read_text())["step"]
    assert steps == sorted({best, 4})  # the final model and every checkpoint
    jsonl = f"jsonl:{trained['data']}"
    final = got[(key, 4, jsonl, "digit_share")]
    # the run's final/ (adapter merged), its last checkpoint and its export: one model
    assert got[(str(trained["export"].resolve()), -1, jsonl, "digit_share")] == final
    from gym_core.eval.models import resolve

    ckpt = resolve(str(run / "checkpoints"), eval_cfg([]).model, None)[-1]
    assert ckpt.kind == "checkpoint" and ckpt.step == 4
    assert (f"{key}#bitdelta", 4, jsonl, "digit_share") in got
    assert ("base:tiny-llama", 0, jsonl, "digit_share") in got
    assert any(v > 0 for v in got.values())  # the verifier has signal on this model
    assert {r.examples for r in report.rows} == {4}
    # the training run's own evaluation of step 4 is the same result, read from the store
    again = evaluate([*common, f"eval.models=[{run / 'checkpoints' / 'step-000004'}]",
                      "eval.tasks=[data]"])
    assert again.cached == {0} and again.rows[0].source == "train"
    # everything again: cached; eval.force=true: scored again, the same values
    cached = evaluate([*common, f"eval.models=[{','.join(models)}]",
                       f"eval.tasks=[{','.join(tasks)}]"])
    assert cached.cached == set(range(len(cached.rows))) and values(cached) == values(report)
    forced = evaluate([*common, f"eval.models=[{run}]", f"eval.tasks=[{jsonl}]",
                       "eval.force=true"])
    assert not forced.cached and values(forced) == {k: v for k, v in values(report).items()
                                                    if k[0] == key and k[1] == 4
                                                    and k[2] == jsonl}


def test_sampled_pass_at_k_is_seeded_and_batch_independent(trained, digits):
    common = [f"eval.root={trained['root']}", "eval.models=[base]",
              f"eval.tasks=[jsonl:{trained['data']}]", "eval.prompt_field=question",
              "eval.answer_field=target", "eval.verifier=digit_share",
              "eval.pass_threshold=0.05", "eval.n=4", "eval.k=[1,2,4]",
              "eval.max_new_tokens=6", "eval.force=true"]
    a = values(evaluate([*common, "eval.batch_size=4"]))
    b = values(evaluate([*common, "eval.batch_size=24"]))
    assert a == b
    by = {k[3]: v for k, v in a.items()}
    assert set(by) == {"pass@1", "pass@2", "pass@4", "avg@4"}
    assert by["pass@1"] <= by["pass@2"] <= by["pass@4"] and by["pass@4"] > 0
    c = values(evaluate([*common, "eval.seed=1"]))
    assert c != a  # another seed, other samples


def test_bad_names_are_one_line_errors(trained, tmp_path):
    root = [f"eval.root={tmp_path}"]
    with pytest.raises(GymError, match="'nope' is not a task"):
        evaluate([*root, "eval.tasks=[nope]"])
    fake = tmp_path / "x" / "checkpoints" / "step-000005"
    fake.mkdir(parents=True)
    (tmp_path / "x" / ".hydra").mkdir()
    (tmp_path / "x" / ".hydra" / "config.yaml").write_text("model: {source: tiny}\n")
    with pytest.raises(GymError, match="not a complete checkpoint"):
        evaluate([*root, f"eval.models=[{fake}]"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(GymError, match="is not a run folder"):
        evaluate([*root, f"eval.models=[{tmp_path / 'empty'}]"])
    with pytest.raises(GymError, match="does not answer"):
        evaluate([*root, "eval.models=[served:x]", "eval.server=http://127.0.0.1:9"])


def test_models_of_another_base_are_refused_before_anything_loads(trained, tmp_path):
    """Every model kind whose base model is not eval's (model=tiny here), or whose base
    cannot be established, is one error naming the entry, its base and eval's."""
    import shutil

    from gym_core.eval.models import resolve

    mine = eval_cfg([]).model
    # the trained run as if trained on a wider tiny model: its record and its config say so
    other = tmp_path / "other"
    shutil.copytree(trained["run"], other)
    record = json.loads((other / "final" / "gym.json").read_text())
    record["base"]["tiny"]["hidden_size"] = 32
    (other / "final" / "gym.json").write_text(json.dumps(record))
    cfg = OmegaConf.load(other / ".hydra" / "config.yaml")
    cfg.model.tiny.hidden_size = 32
    OmegaConf.save(cfg, other / ".hydra" / "config.yaml")
    step = other / "checkpoints" / "step-000004"
    for spec in (str(other), f"delta:{other}", str(other / "checkpoints"), str(step)):
        with pytest.raises(GymError, match="another base") as e:
            resolve(spec, mine, None)
        assert repr(spec) in str(e.value) and "'hidden_size': 32" in str(e.value)
        assert "'hidden_size': 64" in str(e.value) and "\n" not in str(e.value)
    # exported folders record their run's base model
    export = tmp_path / "export"
    shutil.copytree(trained["export"], export)
    assert resolve(str(export), mine, None)[0].kind == "folder"
    meta = json.loads((export / "gym_export.json").read_text())
    meta["base_model"] = record["base"]
    (export / "gym_export.json").write_text(json.dumps(meta))
    with pytest.raises(GymError, match="another base.*'hidden_size': 32"):
        resolve(str(export), mine, None)
    del meta["base_model"]  # an older export: its run's record says, while the run is there
    meta["run"] = str(tmp_path / "gone")
    (export / "gym_export.json").write_text(json.dumps(meta))
    with pytest.raises(GymError, match="cannot be established"):
        resolve(str(export), mine, None)
    # a model folder gym did not export is its own base (model=local model.path=it)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    with pytest.raises(GymError, match=f"another base \\(model=local model.path={plain}\\)"):
        resolve(str(plain), mine, None)
    # a LoRA adapter folder is of its base folder's base
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    shutil.copy(trained["run"] / "final" / "adapter_model.safetensors", adapter)
    conf = json.loads((trained["run"] / "final" / "adapter_config.json").read_text())
    for base, ok in ((trained["export"], True), (plain, False), (tmp_path / "nowhere", None)):
        conf["base_model_name_or_path"] = str(base)
        (adapter / "adapter_config.json").write_text(json.dumps(conf))
        if ok:
            assert resolve(str(adapter), mine, None)[0].kind == "folder"
            continue
        with pytest.raises(GymError, match="another base" if ok is False
                           else "cannot be established"):
            resolve(str(adapter), mine, None)


def test_cli_table_json_and_a_failing_task_keeps_the_others(trained, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "gym_core.eval", "model=tiny", f"eval.root={tmp_path}",
            "eval.limit=3", "eval.max_new_tokens=4",
            f"eval.tasks=[arithmetic,jsonl:{tmp_path / 'missing.jsonl'}]"]
    got = subprocess.run([*args, "--json"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=600)
    assert got.returncode == 2, got.stderr
    out = json.loads(got.stdout)
    assert [(r["task"], r["metric"], r["examples"]) for r in out["results"]] == [
        ("arithmetic", "accuracy", 3)]
    assert "missing.jsonl" in out["failures"][0]
    errors = [x for x in got.stderr.splitlines() if x.startswith("gym: error:")]
    assert len(errors) == 1 and "does not exist" in errors[0]
    assert Store(tmp_path).query(task="arithmetic")  # stored although another task failed
    # bad names, a model of another base among them: one line and exit 2 before anything
    # is scored; what the store holds stays
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    for bad, says in ((f"eval.models=[base,{plain}]", f"'{plain}': the model folder {plain} "
                       "is of another base"), ("eval.tasks=[nope]", "'nope' is not a task")):
        got = subprocess.run([*args, bad], capture_output=True, text=True, env=env,
                             cwd=tmp_path, timeout=600)
        errors = [x for x in got.stderr.splitlines() if x.startswith("gym: error:")]
        assert got.returncode == 2 and not got.stdout and len(errors) == 1, got.stderr
        assert says in errors[0], errors[0]
    assert len(Store(tmp_path).query(task="arithmetic")) == 1
    from gym_core.eval.runner import Report

    table = Report(Store(tmp_path).query(), cached={0}).table()
    assert "base:tiny-llama" in table and "arithmetic" in table and "(cached)" in table


WRITER = """
import sys
from gym_core.eval.store import Row, Store
store = Store(sys.argv[1])
for i in range(40):
    store.write([Row("m" + sys.argv[2], None, i, "t", metric, float(i), 1, "d", {}, 0.0)
                 for metric in ("a", "b", "c")])
"""


def test_store_under_concurrent_writers(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(w)], env=env)
             for w in range(4)]
    seen = []
    while any(p.poll() is None for p in procs):  # a reader never sees half a transaction
        seen.append(len(Store(tmp_path).query()))
        time.sleep(0.01)  # a polling reader, not a hog of the writers' CPUs
    assert [p.wait() for p in procs] == [0] * 4
    rows = Store(tmp_path).query()
    assert len(rows) == 4 * 40 * 3
    assert all(n % 3 == 0 for n in seen)
    assert len({(r.model, r.step, r.metric) for r in rows}) == len(rows)
    import sqlite3

    mode = sqlite3.connect(tmp_path / "results.sqlite").execute("PRAGMA journal_mode").fetchone()
    assert mode[0] == "wal"


def test_served_variant_through_the_api_and_lm_eval_local_completions(trained, digits,
                                                                       tmp_path):
    """A run served by python -m gym_core.serve scores as the run does locally: gym's
    own client (chat completions) on a JSONL task, and the harness's local-completions
    model on a generate_until task."""
    from tests.serve_helpers import ServerProcess
    from tests.test_eval_harness import write_tasks

    write_tasks(tmp_path / "tasks", tmp_path / "data")
    run = trained["run"]
    srv = ServerProcess(["--base", "tiny", "--variants", f"v={run}"], cwd=tmp_path)
    try:
        assert srv.url, srv.output
        common = [f"eval.root={tmp_path}", "eval.max_new_tokens=6",
                  f"eval.server={srv.url}", "eval.prompt_field=question",
                  "eval.answer_field=target", "eval.verifier=digit_share",
                  f"eval.tokenizer={run / 'final'}", "eval.lm_eval_builtin=false",
                  f"eval.lm_eval_include=[{tmp_path / 'tasks'}]",
                  f"eval.models=[served:v,{run}]",
                  f"eval.tasks=[jsonl:{trained['data']},lm_eval:gym_gen]"]
        report = evaluate(common)
        assert not report.failures, report.failures
        got = values(report)
        served = {(t, m): v for (k, _, t, m), v in got.items() if k.startswith("served:")}
        local = {(t, m): v for (k, _, t, m), v in got.items() if not k.startswith("served:")}
        assert served.keys() == local.keys() and ("lm_eval:gym_gen", "exact_match") in served
        for key, value in served.items():
            assert value == pytest.approx(local[key], abs=1e-6), key
        with pytest.raises(GymError, match="serves no model 'nope'"):
            evaluate([*common[:3], "eval.models=[served:nope]"])
        # the server reports its base model (/v1/models): eval configured for another
        # base refuses its base and its variants alike
        for name in ("tiny", "v"):
            with pytest.raises(GymError, match=f"served:{name}'.*another base.*"
                               "'hidden_size': 64.*'hidden_size': 32"):
                evaluate([*common[:3], f"eval.models=[served:{name}]",
                          "model.tiny.hidden_size=32"])
    finally:
        srv.stop()


def test_a_served_model_whose_base_is_not_reported_is_refused(tmp_path):
    """An OpenAI server that does not say which base its models sit on (not gym's)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Models(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Models)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        with pytest.raises(GymError, match="'served:m'.*base model of the served model 'm' "
                           "cannot be established.*does not report it"):
            evaluate([f"eval.root={tmp_path}", "eval.models=[served:m]", f"eval.server={url}"])
    finally:
        httpd.shutdown()


def test_lm_eval_tasks_whose_data_is_missing_fail_alone(tmp_path):
    """A harness task whose local file is gone, or whose hub data set is not on this
    machine: each is a one-line failure naming the task, and the other task's results
    are reported and stored."""
    from tests.test_eval_harness import write_tasks

    write_tasks(tmp_path / "tasks", tmp_path / "data")
    (tmp_path / "data" / "qa.jsonl").unlink()
    (tmp_path / "tasks" / "hub.yaml").write_text(
        "task: gym_hub\ndataset_path: nobody/not-on-this-machine\ntest_split: test\n"
        "output_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        "metric_list:\n  - metric: exact_match\n")
    report = evaluate([f"eval.root={tmp_path}", "eval.models=[base]", "eval.limit=2",
                       "eval.max_new_tokens=4", "eval.lm_eval_builtin=false",
                       f"eval.lm_eval_include=[{tmp_path / 'tasks'}]",
                       "eval.tasks=[lm_eval:gym_gen,lm_eval:gym_hub,arithmetic]"])
    assert [(r.task, r.metric) for r in report.rows] == [("arithmetic", "accuracy")]
    assert len(report.failures) == 2
    gen, hub = report.failures
    assert "lm_eval:gym_gen" in gen and "qa.jsonl" in gen and "\n" not in gen
    assert "lm_eval:gym_hub" in hub and "not-on-this-machine" in hub and "\n" not in hub
    assert [r.task for r in Store(tmp_path).query()] == ["arithmetic"]
