"""Two gym processes on one machine: a GRPO step alone, then with a second gym run active.

The measured process is gym's half of the GRPO benchmark (``grpo_gym.py``: SmolLM2-135M
+ LoRA, 4 prompts x G=8, <= 32 tokens, one warm-up step). The neighbour is a small gym
training run (``python -m gym_core``, 1 prompt x G=8 per step, no evaluation) started
first and kept running until the measurement ends. Two settings:

- ``gym``: gym's own choice (threads from the CPUs given, divided among the gym
  processes sharing them; OpenMP spinning bounded);
- ``fixed``: every process keeps all cores' threads and libgomp's default spinning
  (``GOMP_SPINCOUNT=300000``), as gym did before.

    python benchmarks/sharing.py                 # 3 steps per measurement
    python benchmarks/sharing.py --steps 4 --json sharing.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import run_half

HERE = Path(__file__).resolve().parent


def settings(name: str, cpus: int) -> tuple[dict, list[str], list[str]]:
    """(environment, grpo_gym.py arguments, neighbour overrides) of a setting."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    if name == "fixed":
        env["GOMP_SPINCOUNT"] = "300000"  # libgomp's default
        return env, ["--threads", str(cpus)], [f"trainer.threads={cpus}"]
    return env, [], []


def start_neighbour(env: dict, overrides: list[str], root: Path) -> subprocess.Popen:
    """A small gym run, in training once this returns (its first step is logged)."""
    cmd = [sys.executable, "-m", "gym_core", "trainer.max_steps=100000",
           "trainer.batch_size=1", "trainer.eval_before=false", "trainer.save_every=null",
           "trainer.progress=false", "trainer.tensorboard=false", f"run.root={root}",
           "run.name=neighbour", *overrides]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    metrics = root / "neighbour" / "metrics.jsonl"
    deadline = time.time() + 900
    while not (metrics.is_file() and metrics.read_text().strip()):
        if proc.poll() is not None:
            raise SystemExit(f"the neighbour run failed:\n{proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise SystemExit("the neighbour run logged no step in 15 minutes")
        time.sleep(2)
    return proc


def measure(env: dict, args: list[str], steps: int) -> dict:
    old = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        return run_half(HERE / "grpo_gym.py", ["--steps", str(steps), *args])
    finally:
        os.environ.clear()
        os.environ.update(old)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="per measurement, one warm-up")
    parser.add_argument("--settings", nargs="+", default=["gym", "fixed"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rows = []
    for name in args.settings:
        env, bench_args, neighbour_overrides = settings(name, cpus)
        alone = measure(env, bench_args, args.steps)
        print(f"{name}: alone {alone['sec_per_step']:.2f} s/step", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="gym-sharing-") as root:
            neighbour = start_neighbour(env, neighbour_overrides, Path(root))
            try:
                shared = measure(env, bench_args, args.steps)
            finally:
                neighbour.terminate()
                neighbour.wait(timeout=60)
            lines = (Path(root) / "neighbour" / "metrics.jsonl").read_text().split("\n")
            neighbour_steps = [json.loads(x) for x in lines if x.strip()]
        print(f"{name}: shared {shared['sec_per_step']:.2f} s/step", file=sys.stderr, flush=True)
        rows.append({"setting": name, "alone": alone, "shared": shared,
                     "neighbour_steps": len(neighbour_steps),
                     "neighbour_sec_per_step": (sum(r["step_seconds"] for r in neighbour_steps)
                                                / max(1, len(neighbour_steps)))})
    print(f"GRPO step (SmolLM2-135M + LoRA, 4 prompts x G=8, <= 32 tokens) alone and with a "
          f"second gym run active; {cpus} CPUs, {args.steps - 1} timed steps each")
    head = (f"{'setting':<8} | {'threads':>7} | {'alone s/step':>12} | {'shared s/step':>13} | "
            f"{'slowdown':>8} | {'neighbour s/step':>16}")
    print(head)
    print("-" * len(head))
    for r in rows:
        a, s = r["alone"], r["shared"]
        print(f"{r['setting']:<8} | {a['torch_threads']!s:>3}/{s['torch_threads']!s:<3} | "
              f"{a['sec_per_step']:>12.2f} | {s['sec_per_step']:>13.2f} | "
              f"{s['sec_per_step'] / a['sec_per_step']:>7.2f}x | "
              f"{r['neighbour_sec_per_step']:>16.2f}")
    print("threads: alone/shared at the end of the measurement")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
