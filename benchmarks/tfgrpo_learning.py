"""Does training-free GRPO learn at SmolLM2's size? (issue 26, "Learning measured";
docs/algorithms.md §8.7.) ``gym_core.serve`` is the API: it serves SmolLM2-135M-Instruct
and an SFT variant of it behind a key; ``algorithm=cl_grpo policy=api llm=policy`` runs
a few steps per seed, the same endpoint answering, summarising and writing the library
operations under their JSON schema (constrained decoding in the server).

Per run it reads back what the run recorded: the library's size after every step
(``metrics.jsonl``), the held-out score before training (the empty library: without)
and after (the final library: with), the API tokens and their cost at the prices given
(``--input-price`` / ``--output-price``, USD per million tokens; default DeepSeek's, the
paper's policy), and prints one markdown row per run. ``<run>/reflections/step-N.json``
holds what the lesson LLM read and wrote at each step, ``<run>/experiences/library.json``
the library.

    python -m gym_core algorithm=sft data=arithmetic run.name=sft      # the variant, first
    python benchmarks/tfgrpo_learning.py --sft runs/sft --task arithmetic --seeds 0 1 2
    python benchmarks/tfgrpo_learning.py --sft runs/sft --task leg_counting --policy smollm2

Each run is ``python -m gym_core`` under ``nice -n 19``; ``--pids FILE`` keeps the
server's and the current run's process ids there (one per line), so they can be paused.
A run already finished under ``--root`` is read back, not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

#: the held-out task of each --task: its data= overrides and reward
TASKS = {
    "arithmetic": ["data=arithmetic"],
    "leg_counting": ["data=reasoning_gym",
                     "data.tasks={leg_counting:{weight:1,min_animals:1,max_animals:2}}",
                     "algorithm.rewards=[reasoning_gym]"],
    "basic_arithmetic": ["data=reasoning_gym",
                         "data.tasks={basic_arithmetic:{weight:1,min_terms:2,max_terms:2,"
                         "min_digits:1,max_digits:1,operators:['+','-'],"
                         "allow_parentheses:false,allow_negation:false}}",
                         "algorithm.rewards=[reasoning_gym]"],
}


def write_pids(path: str | None, pids: list[int]) -> None:
    if path:
        Path(path).write_text("".join(f"{p}\n" for p in pids))


def start_server(sft: Path, key: str, log: Path, pids: str | None):
    env = {**os.environ, "GYM_SERVE_API_KEY": key}
    fh = log.open("w")
    proc = subprocess.Popen(["nice", "-n", "19", sys.executable, "-m", "gym_core.serve",
                             "--base", "smollm2", "--variants", f"sft={sft / 'final'}",
                             "--port", "0"], stdout=fh, stderr=subprocess.STDOUT, env=env)
    write_pids(pids, [proc.pid])
    for _ in range(900):
        text = log.read_text()
        m = re.search(r"listening on (http://\S+/v1)", text)
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            raise SystemExit(f"the server stopped: {text[-2000:]}")
        time.sleep(1)
    proc.terminate()
    raise SystemExit(f"the server did not start in 900 s; see {log}")


def run_one(args, url: str, key: str, server_pid: int | None, task: str, seed: int) -> Path:
    name = f"{task}-{args.policy}-s{seed}"
    run_dir = Path(args.root) / name
    if (run_dir / "summary.json").is_file():
        return run_dir
    cmd = ["nice", "-n", "19", sys.executable, "-m", "gym_core", "algorithm=cl_grpo",
           *TASKS[task], "model=smollm2", "policy=api", f"policy.base_url={url}",
           f"policy.model={args.policy}", "policy.api_key_env=TFGRPO_KEY",
           f"policy.input_price={args.input_price}", f"policy.output_price={args.output_price}",
           f"policy.timeout_s={args.timeout}", "policy.concurrency=16", "llm=policy",
           f"llm.max_new_tokens={args.llm_tokens}", "llm.temperature=0.7",
           f"algorithm.summary_max_new_tokens={args.summary_tokens}",
           f"algorithm.num_generations={args.generations}",
           f"algorithm.max_completion_length={args.completion_tokens}",
           f"trainer.batch_size={args.batch_size}", f"trainer.max_steps={args.steps}",
           f"trainer.seed={seed}", f"trainer.eval_size={args.eval_size}",
           f"trainer.eval_max_new_tokens={args.completion_tokens}", "trainer.save_every=1",
           "trainer.threads=1", "logger=[]", "trainer.progress=false",
           f"run.root={args.root}", f"run.name={name}", *args.set]
    log = Path(args.root) / f"{name}.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, "TFGRPO_KEY": key})
        write_pids(args.pids, [p for p in (server_pid, proc.pid) if p])
        rc = proc.wait()
    write_pids(args.pids, [server_pid] if server_pid else [])
    if rc:
        raise SystemExit(f"{name} failed ({rc}); see {log}")
    return run_dir


def read_run(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    steps = [r for r in rows if "library_size" in r]
    stats = summary["algorithm_stats"]
    return {
        "run": run_dir.name,
        "library_sizes": [int(r["library_size"]) for r in steps],
        "reward_mean": [round(r.get("reward", r.get("reward_mean", float("nan"))), 3)
                        for r in steps],
        "groups_kept": [int(r["groups_kept"]) for r in steps],
        "lessons": [int(r["lessons"]) for r in steps],
        "ops_added": [int(r["ops_added"]) for r in steps],
        "before": summary["eval"]["before"], "after": summary["eval"]["after"],
        "test_examples": summary["eval"]["test_examples"],
        "input_tokens": stats.get("api_input_tokens"),
        "output_tokens": stats.get("api_output_tokens"),
        "cost_usd": stats.get("api_cost_usd"),
    }


def row(task: str, policy: str, seed: int, r: dict) -> str:
    return (f"| {task} | {policy} | {seed} | {' '.join(map(str, r['library_sizes']))} | "
            f"{r['before']:.3f} | {r['after']:.3f} | {r['input_tokens']:,} / "
            f"{r['output_tokens']:,} | {r['cost_usd']:.4f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft", required=True, type=Path, help="the SFT run (its final/ is served)")
    ap.add_argument("--task", default="arithmetic", choices=sorted(TASKS))
    ap.add_argument("--policy", default="sft", help="the served model: sft or smollm2")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--eval-size", type=int, default=50)
    ap.add_argument("--completion-tokens", type=int, default=48)
    ap.add_argument("--summary-tokens", type=int, default=96)
    ap.add_argument("--llm-tokens", type=int, default=160)
    ap.add_argument("--input-price", type=float, default=0.28)  # DeepSeek-V3.x, USD / M tokens
    ap.add_argument("--output-price", type=float, default=0.42)
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--root", default="runs")
    ap.add_argument("--url", default=None, help="a running server (its key in $GYM_SERVE_API_KEY)")
    ap.add_argument("--pids", default=None, help="keep the server's and run's pids here")
    ap.add_argument("--set", nargs="*", default=[], help="more overrides for every run")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    Path(args.root).mkdir(parents=True, exist_ok=True)
    server = None
    key = os.environ.get("GYM_SERVE_API_KEY") or secrets.token_hex(16)
    url = args.url
    if url is None:
        server, url = start_server(args.sft.resolve(), key, Path(args.root) / "serve.log",
                                   args.pids)
    results = []
    try:
        print("| task | policy | seed | library size per step | held-out without | with "
              "| API tokens in / out | cost (USD) |")
        print("|---|---|---|---|---|---|---|---|")
        for seed in args.seeds:
            run_dir = run_one(args, url, key, server.pid if server else None, args.task, seed)
            r = read_run(run_dir)
            results.append({"task": args.task, "policy": args.policy, "seed": seed, **r})
            print(row(args.task, args.policy, seed, r), flush=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
            write_pids(args.pids, [])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
