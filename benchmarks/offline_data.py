"""What both halves of the offline-methods benchmark (DPO, KTO, SFT, ORPO) share: the
settings, the exact examples of every step (in gym's sampling order, which TRL is then fed
sequentially, so both train on identical batches) and the token count per step that tokens
per second divide.

Data: the arithmetic task. DPO and ORPO train on each example's (chosen, rejected) pair,
KTO on labelled rows (``arithmetic_labels``), SFT on each prompt and its ``chosen`` answer
("3 + 4 = 7", gym's SFT default on this task) with the loss on the answer only. Prompts
are rendered with the model's chat template as one user turn, completions as the
assistant turn that follows (end-of-turn tokens included), exactly as gym renders them;
TRL is given the same conversations.

Tokens counted per step: DPO and ORPO, each pair's prompt + chosen + prompt + rejected
tokens (as if chosen and rejected were two whole sequences); KTO, each row's prompt +
completion tokens (the mismatched KL sequences are not counted); SFT, each row's prompt +
answer tokens."""

from __future__ import annotations

from typing import Any

ALGORITHMS = ("dpo", "kto", "sft", "orpo")
DATA = {"dpo": "arithmetic", "kto": "arithmetic_labels", "sft": "arithmetic", "orpo": "arithmetic"}
# pairs (DPO, ORPO), labelled rows (KTO) or rows (SFT) per optimizer step
BATCH = {"dpo": 8, "kto": 16, "sft": 8, "orpo": 8}
# gym's defaults with LoRA (speed does not depend on them)
LR = {"dpo": 5e-5, "kto": 5e-5, "sft": 2e-4, "orpo": 2e-4}
BETA = 0.1  # DPO's and KTO's beta, ORPO's lambda
LORA_R, LORA_ALPHA = 16, 32
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEED = 0
# Longer than any rendered prompt / completion of the arithmetic task: nothing is cut.
MAX_PROMPT_TOKENS, MAX_COMPLETION_TOKENS, MAX_LENGTH = 256, 64, 1024


def gym_overrides(algorithm: str, model_dir: str, steps: int) -> list[str]:
    """gym's config for the benchmark (the data choice decides the examples)."""
    overrides = [
        "model=local", f"model.path={model_dir}",
        f"model.lora.r={LORA_R}", f"model.lora.alpha={LORA_ALPHA}",
        f"algorithm={algorithm}", f"algorithm.lr={LR[algorithm]}",
        f"algorithm.max_prompt_length={MAX_PROMPT_TOKENS}",
        f"algorithm.max_completion_length={MAX_COMPLETION_TOKENS}",
        f"data={DATA[algorithm]}",
        f"trainer.max_steps={steps}", f"trainer.batch_size={BATCH[algorithm]}",
        "trainer.grad_accum=1", "trainer.lr_scheduler=constant", "trainer.warmup_steps=0",
        "trainer.save_every=null", f"trainer.seed={SEED}",
        "trainer.progress=false", "trainer.tensorboard=false",
    ]
    if algorithm == "sft":
        overrides.append(f"algorithm.max_length={MAX_LENGTH}")
    else:
        overrides.append(f"algorithm.beta={BETA}")
    if algorithm == "dpo":
        # a reference pass every step, as TRL does without precompute_ref_log_probs
        overrides += ["algorithm.loss_type=sigmoid", "algorithm.cache_ref_logprobs=false"]
    return overrides


def step_examples(algorithm: str, model_dir: str, steps: int) -> list[list[dict[str, Any]]]:
    """The examples of each step, as gym's trainer draws them (its seeded sampler). KTO's
    rows are put desirable first, as gym's KTO orders a batch before it pairs each prompt
    with the previous row's completion: TRL's collator pairs the same way, so both
    estimate z0 from the same mismatched pairs."""
    from gym_core.data.tasks import Sampler
    from gym_core.plugin.startup import bootstrap, compose

    cfg = compose(gym_overrides(algorithm, model_dir, steps))
    task = bootstrap().component("data", cfg.data.name).load()(cfg.data)
    sampler = Sampler(len(task.train), cfg.trainer.seed)
    out = []
    for _ in range(steps):
        batch = [task.train[i] for i in sampler.take(cfg.trainer.batch_size)]
        if algorithm == "kto":
            batch = sorted(batch, key=lambda r: not r["label"])
        out.append(batch)
    return out


def answers(algorithm: str, ex: dict[str, Any]) -> list[str]:
    """The completions of one example that its method trains on."""
    if algorithm in ("dpo", "orpo"):
        return [ex["chosen"], ex["rejected"]]
    return [ex["completion"] if algorithm == "kto" else ex["chosen"]]


def tokens_per_step(algorithm: str, model_dir: str, steps: int) -> list[int]:
    """Prompt + completion tokens of each step's examples (see the module docstring)."""
    from transformers import AutoTokenizer

    from gym_core.data.tasks import render_completion, render_prompts

    tok = AutoTokenizer.from_pretrained(model_dir)

    def n(text: str) -> int:
        return len(tok(text, add_special_tokens=False).input_ids)

    counts = []
    for batch in step_examples(algorithm, model_dir, steps):
        total = 0
        for ex in batch:
            prompt = n(render_prompts(tok, [ex["prompt"]], None)[0])
            total += sum(prompt + n(render_completion(tok, ex["prompt"], a, None))
                         for a in answers(algorithm, ex))
        counts.append(total)
    return counts


def default_model_dir() -> str:
    from gym_core.model.policy import smollm2_folder

    return str(smollm2_folder())
