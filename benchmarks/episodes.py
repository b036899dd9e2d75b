"""Multi-turn rollouts against single-turn ones (docs/agents.md): the same GRPO job on
SmolLM2-135M-Instruct sampled as single completions and as `env=calculator` episodes
(the model's turns, the tool's replies fed back as tokens, generation continuing from
the KV cache), read back from the runs' ``metrics.jsonl``.

    python benchmarks/episodes.py [--init runs/<an SFT run on tool traces>] [--steps 4]

``--init`` starts both runs from a model that calls the tool (docs/examples/
calculator_traces.py, then SFT): the untrained model rarely does, and its episodes are
then single turns. Sampled tokens per second counts the model's tokens only (the
environment's are fed, not sampled); the first step is left out. Run on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from ray_scale import run  # the same subprocess runner


def summarise(label: str, rows: list[dict], rows_per_step: int) -> dict:
    rows = rows[1:]
    env_tokens = [r.get("env/environment_tokens", 0.0) for r in rows]
    sampled = [(r["completion_length"] - e) * rows_per_step for r, e in zip(rows, env_tokens)]
    gen = [r["generate_seconds"] for r in rows]
    return {"rollouts": label,
            "turns": statistics.mean(r.get("env/turns", 1.0) for r in rows),
            "sampled_tokens_per_row": statistics.mean(sampled) / rows_per_step,
            "env_tokens_per_row": statistics.mean(env_tokens),
            "generate_s_per_step": statistics.median(gen),
            "sampled_tok_per_s": sum(sampled) / sum(gen)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    ap.add_argument("--init", help="model.init: a run folder to start both runs from")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the table here")
    args = ap.parse_args()
    batch, g = 4, 8
    common = [f"model={args.model}", "algorithm=grpo", "data=arithmetic",
              f"algorithm.num_generations={g}", f"trainer.batch_size={batch}",
              f"trainer.max_steps={args.steps}", f"trainer.threads={args.threads}",
              "trainer.eval_before=false", "trainer.eval_size=1", "trainer.save_every=null",
              "trainer.progress=false", "trainer.rollout_buffer=false"]
    if args.init:
        common.append(f"model.init={Path(args.init).resolve()}")
    out = []
    with tempfile.TemporaryDirectory(prefix="gym-episodes-bench-") as tmp:
        root = Path(tmp)
        single = run([*common, "algorithm.max_completion_length=192"], root, "single-turn")
        out.append(summarise("single completions (192 tokens at most)", single["rows"],
                             batch * g))
        multi = run([*common, "env=calculator", "env.max_turns=3", "env.max_tokens=192"],
                    root, "multi-turn")
        out.append(summarise("env=calculator episodes (3 turns, 192 tokens at most)",
                             multi["rows"], batch * g))
    keys = list(out[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in out:
        print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v)
                                for v in r.values()) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
