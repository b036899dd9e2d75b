"""gym's half of the offline-methods benchmark: time gym's DPO, KTO, SFT or ORPO step on CPU.

The same settings as ``offline_trl.py`` (see ``offline_data.py``): SmolLM2-135M-Instruct
in fp32, LoRA r=16/alpha=32 on all seven projections, the arithmetic task, a constant
learning rate; DPO and KTO with a reference pass every step. Measured like TRL's half,
excluding the first (warm-up) step: seconds per optimizer step (tokenising + reference
pass + loss + backward + AdamW), prompt + completion tokens per second (the count both
halves share) and the process's peak resident memory.

    python benchmarks/offline_gym.py --algorithm dpo --steps 3
"""

from __future__ import annotations

import argparse
import json

from measure import train_gym
from offline_data import ALGORITHMS, BATCH, SEED, default_model_dir, gym_overrides


def run_gym(model_dir: str, *, algorithm: str, steps: int, tokens_per_step: list[int]) -> dict:
    if steps < 2:
        raise ValueError("steps must be >= 2: the first step is an untimed warm-up")
    import torch

    import gym_core
    from gym_core.plugin.startup import compose

    cfg = compose(gym_overrides(algorithm, model_dir, steps))
    run = train_gym(cfg, algorithm, [], SEED)
    rows = run["rows"]
    measured = rows[1:]
    total_sec = sum(r["step_seconds"] for r in measured)
    return {
        "impl": f"gym {gym_core.__version__}",
        "algorithm": algorithm,
        "batch": BATCH[algorithm],
        "sec_per_step": total_sec / len(measured),
        "tokens_per_sec": sum(tokens_per_step[1:steps]) / total_sec,
        "peak_rss_mib": run["peak_rss_mib"],
        "steps_timed": len(measured),
        "baseline_rss_mib": run["baseline_rss_mib"],
        "tokens_per_step": tokens_per_step[:steps],
        "step_secs": [round(r["step_seconds"], 3) for r in rows],
        "losses": [r.get("loss") for r in rows],
        "torch_threads": torch.get_num_threads(),
        "other_processes_cpu_sec": run["other_processes_cpu_sec"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithm", choices=ALGORITHMS, default="dpo")
    parser.add_argument("--model-dir", default=None, help="HF folder; default: gym's SmolLM2")
    parser.add_argument("--steps", type=int, default=3, help="including one warm-up step")
    parser.add_argument("--tokens-per-step", type=int, nargs="+", default=None,
                        help="the shared count (the orchestrator passes it); default: count here")
    args = parser.parse_args(argv)
    model_dir = args.model_dir or default_model_dir()
    tokens = args.tokens_per_step
    if tokens is None:
        from offline_data import tokens_per_step

        tokens = tokens_per_step(args.algorithm, model_dir, args.steps)
    result = run_gym(model_dir, algorithm=args.algorithm, steps=args.steps,
                     tokens_per_step=tokens)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
