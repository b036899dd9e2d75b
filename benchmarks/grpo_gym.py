"""gym's half of the GRPO benchmark (and of the RLOO and PPO ones): time gym's GRPO step
(or RLOO's, PPO's, GSPO's: ``--algorithm``) on CPU.

The same settings as ``grpo_trl.py``: SmolLM2-135M-Instruct in fp32, LoRA r=16/alpha=32
on all linear layers, ``prompts_per_step`` prompts x ``num_generations`` completions per
optimizer step, DAPO loss aggregation, one optimizer step per batch of rollouts, lr 1e-5.
Measured like TRL's half, excluding the first (warm-up) step: seconds per optimizer step
(generation + rewards + reference pass + loss + backward + AdamW), completion tokens per
second (up to and including EOS) and the process's peak resident memory.

    python benchmarks/grpo_gym.py --beta 0.04 --steps 3
"""

from __future__ import annotations

import argparse
import json

from measure import train_gym

from gym_core.base.threads import prepare_environment

prepare_environment()  # as gym's entry point does, before torch loads OpenMP


def run_gym_grpo(
    model_dir: str,
    *,
    beta: float,
    steps: int,
    prompts_per_step: int = 4,
    num_generations: int = 8,
    max_completion_length: int = 32,
    lora_r: int = 16,
    lora_alpha: int = 32,
    seed: int = 0,
    algorithm: str = "grpo",
    threads: int | None = None,
    overrides: list[str] | None = None,
) -> dict:
    if steps < 2:
        raise ValueError("steps must be >= 2: the first step is an untimed warm-up")

    import gym_core
    from gym_core.plugin.startup import compose

    # PPO's KL weight is its per-token reward penalty kl_coef; the others' is beta
    kl = "kl_coef" if algorithm == "ppo" else "beta"
    cfg = compose([
        "model=local", f"model.path={model_dir}",
        f"model.lora.r={lora_r}", f"model.lora.alpha={lora_alpha}",
        f"algorithm={algorithm}", f"algorithm.{kl}={beta}", "algorithm.lr=1e-5",
        *(["algorithm.loss_type=dapo"] if algorithm == "grpo" else []),
        "algorithm.temperature=1.0",
        f"algorithm.num_generations={num_generations}",
        f"algorithm.max_completion_length={max_completion_length}",
        f"trainer.max_steps={steps}", f"trainer.batch_size={prompts_per_step}",
        "trainer.warmup_steps=0", "trainer.save_every=null", f"trainer.seed={seed}",
        "trainer.progress=false", "trainer.tensorboard=false",
        *([f"trainer.threads={threads}"] if threads else []), *(overrides or []),
    ])
    run = train_gym(cfg, algorithm, ["accuracy"], seed)
    rows = run["rows"]
    measured = rows[1:]
    total_sec = sum(r["step_seconds"] for r in measured)
    tokens = [r["tokens_per_second"] * r["step_seconds"] for r in measured]
    return {
        "impl": f"gym {gym_core.__version__}" + ("" if algorithm == "grpo" else f" {algorithm}"),
        "beta": beta,
        "sec_per_step": total_sec / len(measured),
        "completion_tokens_per_sec": sum(tokens) / total_sec,
        "peak_rss_mib": run["peak_rss_mib"],
        "steps_timed": len(measured),
        "baseline_rss_mib": run["baseline_rss_mib"],
        "completion_tokens_per_step": sum(tokens) / len(measured),
        "step_secs": [round(r["step_seconds"], 3) for r in rows],
        "generate_secs": [round(r["generate_seconds"], 3) for r in rows],
        "rewards": [r["reward_mean"] for r in rows],
        "torch_threads": run["threads"],
        "other_processes_cpu_sec": run["other_processes_cpu_sec"],
    }


def main(argv: list[str] | None = None) -> None:
    from gym_core.model.policy import smollm2_folder

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=None, help="HF folder; default: gym's SmolLM2")
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=3, help="including one warm-up step")
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--max-completion-length", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--algorithm", default="grpo",
                        help="grpo, or rloo, ppo, gspo for their step times")
    parser.add_argument("--threads", type=int, default=None, help="default: gym's choice")
    parser.add_argument("--override", action="append", default=[],
                        help="a further gym override, e.g. algorithm.num_ppo_epochs=1")
    args = parser.parse_args(argv)
    result = run_gym_grpo(
        args.model_dir or str(smollm2_folder()), beta=args.beta, steps=args.steps,
        prompts_per_step=args.prompts_per_step, num_generations=args.num_generations,
        max_completion_length=args.max_completion_length, seed=args.seed,
        algorithm=args.algorithm, threads=args.threads, overrides=args.override,
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
