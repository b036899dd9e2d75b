"""BitDelta (ALGORITHMS.md §5) as a gym quantizer plugin: one sign bit per weight of each
linear projection's delta plus one fp32 scale per matrix."""

from __future__ import annotations

from dataclasses import dataclass, field

from gym_core import hookimpl
from gym_core.config import QuantConfig


@dataclass
class BitDeltaConfig(QuantConfig):
    name: str = "bitdelta"
    # Matrices whose name ends in one of these are sign-compressed (the paper: attention
    # and MLP projections); everything else (embeddings, norms, head) is stored as it is.
    targets: list[str] = field(default_factory=lambda: ["_proj.weight"])
    # sign(0): +1 as in the reference code (the paper says -1). Either is exact for the
    # packing; it only decides which way an unchanged weight moves by alpha.
    sign_of_zero: int = 1


@hookimpl
def gym_add_quantizers(registry):
    registry.add("bitdelta", BitDeltaConfig, "gym_bitdelta.bitdelta:BitDeltaQuantizer")
