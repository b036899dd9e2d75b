"""TRL's half of the SFT / ORPO benchmark: time ``trl.SFTTrainer`` or
``trl.experimental.orpo.ORPOTrainer`` on CPU.

Trains a LoRA adapter on SmolLM2-135M-Instruct on the same settings as gym's half (see
``sft_orpo_data.py``: fp32 on CPU, LoRA r=16/alpha=32 on all seven projections, 8 rows
(SFT) or 8 preference pairs (ORPO) per optimizer step, constant learning rate, gradient
checkpointing off) on exactly the examples gym trains on, step for step: TRL reads them in
order (``train_sampling_strategy="sequential"``). Rows are conversational (one user turn,
one assistant turn), so TRL renders them with the same chat template gym uses; SFT's loss
is on the completion only (TRL's default for prompt-completion rows). TRL's ORPO appends
an EOS token to each answer that does not end with one (the rendered turn ends with a
newline after it): one token more per answer than gym scores, not counted in tok/s.

    python benchmarks/sft_orpo_trl.py --algorithm orpo --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Any

from measure import (
    OtherCpu,
    peak_rss_mib,
    reset_peak_rss,
    rss_mib,
    trl_checkpointing,
    trl_step_timer,
)
from sft_orpo_data import (
    ALGORITHMS,
    BATCH,
    BETA,
    LORA_ALPHA,
    LORA_R,
    LORA_TARGETS,
    LR,
    MAX_LENGTH,
    SEED,
    default_model_dir,
    step_examples,
)


def trl_dataset(algorithm: str, model_dir: str, steps: int):
    """gym's batches, in order, in TRL's conversational columns."""
    from datasets import Dataset

    def user(text):
        return [{"role": "user", "content": text}]

    def assistant(text):
        return [{"role": "assistant", "content": text}]

    rows = []
    for batch in step_examples(algorithm, model_dir, steps):
        for ex in batch:
            if algorithm == "sft":
                rows.append({"prompt": user(ex["prompt"]), "completion": assistant(ex["chosen"])})
            else:
                rows.append({"prompt": user(ex["prompt"]), "chosen": assistant(ex["chosen"]),
                             "rejected": assistant(ex["rejected"])})
    return Dataset.from_list(rows)


def run_trl(model_dir: str, *, algorithm: str, steps: int, tokens_per_step: list[int],
            gradient_checkpointing: bool = False) -> dict:
    """Train TRL's SFTTrainer / ORPOTrainer for ``steps`` optimizer steps on CPU and time it."""
    if steps < 2:
        raise ValueError("steps must be >= 2: the first step is an untimed warm-up")
    import warnings

    import torch
    import trl
    from peft import LoraConfig
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        PrinterCallback,
        ProgressCallback,
    )
    from trl import SFTConfig, SFTTrainer

    with warnings.catch_warnings():  # "experimental" notice
        warnings.simplefilter("ignore")
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    dataset = trl_dataset(algorithm, model_dir, steps)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    baseline_rss = rss_mib()
    reset_peak_rss()

    peft_config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                             target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    if algorithm == "sft":
        Config, Trainer = SFTConfig, SFTTrainer
        method = {"max_length": MAX_LENGTH, "packing": False, "completion_only_loss": None}
    else:
        Config, Trainer = ORPOConfig, ORPOTrainer
        method = {"max_length": MAX_LENGTH, "beta": BETA}

    with tempfile.TemporaryDirectory(prefix=f"trl-{algorithm}-bench-") as output_dir:
        config = Config(
            output_dir=output_dir,
            use_cpu=True, bf16=False, fp16=False,
            **trl_checkpointing(Config, gradient_checkpointing),
            per_device_train_batch_size=BATCH[algorithm],
            gradient_accumulation_steps=1,
            max_steps=steps,
            train_sampling_strategy="sequential",  # gym's batches in gym's order
            **method,
            learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, optim="adamw_torch",
            max_grad_norm=1.0,
            logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
            seed=SEED, dataloader_num_workers=0,
        )
        timed: list[dict[str, Any]] = []
        trainer = Trainer(model=model, args=config, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config,
                          callbacks=[trl_step_timer(
                              timed, "loss", lambda logs: f"loss={logs.get('loss')}")])
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        other = OtherCpu()
        other.start()
        trainer.train()
        other_cpu = other.stop()

    peak = peak_rss_mib()
    measured = timed[1:]
    total_sec = sum(s["sec"] for s in measured)
    return {
        "impl": f"trl {trl.__version__}",
        "algorithm": algorithm,
        "batch": BATCH[algorithm],
        "sec_per_step": total_sec / len(measured),
        "tokens_per_sec": sum(tokens_per_step[1:steps]) / total_sec,
        "peak_rss_mib": peak,
        "steps_timed": len(measured),
        "baseline_rss_mib": baseline_rss,
        "tokens_per_step": tokens_per_step[:steps],
        "step_secs": [round(s["sec"], 3) for s in timed],
        "losses": [s.get("logs", {}).get("loss") for s in timed],
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "other_processes_cpu_sec": other_cpu,
        "gradient_checkpointing": gradient_checkpointing,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithm", choices=ALGORITHMS, default="sft")
    parser.add_argument("--model-dir", default=None, help="HF folder; default: gym's SmolLM2")
    parser.add_argument("--steps", type=int, default=3, help="including one warm-up step")
    parser.add_argument("--tokens-per-step", type=int, nargs="+", default=None,
                        help="the shared count (the orchestrator passes it); default: count here")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args(argv)
    model_dir = args.model_dir or default_model_dir()
    tokens = args.tokens_per_step
    if tokens is None:
        from sft_orpo_data import tokens_per_step

        tokens = tokens_per_step(args.algorithm, model_dir, args.steps)
    print(json.dumps(run_trl(model_dir, algorithm=args.algorithm, steps=args.steps,
                             tokens_per_step=tokens,
                             gradient_checkpointing=args.gradient_checkpointing), indent=2))


if __name__ == "__main__":
    main()
