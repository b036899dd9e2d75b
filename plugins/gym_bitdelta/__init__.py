"""BitDelta (docs/algorithms.md §9) as a gym quantizer plugin: one sign bit per weight of each
linear projection's delta plus one fp32 scale per matrix."""

from __future__ import annotations

from dataclasses import dataclass

from gym_core.api import MatrixQuantConfig, hookimpl


@dataclass
class BitDeltaConfig(MatrixQuantConfig):
    name: str = "bitdelta"
    # sign(0): +1 as in the reference code (the paper says -1). Either is exact for the
    # packing; it only decides which way an unchanged weight moves by alpha.
    sign_of_zero: int = 1
    # Scale distillation (§9): with distill_steps > 0, only the per-matrix scales are
    # trained (signs and base frozen) to match the fine-tuned model's logits (MSE over
    # non-padding positions) on the task's training prompts. The paper: 200 steps of
    # batch 4 x 128 tokens, AdamW lr 1e-4 with a cosine schedule.
    distill_steps: int = 0
    distill_batch_size: int = 4
    distill_lr: float = 1e-4
    distill_max_length: int = 128  # tokens per prompt
    distill_seed: int = 0


@hookimpl
def gym_add_quantizers(registry):
    registry.add("bitdelta", BitDeltaConfig, "gym_bitdelta.bitdelta:BitDeltaQuantizer")
