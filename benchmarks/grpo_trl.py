"""TRL's half of the GRPO benchmark: time ``trl.GRPOTrainer`` on CPU (or, with
``--method rloo``, ``trl.RLOOTrainer``: TRL 1.16's RLOO on the same settings).

Trains a LoRA adapter on SmolLM2-135M-Instruct with TRL's ``GRPOTrainer`` on the same
settings gym's GRPO step uses (fp32 on CPU, LoRA r=16/alpha=32 on all linear layers,
``prompts_per_step`` prompts x ``num_generations`` completions per optimizer step, DAPO loss
aggregation, one optimizer step per batch of rollouts) and measures, excluding the first
(warm-up) step:

* mean wall-clock seconds per optimizer step (generation + reward + loss + backward + AdamW);
* completion tokens generated per second (EOS included, padding after EOS excluded);
* the peak resident memory of the process, and the resident memory right after model loading.

Run it in a fresh process: the peak RSS is the process's high-water mark. TRL is not a gym
dependency; install it with ``pip install 'gym-core[bench]'`` (or ``pip install trl``).

    python benchmarks/grpo_trl.py --beta 0.04 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from measure import (
    OtherCpu,
    peak_rss_mib,
    reset_peak_rss,
    rss_mib,
    trl_checkpointing,
    trl_step_timer,
)

DEFAULT_FALLBACK_MODEL_DIR = "/tmp/smol"
_NUMBER = re.compile(r"-?\d+")


# ----------------------------------------------------------------------------------------
# task: "What is a + b?" with an exact-answer reward
# ----------------------------------------------------------------------------------------


def arithmetic_dataset(max_value: int = 19):
    """Conversational prompts ``What is a + b?`` for a, b in 0..max_value, with an answer column."""
    from datasets import Dataset

    rows = [
        {"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": a + b}
        for a in range(max_value + 1)
        for b in range(max_value + 1)
    ]
    return Dataset.from_list(rows)


def accuracy_reward(completions: list[list[dict]], answer: list[int], **kwargs) -> list[float]:
    """1.0 where the last number in the completion equals the answer, else 0.0.

    TRL passes conversational completions as a list of messages per sample and the
    dataset's extra columns (here ``answer``) as keyword arguments.
    """
    rewards = []
    for completion, target in zip(completions, answer):
        numbers = _NUMBER.findall(completion[0]["content"])
        rewards.append(1.0 if numbers and int(numbers[-1]) == int(target) else 0.0)
    return rewards


# ----------------------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------------------


def run_trl_grpo(
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
    gradient_checkpointing: bool = False,
    method: str = "grpo",
) -> dict:
    """Train TRL's GRPOTrainer (``method="rloo"``: RLOOTrainer) for ``steps`` optimizer
    steps on CPU and time it.

    :param model_dir: a plain Hugging Face model folder (SmolLM2-135M-Instruct).
    :param beta: KL coefficient; 0 skips the reference forward pass entirely.
    :param steps: optimizer steps; the first is a warm-up and is not timed (so >= 2).
    :param gradient_checkpointing: TRL turns it on by default; gym's default is off, so
        it is off here unless asked for.
    :returns: ``impl``, ``beta``, ``sec_per_step``, ``completion_tokens_per_sec``,
        ``peak_rss_mib``, ``steps_timed``, plus the baseline RSS and per-step details.
    """
    if steps < 2:
        raise ValueError("steps must be >= 2: the first step is an untimed warm-up")

    import torch
    import trl
    from peft import LoraConfig
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        PrinterCallback,
        ProgressCallback,
    )
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    if method == "grpo":
        Config, Trainer = GRPOConfig, GRPOTrainer
        # DAPO aggregation and group-scaled advantages, as gym's GRPO benchmark half
        method_args = {"loss_type": "dapo", "scale_rewards": "group"}
    elif method == "rloo":
        Config, Trainer = RLOOConfig, RLOOTrainer
        method_args = {}  # leave-one-out baseline, KL in the reward: TRL's defaults
    else:
        raise ValueError(f"method {method!r} is not grpo or rloo")

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # TRL pads prompts itself, but this is how it would load the tokenizer on its own.
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    baseline_rss = rss_mib()
    # Start the high-water mark from here, so load-time transients are not counted.
    reset_peak_rss()

    peft_config = LoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=0.0,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        task_type="CAUSAL_LM",
    )

    with tempfile.TemporaryDirectory(prefix=f"trl-{method}-bench-") as output_dir:
        config = Config(
            output_dir=output_dir,
            # --- device and precision: CPU, fp32 (TRL defaults bf16=True) ---
            use_cpu=True,
            bf16=False,
            fp16=False,
            **trl_checkpointing(Config, gradient_checkpointing),
            # --- batch: TRL counts completions, so one step = prompts_per_step x G ---
            per_device_train_batch_size=prompts_per_step * num_generations,
            gradient_accumulation_steps=1,
            num_generations=num_generations,
            # generation_batch_size / steps_per_generation derive from the above:
            # one generation round per optimizer step.
            max_steps=steps,
            # --- generation: sampling at T=1, stops at the model's EOS (<|im_end|>) ---
            max_completion_length=max_completion_length,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            # --- the loss ---
            beta=beta,
            **method_args,
            # One optimizer step per rollout batch, so the policy that sampled is the one
            # being trained: GRPOTrainer skips the extra "old log-prob" forward pass
            # (RLOOTrainer always runs it).
            num_iterations=1,
            epsilon=0.2,
            # --- optimizer (matches gym's defaults) ---
            learning_rate=1e-5,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            adam_beta1=0.9,
            adam_beta2=0.999,
            optim="adamw_torch",
            max_grad_norm=1.0,
            # --- bookkeeping: log every step, never save or evaluate ---
            logging_steps=1,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            use_vllm=False,
            log_completions=False,
            seed=seed,
            dataloader_num_workers=0,
        )
        timed: list[dict[str, Any]] = []
        trainer = Trainer(
            model=model,
            reward_funcs=accuracy_reward,
            args=config,
            train_dataset=arithmetic_dataset(),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[trl_step_timer(
                timed, "completions/mean_length",
                lambda logs: f"mean_length={logs.get('completions/mean_length')} "
                             f"reward={logs.get('reward')}")],
        )
        # Keep stdout for the result: the timing callback prints its own lines to stderr.
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        other = OtherCpu()
        other.start()
        trainer.train()
        other_cpu = other.stop()

    peak = peak_rss_mib()
    measured = timed[1:]  # drop the warm-up step
    total_sec = sum(s["sec"] for s in measured)
    # completions/mean_length is the mean over this step's prompts_per_step x G completions
    # of the tokens up to and including the first EOS.
    completions_per_step = prompts_per_step * num_generations
    tokens = [s["logs"]["completions/mean_length"] * completions_per_step for s in measured]
    return {
        "impl": f"trl {trl.__version__}" + ("" if method == "grpo" else f" {method}"),
        "beta": beta,
        "sec_per_step": total_sec / len(measured),
        "completion_tokens_per_sec": sum(tokens) / total_sec,
        "peak_rss_mib": peak,
        "steps_timed": len(measured),
        "baseline_rss_mib": baseline_rss,
        "completion_tokens_per_step": sum(tokens) / len(measured),
        "step_secs": [round(s["sec"], 3) for s in timed],
        "rewards": [s.get("logs", {}).get("reward") for s in timed],
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        # CPU seconds other processes used while this one trained. On a shared machine
        # anything more than a few seconds means contention, and OpenMP's thread pools then
        # slow down far more than proportionally (we saw 25x on 2 cores): discard such runs.
        "other_processes_cpu_sec": other_cpu,
        "settings": {
            "prompts_per_step": prompts_per_step,
            "num_generations": num_generations,
            "max_completion_length": max_completion_length,
            "lora_r": lora_r,
            "lora_alpha": lora_alpha,
            "seed": seed,
            "gradient_checkpointing": gradient_checkpointing,
        },
    }


def default_model_dir() -> str:
    """gym's converted SmolLM2 folder, or the pre-converted copy in /tmp/smol."""
    try:
        from gym_core.model.policy import smollm2_folder
    except ImportError:
        if Path(DEFAULT_FALLBACK_MODEL_DIR, "config.json").is_file():
            return DEFAULT_FALLBACK_MODEL_DIR
        raise
    return str(smollm2_folder())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=None, help="HF folder; default: gym's SmolLM2")
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=3, help="including one warm-up step")
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--max-completion-length", type=int, default=32)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--method", default="grpo", choices=["grpo", "rloo"])
    args = parser.parse_args(argv)

    result = run_trl_grpo(
        args.model_dir or default_model_dir(),
        beta=args.beta,
        steps=args.steps,
        prompts_per_step=args.prompts_per_step,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing,
        method=args.method,
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
