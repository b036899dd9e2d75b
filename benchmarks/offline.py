"""DPO, KTO, SFT and ORPO steps, gym vs TRL, on this machine, in one run: seconds per step,
tokens per second and peak memory, with ratios.

Both train SmolLM2-135M-Instruct + LoRA (r 16, alpha 32, all seven projections) in fp32 on
CPU on identical batches of the arithmetic task (``offline_data.py``): 8 preference pairs
per DPO step, 16 labelled rows per KTO step (both with a reference pass every step), 8
rows per SFT step (prompt + the right answer, the loss on the answer), 8 pairs per ORPO
step. Tokens per second divide one shared count by each step time: DPO and ORPO, prompt +
chosen + prompt + rejected tokens per pair; KTO, prompt + completion tokens per row; SFT,
prompt + answer tokens per row. Each measurement runs in its own fresh process (peak
memory is a per-process high-water mark), one after another (never two at once:
contending OpenMP thread pools distort timings far beyond their share of the CPU).

    pip install -e '.[bench]' && python benchmarks/offline.py     # default: 4 steps
    python benchmarks/offline.py --algorithms dpo sft --steps 6 --json results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from measure import ratio_table, run_half
from offline_data import ALGORITHMS, BATCH, default_model_dir, tokens_per_step

HERE = Path(__file__).resolve().parent


def measure(script: str, algorithm: str, steps: int, tokens: list[int]) -> dict:
    return run_half(HERE / script, ["--algorithm", algorithm, "--steps", str(steps),
                                    "--tokens-per-step", *map(str, tokens)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="per run, one of them warm-up")
    parser.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is an untimed warm-up")
    model_dir = default_model_dir()
    results = []
    for algorithm in args.algorithms:
        tokens = tokens_per_step(algorithm, model_dir, args.steps)
        gym = measure("offline_gym.py", algorithm, args.steps, tokens)
        trl = measure("offline_trl.py", algorithm, args.steps, tokens)
        results.append((gym, trl))
        print(f"{algorithm}: gym {gym['sec_per_step']:.2f} s/step, "
              f"trl {trl['sec_per_step']:.2f} s/step", file=sys.stderr, flush=True)
    shown = ", ".join(f"{a.upper()} {BATCH[a]} {'pairs' if a in ('dpo', 'orpo') else 'rows'}"
                      for a in args.algorithms)
    print("Offline methods' step on SmolLM2-135M-Instruct + LoRA r16, fp32 CPU, identical "
          f"arithmetic batches ({shown}; DPO and KTO with a reference pass every step), "
          f"{args.steps - 1} timed steps each (ratios vs TRL); tok/s = prompt+completion tokens "
          "per step (DPO, ORPO: prompt+chosen+prompt+rejected per pair) / step time")
    print(ratio_table(results, ("algo", "algorithm"), "tokens_per_sec"))
    if args.json:
        args.json.write_text(json.dumps(
            [{"algorithm": g["algorithm"], "gym": g, "trl": t} for g, t in results], indent=2))


if __name__ == "__main__":
    main()
