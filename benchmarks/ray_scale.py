"""Ray on this machine (docs/scale.md "Ray"): what running on Ray costs and what the
asynchronous rollouts and the weight-sync codecs give, each part a set of real runs of
``python -m gym_core`` one after the other (never two at once), read back from their
``metrics.jsonl`` and ``summary.json``.

    python benchmarks/ray_scale.py --parts overhead async codecs [--model smollm2] [--json ray.json]

- ``overhead``: the same GRPO job with 2 ranks under ``torchrun --nproc_per_node=2`` and
  under Ray Train (``trainer.backend=ray ray.num_workers=2``, a local cluster the job
  starts): median seconds per step (the first step left out) and the wall time of the
  command (start-up included).
- ``async``: the main job (GRPO, 30 steps of 4 prompts x 8 completions on arithmetic, LoRA
  r16) sampled by the trainer itself (2 threads), by 1 rollout actor synchronously
  (``rollout.max_staleness=0``) and by 1 actor one step ahead (``max_staleness=1``); the
  trainer and the actor one thread each. Median step seconds, mean reward of the last 5
  steps, held-out accuracy after.
- ``codecs``: the ``max_staleness=1`` run once per ``rollout.weight_sync`` codec: the
  reward curve (mean reward of steps 1-10, 11-20, 21-30), held-out accuracy after, and the
  bytes and seconds of a sync as the run logged them. (``benchmarks/weight_sync.py``
  times the codecs alone.)

Run it on an idle machine: the seconds are wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: the main job's GRPO (README "What the main job does"), without the quantizer
MAIN = ["algorithm=grpo", "quant=none", "trainer.eval_before=false", "trainer.save_every=null",
        "trainer.progress=false", "trainer.rollout_buffer=false"]


def run(args: list[str], root: Path, name: str, nproc: int | None = None) -> dict:
    """One run of gym in ``root``; its per-step rows, summary and wall seconds."""
    head = [sys.executable, "-m", "gym_core"]
    if nproc:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}", "-m", "gym_core"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH"))
                                         if p)}
    t0 = time.perf_counter()
    proc = subprocess.run([*head, *args, f"run.name={name}", f"run.root={root}"], cwd=root,
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"benchmarks/ray_scale.py: {name} failed:\n{proc.stderr[-3000:]}")
    run_dir = root / name
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"  {name}: {len(rows)} steps, {wall:.0f} s", file=sys.stderr, flush=True)
    return {"rows": rows, "summary": summary, "wall": wall}


def step_seconds(r: dict) -> float:
    return statistics.median(x["step_seconds"] for x in r["rows"][1:])


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def overhead(model: list[str], root: Path, steps: int) -> list[dict]:
    args = [*model, *MAIN, f"trainer.max_steps={steps}", "trainer.threads=1",
            "trainer.eval_size=8"]
    tr = run(args, root, "torchrun", nproc=2)
    ray = run([*args, "trainer.backend=ray", "ray.num_workers=2"], root, "ray-train")
    out = []
    for label, r in (("torchrun, 2 ranks", tr), ("Ray Train, 2 workers", ray)):
        out.append({"run": label, "step_s": step_seconds(r), "wall_s": r["wall"],
                    "loss_last": r["rows"][-1]["loss"]})
    return out


def async_part(model: list[str], root: Path, steps: int, codecs: list[str],
               baselines: bool) -> tuple[list, list]:
    """``baselines``: also the trainer sampling itself and the synchronous actor."""
    base = [*model, *MAIN, f"trainer.max_steps={steps}"]
    runs = {}
    if baselines:
        runs["trainer samples (2 threads)"] = run([*base, "trainer.threads=2"], root, "local")
        runs["1 actor, k=0 (lora sync)"] = run(
            [*base, "trainer.threads=1", "rollout.workers=1", "rollout.max_staleness=0",
             "rollout.weight_sync=lora"], root, "actor-k0")
    for codec in codecs:
        runs[f"1 actor, k=1 ({codec} sync)"] = run(
            [*base, "trainer.threads=1", "rollout.workers=1", "rollout.max_staleness=1",
             f"rollout.weight_sync={codec}"], root, f"actor-k1-{codec}")
    table, curves = [], []
    for label, r in runs.items():
        rows = r["rows"]
        table.append({
            "run": label, "step_s": step_seconds(r),
            "wait_s": statistics.median(x["generate_seconds"] for x in rows[1:]),
            "reward_last5": mean(x["reward_mean"] for x in rows[-5:]),
            "heldout_after": r["summary"]["eval"]["after"],
            "staleness": mean(x.get("staleness", 0.0) for x in rows[1:])})
        if "actor" in label:
            syncs = [x for x in rows[1:] if x.get("sync_bytes")]
            thirds = [rows[i:i + 10] for i in range(0, len(rows), 10)]
            curves.append({
                "run": label, "reward_by_10": [round(mean(x["reward_mean"] for x in t), 3)
                                               for t in thirds],
                "heldout_after": r["summary"]["eval"]["after"],
                "sync_mb": mean(x["sync_bytes"] for x in syncs) / 1e6 if syncs else 0.0,
                "sync_s": mean(x["sync_seconds"] for x in syncs) if syncs else 0.0})
    return table, curves


def show(title: str, rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(rows[0])
    print(f"\n{title}\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", nargs="+", default=["overhead", "async", "codecs"],
                    choices=["overhead", "async", "codecs"])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    ap.add_argument("--steps", type=int, default=30, help="steps of the async runs")
    ap.add_argument("--overhead-steps", type=int, default=6)
    ap.add_argument("--codecs", nargs="+", default=["lora", "int8", "deltaquant", "bitdelta"])
    ap.add_argument("--keep", help="keep the run folders here (default: a temporary folder)")
    ap.add_argument("--json", help="write the tables here")
    args = ap.parse_args()
    model = [f"model={args.model}"]
    if args.model == "tiny":
        model.append("trainer.eval_size=16")
    results = {}
    with tempfile.TemporaryDirectory(prefix="gym-ray-bench-") as tmp:
        root = Path(args.keep or tmp).resolve()
        root.mkdir(parents=True, exist_ok=True)
        if "overhead" in args.parts:
            results["overhead"] = overhead(model, root, args.overhead_steps)
        if "async" in args.parts or "codecs" in args.parts:
            codecs = args.codecs if "codecs" in args.parts else ["lora"]
            results["async"], results["codecs"] = async_part(model, root, args.steps, codecs,
                                                             "async" in args.parts)
    show("Ray Train against torchrun (2 ranks, GRPO)", results.get("overhead", []))
    show(f"Rollouts in an actor ({args.steps} GRPO steps)", results.get("async", []))
    show("Weight-sync codecs (1 actor, k=1)", results.get("codecs", []))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
