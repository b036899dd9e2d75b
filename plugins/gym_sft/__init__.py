"""Supervised fine-tuning (docs/algorithms.md §7) as a gym plugin: the negative
log-likelihood of the answers, on prompt-completion rows, conversations or plain text."""

from __future__ import annotations

from dataclasses import dataclass

from gym_core.api import OfflineAlgorithmConfig, bounded, hookimpl


@dataclass
class SFTConfig(OfflineAlgorithmConfig):
    name: str = "sft"
    # LoRA (r 16) on a 135M model: 2e-4 learns the arithmetic task's answers in 30 steps of
    # 4 rows (docs/guide.md); TRL's 2e-5 default is for full fine-tuning.
    lr: float = 2e-4
    # The loss on the answer only: the completion of prompt-completion rows, the assistant
    # turns of conversations (TRL's completion_only_loss / assistant_only_loss). False:
    # on every token of the sequence, prompt and system prompt included. Plain-text rows
    # are trained on all their tokens either way.
    completion_only_loss: bool = True
    # Several rows to a sequence (best-fit decreasing, up to max_length tokens each),
    # attention kept within each row; same loss, fewer padding tokens (docs/algorithms.md §7.3)
    packing: bool = False
    # Tokens per sequence (prompt and answer together; longer ones keep their start) and
    # per packed row. max_prompt_length / max_completion_length cut only the held-out
    # preference evaluation, as for every offline method.
    max_length: int = bounded(1024, ge=1)


@hookimpl
def gym_add_algorithms(registry):
    registry.add("sft", SFTConfig, "gym_sft.sft:SFT")
