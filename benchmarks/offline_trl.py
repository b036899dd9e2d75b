"""TRL's half of the offline-methods benchmark: time ``trl.DPOTrainer``, ``trl.KTOTrainer``,
``trl.SFTTrainer`` or ``trl.experimental.orpo.ORPOTrainer`` on CPU.

Trains a LoRA adapter on SmolLM2-135M-Instruct on the same settings as gym's half (see
``offline_data.py``: fp32 on CPU, LoRA r=16/alpha=32 on all seven projections, the same
batch sizes and learning rates, beta 0.1, sigmoid DPO loss, the reference log-probs
computed every step, gradient checkpointing off) on exactly the examples gym trains on,
step for step: TRL reads them in order (``train_sampling_strategy="sequential"``). Rows
are conversational (one user turn, one assistant turn), so TRL renders them with the same
chat template gym uses; SFT's loss is on the completion only (TRL's default for
prompt-completion rows). TRL's ORPO appends an EOS token to each answer that does not end
with one (the rendered turn ends with a newline after it): one token more per answer than
gym scores, not counted in tok/s. Measures, excluding the first (warm-up) step, seconds per
optimizer step, prompt + completion tokens per second (the count both halves share) and
peak resident memory. Run it in a fresh process: the peak is the process's high-water mark.

TRL 1.16 has promoted KTO to its stable API: ``from trl import KTOTrainer`` (the
``trl.experimental.kto`` path is the same class behind a deprecation warning).

    python benchmarks/offline_trl.py --algorithm kto --steps 3
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
from offline_data import (
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
            if algorithm in ("dpo", "orpo"):
                rows.append({"prompt": user(ex["prompt"]), "chosen": assistant(ex["chosen"]),
                             "rejected": assistant(ex["rejected"])})
            elif algorithm == "kto":
                rows.append({"prompt": user(ex["prompt"]),
                             "completion": assistant(ex["completion"]),
                             "label": bool(ex["label"])})
            else:
                rows.append({"prompt": user(ex["prompt"]), "completion": assistant(ex["chosen"])})
    return Dataset.from_list(rows)


def trainer_and_settings(algorithm: str):
    """TRL's config and trainer classes for ``algorithm`` and the settings only it takes."""
    import warnings

    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, SFTConfig, SFTTrainer

    if algorithm == "dpo":
        return DPOConfig, DPOTrainer, {"loss_type": ["sigmoid"], "beta": BETA,
                                       "precompute_ref_log_probs": False}
    if algorithm == "kto":
        return KTOConfig, KTOTrainer, {"loss_type": "kto", "beta": BETA,
                                       "desirable_weight": 1.0, "undesirable_weight": 1.0,
                                       "precompute_ref_log_probs": False}
    if algorithm == "sft":
        return SFTConfig, SFTTrainer, {"packing": False, "completion_only_loss": None}
    with warnings.catch_warnings():  # "experimental" notice
        warnings.simplefilter("ignore")
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    return ORPOConfig, ORPOTrainer, {"beta": BETA}


def run_trl(model_dir: str, *, algorithm: str, steps: int, tokens_per_step: list[int],
            gradient_checkpointing: bool = False) -> dict:
    """Train TRL's trainer for ``algorithm`` for ``steps`` optimizer steps on CPU and time it."""
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

    dataset = trl_dataset(algorithm, model_dir, steps)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    baseline_rss = rss_mib()
    reset_peak_rss()

    peft_config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                             target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    Config, Trainer, method = trainer_and_settings(algorithm)

    with tempfile.TemporaryDirectory(prefix=f"trl-{algorithm}-bench-") as output_dir:
        config = Config(
            output_dir=output_dir,
            use_cpu=True, bf16=False, fp16=False,
            **trl_checkpointing(Config, gradient_checkpointing),
            per_device_train_batch_size=BATCH[algorithm],
            gradient_accumulation_steps=1,
            max_steps=steps,
            # gym's batches in gym's order (KTO requires sequential sampling anyway)
            train_sampling_strategy="sequential",
            max_length=MAX_LENGTH,  # far above any sequence here: nothing is truncated
            **method,
            learning_rate=LR[algorithm], lr_scheduler_type="constant", warmup_steps=0,
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
    parser.add_argument("--algorithm", choices=ALGORITHMS, default="dpo")
    parser.add_argument("--model-dir", default=None, help="HF folder; default: gym's SmolLM2")
    parser.add_argument("--steps", type=int, default=3, help="including one warm-up step")
    parser.add_argument("--tokens-per-step", type=int, nargs="+", default=None,
                        help="the shared count (the orchestrator passes it); default: count here")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args(argv)
    model_dir = args.model_dir or default_model_dir()
    tokens = args.tokens_per_step
    if tokens is None:
        from offline_data import tokens_per_step

        tokens = tokens_per_step(args.algorithm, model_dir, args.steps)
    result = run_trl(model_dir, algorithm=args.algorithm, steps=args.steps,
                     tokens_per_step=tokens,
                     gradient_checkpointing=args.gradient_checkpointing)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
