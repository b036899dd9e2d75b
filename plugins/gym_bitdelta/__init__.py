"""BitDelta (docs/algorithms.md §9) as a gym quantizer plugin: one sign bit per weight of each
linear projection's delta plus one fp32 scale per matrix."""

from __future__ import annotations

from dataclasses import dataclass

from gym_core.api import MatrixQuantConfig, bounded, hookimpl, one_of


@dataclass
class BitDeltaConfig(MatrixQuantConfig):
    name: str = "bitdelta"
    # sign(0): +1 as in the reference code (the paper says -1). Either is exact for the
    # packing; it only decides which way an unchanged weight moves by alpha.
    sign_of_zero: int = one_of((1, -1), 1)
    # Scale distillation (§9): with distill_steps > 0, only the per-matrix scales are
    # trained (signs and base frozen) to match the fine-tuned model's logits (MSE over
    # non-padding positions) on the task's training prompts. The paper: 200 steps of
    # batch 4 x 128 tokens, AdamW lr 1e-4 with a cosine schedule.
    distill_steps: int = bounded(0, ge=0)
    distill_batch_size: int = bounded(4, ge=1)
    distill_lr: float = bounded(1e-4, gt=0)
    distill_max_length: int = bounded(128, ge=1)  # tokens per prompt
    distill_seed: int = bounded(0, ge=0)


@hookimpl
def gym_add_quantizers(registry):
    registry.add("bitdelta", BitDeltaConfig, "gym_bitdelta.bitdelta:BitDeltaQuantizer")
