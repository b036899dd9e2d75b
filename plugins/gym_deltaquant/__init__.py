"""DeltaQuant (docs/algorithms.md §10) as a gym quantizer plugin: k-bit (2, 3, 4, 8), binary and
ternary round-to-nearest quantization of a fine-tune's delta, per tensor, per output
channel or per group of input columns, packed densely into bytes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from gym_core.api import MatrixQuantConfig, bounded, hookimpl, one_of

Mode = Literal["kbit", "binary", "ternary"]
Granularity = Literal["tensor", "channel", "group"]
#: the bit widths mode=kbit packs
KBITS = (2, 3, 4, 8)


@dataclass
class DeltaQuantConfig(MatrixQuantConfig):
    name: str = "deltaquant"
    # kbit: `bits`-bit integers; binary: alpha * sign (1 bit); ternary: alpha * {-1, 0, +1}
    # with TWN's threshold 0.7 mean|D| (five values per byte, 1.6 bits).
    mode: str = one_of(Mode, "kbit")
    bits: int = one_of(KBITS, 4)  # for mode=kbit
    # symmetric: s = max|D| / (2^(k-1)-1), zero exactly representable, no zero point;
    # asymmetric: s = (max-min) / (2^k-1) plus an integer zero point per scale (one byte).
    # binary and ternary are symmetric by construction and ignore it.
    symmetric: bool = True
    # One fp32 scale per tensor, per output channel (row of W[out, in]) or per group of
    # `group_size` input columns within a row: finer is more accurate and costs
    # 32 bits / group_size per weight (4-bit, groups of 128: 4.25 bits per weight).
    granularity: str = one_of(Granularity, "group")
    group_size: int = bounded(128, ge=1)


MODES, GRANULARITIES = get_args(Mode), get_args(Granularity)


@hookimpl
def gym_add_quantizers(registry):
    registry.add("deltaquant", DeltaQuantConfig, "gym_deltaquant.deltaquant:DeltaQuantizer")
