"""RLOO step, gym vs TRL 1.16's RLOOTrainer, on this machine, in one run: seconds per
step, completion tokens per second and peak memory, with ratios.

The same data, prompts, G, lengths and settings for both (SmolLM2-135M-Instruct + LoRA
r16, fp32 CPU, 4 prompts x G=8, <= 32 completion tokens, one optimizer step per rollout
batch, TRL's RLOO defaults otherwise). Each measurement runs in its own fresh process
(peak memory is a per-process high-water mark), one after another.

    pip install -e '.[bench]' && python benchmarks/rloo.py            # default: 4 steps
    python benchmarks/rloo.py --steps 6 --betas 0.05 --json results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from measure import ratio_table, run_half

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="per run, one of them warm-up")
    # TRL's RLOO default beta is 0.05 (a reference pass and a KL reward); 0 skips both
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.05])
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    # the batch; smaller values only to check that the script runs
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--max-completion-length", type=int, default=32)
    args = parser.parse_args()
    batch = ["--prompts-per-step", str(args.prompts_per_step), "--num-generations",
             str(args.num_generations), "--max-completion-length", str(args.max_completion_length)]
    results = []
    for beta in args.betas:
        common = ["--beta", str(beta), "--steps", str(args.steps), *batch]
        gym = run_half(HERE / "grpo_gym.py", [*common, "--algorithm", "rloo"])
        trl = run_half(HERE / "grpo_trl.py", [*common, "--method", "rloo"])
        results.append((gym, trl))
        print(f"beta {beta}: gym {gym['sec_per_step']:.2f} s/step, "
              f"trl {trl['sec_per_step']:.2f} s/step", file=sys.stderr, flush=True)
    print(f"RLOO step on SmolLM2-135M-Instruct + LoRA r16, {args.prompts_per_step} prompts x "
          f"G={args.num_generations}, <={args.max_completion_length} completion tokens, fp32 "
          f"CPU, {args.steps - 1} timed steps each (ratios vs TRL)")
    print(ratio_table(results, ("beta", "beta"), "completion_tokens_per_sec"))
    if args.json:
        args.json.write_text(json.dumps([{"gym": g, "trl": t} for g, t in results], indent=2))


if __name__ == "__main__":
    main()
