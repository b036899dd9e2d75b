"""PPO's step time against GRPO's on the same batch, gym only (TRL 1.16 has no PPO
trainer to race): SmolLM2-135M-Instruct + LoRA r16, fp32 CPU, 4 prompts x G=8, <= 32
completion tokens, the same KL weight. A PPO step does more work by design: one pass for
the rollout's log-probs and values, GAE, and ``num_ppo_epochs`` optimizer updates (4 by
default) where GRPO takes one. Each run in its own fresh process, one after another.

    python benchmarks/ppo.py                    # default: 4 steps, KL weight 0.05
    python benchmarks/ppo.py --steps 6 --epochs 1 4 --json results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from measure import run_half

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="per run, one of them warm-up")
    parser.add_argument("--kl", type=float, default=0.05,
                        help="GRPO's beta and PPO's kl_coef (both need a reference pass)")
    parser.add_argument("--epochs", type=int, nargs="+", default=[4],
                        help="PPO num_ppo_epochs values to time")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    # the batch; smaller values only to check that the script runs
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--max-completion-length", type=int, default=32)
    args = parser.parse_args()
    batch = ["--prompts-per-step", str(args.prompts_per_step), "--num-generations",
             str(args.num_generations), "--max-completion-length", str(args.max_completion_length)]
    common = ["--beta", str(args.kl), "--steps", str(args.steps), *batch]
    rows = [("grpo", run_half(HERE / "grpo_gym.py", [*common, "--algorithm", "grpo"]))]
    for epochs in args.epochs:
        rows.append((f"ppo, {epochs} epochs", run_half(
            HERE / "grpo_gym.py", [*common, "--algorithm", "ppo", "--override",
                                   f"algorithm.num_ppo_epochs={epochs}"])))
        print(f"{rows[-1][0]}: {rows[-1][1]['sec_per_step']:.2f} s/step", file=sys.stderr)
    grpo = rows[0][1]
    print(f"gym step on SmolLM2-135M-Instruct + LoRA r16, {args.prompts_per_step} prompts x "
          f"G={args.num_generations}, <={args.max_completion_length} completion tokens, KL "
          f"weight {args.kl}, fp32 CPU, {args.steps - 1} timed steps each")
    head = f"{'method':<16} | {'s/step':>7} | {'generate s':>10} | {'x GRPO':>6} | {'peak MiB':>8}"
    print(head)
    print("-" * len(head))
    for name, r in rows:
        gen = sum(r["generate_secs"][1:]) / max(len(r["generate_secs"]) - 1, 1)
        print(f"{name:<16} | {r['sec_per_step']:>7.2f} | {gen:>10.2f} | "
              f"{r['sec_per_step'] / grpo['sec_per_step']:>6.2f} | {r['peak_rss_mib']:>8.0f}")
    if args.json:
        args.json.write_text(json.dumps(dict(rows), indent=2))


if __name__ == "__main__":
    main()
