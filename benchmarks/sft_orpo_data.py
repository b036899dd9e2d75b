"""What both halves of the SFT / ORPO benchmark share: the settings, the exact examples of
every step (in gym's sampling order, which TRL is then fed sequentially, so both train on
identical batches) and the token count per step that tokens per second divide.

Data: the arithmetic task. SFT trains on each example's prompt and its ``chosen`` answer
("3 + 4 = 7", gym's SFT default on this task) with the loss on the answer only; ORPO on
its (chosen, rejected) pair. Prompts are rendered with the model's chat template as one
user turn, answers as the assistant turn that follows (end-of-turn tokens included),
exactly as gym renders them; TRL is given the same conversations.

Tokens counted per step: SFT, each row's prompt + answer tokens; ORPO, each pair's prompt
+ chosen + prompt + rejected tokens (as DPO's benchmark counts them)."""

from __future__ import annotations

from typing import Any

ALGORITHMS = ("sft", "orpo")
BATCH = {"sft": 8, "orpo": 8}  # rows (SFT) / pairs (ORPO) per optimizer step
LR = 2e-4  # gym's default for both with LoRA; speed does not depend on it
BETA = 0.1  # ORPO's lambda
LORA_R, LORA_ALPHA = 16, 32
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEED = 0
# Longer than any rendered prompt / answer of the arithmetic task: nothing is cut.
MAX_PROMPT_TOKENS, MAX_COMPLETION_TOKENS, MAX_LENGTH = 256, 64, 1024


def gym_overrides(algorithm: str, model_dir: str, steps: int) -> list[str]:
    overrides = [
        "model=local", f"model.path={model_dir}",
        f"model.lora.r={LORA_R}", f"model.lora.alpha={LORA_ALPHA}",
        f"algorithm={algorithm}", f"algorithm.lr={LR}",
        f"algorithm.max_prompt_length={MAX_PROMPT_TOKENS}",
        f"algorithm.max_completion_length={MAX_COMPLETION_TOKENS}",
        "data=arithmetic",
        f"trainer.max_steps={steps}", f"trainer.batch_size={BATCH[algorithm]}",
        "trainer.grad_accum=1", "trainer.lr_scheduler=constant", "trainer.warmup_steps=0",
        "trainer.save_every=0", f"trainer.seed={SEED}",
        "trainer.progress=false", "trainer.tensorboard=false",
    ]
    if algorithm == "orpo":
        overrides.append(f"algorithm.beta={BETA}")
    else:
        overrides.append(f"algorithm.max_length={MAX_LENGTH}")
    return overrides


def step_examples(algorithm: str, model_dir: str, steps: int) -> list[list[dict[str, Any]]]:
    """The examples of each step, as gym's trainer draws them (its seeded sampler)."""
    from gym_core.data import Sampler
    from gym_core.startup import bootstrap, compose

    cfg = compose(gym_overrides(algorithm, model_dir, steps))
    task = bootstrap().component("data", cfg.data.name).load()(cfg.data)
    sampler = Sampler(len(task.train), cfg.trainer.seed)
    return [[task.train[i] for i in sampler.take(cfg.trainer.batch_size)] for _ in range(steps)]


def tokens_per_step(algorithm: str, model_dir: str, steps: int) -> list[int]:
    """Prompt + answer tokens of each step's examples (see the module docstring)."""
    from transformers import AutoTokenizer

    from gym_core.data import render_completion, render_prompts

    tok = AutoTokenizer.from_pretrained(model_dir)

    def n(text: str) -> int:
        return len(tok(text, add_special_tokens=False).input_ids)

    counts = []
    for batch in step_examples(algorithm, model_dir, steps):
        total = 0
        for ex in batch:
            prompt = n(render_prompts(tok, [ex["prompt"]], None)[0])
            answers = [ex["chosen"], ex["rejected"]] if algorithm == "orpo" else [ex["chosen"]]
            total += sum(prompt + n(render_completion(tok, ex["prompt"], a, None))
                         for a in answers)
        counts.append(total)
    return counts


def default_model_dir() -> str:
    from gym_core.model import smollm2_folder

    return str(smollm2_folder())
