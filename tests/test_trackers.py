"""Experiment trackers as a plugin family (logger=[...]): TensorBoard, W&B offline, MLflow's
local store and a third-party tracker, all at once in one tiny run; files checked."""

from __future__ import annotations

import json
import os
import struct
from importlib import metadata
from pathlib import Path

import pytest

from gym_core.base.errors import GymError
from gym_core.plugin.startup import bootstrap, compose

STEPS = 2


@pytest.fixture(scope="module")
def recorder():
    eps = [*metadata.entry_points(group="gym_core"),
           metadata.EntryPoint("recorder", "tests.tracker_plugin", "gym_core")]
    bootstrap(entry_points=eps)
    yield
    bootstrap(reload=True)


@pytest.fixture(scope="module")
def tracked(recorder, tmp_path_factory):
    """One tiny run with every tracker; W&B offline as on a machine without a key."""
    from gym_core.train.job import run_job

    root = tmp_path_factory.mktemp("tracked")
    saved = {k: os.environ.pop(k, None) for k in ("WANDB_API_KEY", "MLFLOW_TRACKING_URI")}
    os.environ["WANDB_MODE"] = "offline"
    try:
        cfg = compose(["model=tiny", "trainer.eval_size=8", "trainer.batch_size=2",
                       "algorithm.num_generations=4", "algorithm.max_completion_length=8",
                       "trainer.eval_max_new_tokens=8", "trainer.progress=false",
                       f"trainer.max_steps={STEPS}", f"run.root={root}", "run.name=tracked",
                       "logger=[tensorboard,wandb,mlflow,recorder]"])
        summary = run_job(cfg, root / "tracked")
    finally:
        os.environ.pop("WANDB_MODE")
        os.environ.update({k: v for k, v in saved.items() if v is not None})
    return root / "tracked", summary


def test_tensorboard_is_the_default_and_logger_lists_select():
    from gym_core.train.trackers import open_trackers

    plugins = bootstrap()
    assert open_trackers(compose(["model=tiny"]), plugins).names == ["tensorboard"]
    assert open_trackers(compose(["logger=[]"]), plugins).names == []
    assert open_trackers(compose(["trainer.tensorboard=false"]), plugins).names == []
    both = compose(["logger=[wandb,mlflow]", "logger.wandb.project=p"])
    assert open_trackers(both, plugins).names == ["wandb", "mlflow"]
    assert both.logger.wandb.project == "p" and both.logger.mlflow.experiment == "gym"
    with pytest.raises(GymError, match="logger=nope is not an installed option"):
        compose(["logger=[nope]"])


def test_a_third_party_tracker_gets_every_call_in_order(tracked):
    run_dir, summary = tracked
    calls = [json.loads(line) for line in (run_dir / "calls.jsonl").read_text().splitlines()]
    assert [c["call"] for c in calls] == ["start", *["log_metrics"] * STEPS, "log_summary",
                                          "close"]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [c["loss"] for c in calls[1:-2]] == [m["loss"] for m in metrics]
    assert calls[-2]["artifacts"] == ["final", "summary"] and calls[-1]["ok"] is True


def test_tensorboard_events(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, summary = tracked
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert events.Scalars("eval/after")[0].step == STEPS

    def text(tag):  # the Text tab's one string
        (event,) = events.Tensors(f"{tag}/text_summary")
        return event.tensor_proto.string_val[0].decode()

    assert "```yaml\nmodel:" in text("config") and "algorithm:" in text("config")
    shown = json.loads(text("summary").removeprefix("```json\n").removesuffix("\n```"))
    assert shown["eval"]["after"] == summary["eval"]["after"]
    assert f"final: `{run_dir / 'final'}`" in text("artifacts")


def wandb_records(run_dir: Path):
    """The records of the offline W&B run (its .wandb file: W&B's LevelDB-style log of
    protobuf records, 32 KiB blocks of [crc32, length, type] chunks after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    raw, i, buf = file.read_bytes(), 7, b""
    assert raw[:4] == b":W&B"
    while i + 7 <= len(raw):
        left = 32768 - i % 32768
        if left < 7:
            i += left
            continue
        _, n, kind = struct.unpack("<IHB", raw[i:i + 7])
        buf, i = buf + raw[i + 7:i + 7 + n], i + 7 + n
        if kind == 0 and n == 0:
            break
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def key(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_run_in_the_run_folder(tracked):
    run_dir, summary = tracked
    records = list(wandb_records(run_dir))
    by_kind = {}
    for r in records:
        by_kind.setdefault(r.WhichOneof("record_type"), []).append(r)
    (record,) = by_kind["run"]
    run = record.run
    assert run.display_name == "tracked" and run.project == "gym"
    config_keys = {key(item) for item in run.config.update}
    assert {"algorithm", "model", "trainer"} <= config_keys
    rows = [{key(i): json.loads(i.value_json) for i in h.history.item}
            for h in by_kind["history"]]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["_step"], r["loss"]) for r in rows] == [(m["step"], m["loss"]) for m in metrics]
    summary_keys = {key(i) for s in by_kind["summary"] for i in s.summary.update}
    assert {"eval.before", "eval.after", "steps"} <= summary_keys
    (record,) = by_kind["artifact"]
    artifact = record.artifact
    paths = {m.path for m in artifact.manifest.contents}
    assert {"final/adapter_model.safetensors", "final/gym.json", "summary/summary.json"} <= paths
    assert by_kind["exit"][0].exit.exit_code == 0


def test_mlflow_local_store(tracked):
    from mlflow.tracking import MlflowClient

    run_dir, summary = tracked
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.params["algorithm.name"] == "grpo"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    assert run.data.metrics["summary.eval.after"] == summary["eval"]["after"]
    root = Path(run.info.artifact_uri.removeprefix("file://"))
    assert root.is_relative_to(run_dir.parent / "mlartifacts")
    assert (root / "final" / "adapter_model.safetensors").is_file()
    assert json.loads((root / "summary.json").read_text())["steps"] == STEPS
    assert (root / "config.yaml").read_text().startswith("model:")
