"""GRPO step, gym vs TRL, on this machine, in one run: seconds per step, completion tokens
per second and peak memory, with ratios.

Each measurement runs in its own fresh process (peak memory is a per-process high-water
mark), one after another (never two at once: contending OpenMP thread pools distort
timings far beyond their share of the CPU).

    pip install -e '.[bench]' && python benchmarks/grpo.py            # default: 4 steps
    python benchmarks/grpo.py --steps 6 --json results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from measure import ratio_table, run_half

HERE = Path(__file__).resolve().parent


def measure(script: str, beta: float, steps: int) -> dict:
    return run_half(HERE / script, ["--beta", str(beta), "--steps", str(steps)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="per run, one of them warm-up")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.04])
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    results = []
    for beta in args.betas:
        gym = measure("grpo_gym.py", beta, args.steps)
        trl = measure("grpo_trl.py", beta, args.steps)
        results.append((gym, trl))
        print(f"beta {beta}: gym {gym['sec_per_step']:.2f} s/step, "
              f"trl {trl['sec_per_step']:.2f} s/step", file=sys.stderr, flush=True)
    print("GRPO step on SmolLM2-135M-Instruct + LoRA r16, 4 prompts x G=8, <=32 completion "
          f"tokens, fp32 CPU, {args.steps - 1} timed steps each (ratios vs TRL)")
    print(ratio_table(results, ("beta", "beta"), "completion_tokens_per_sec"))
    if args.json:
        args.json.write_text(json.dumps([{"gym": g, "trl": t} for g, t in results], indent=2))


if __name__ == "__main__":
    main()
