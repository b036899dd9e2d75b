"""Absmax delta quantization: per tensor, one fp32 scale s = max|d| / q_max and one
signed integer q = round(d / s) in [-q_max, q_max] per weight (q_max = 2^(bits-1) - 1).

8 bits store q as int8 (8 bits per weight plus 32 per tensor); 4 bits store q + 8 in a
nibble, two per byte, low nibble first (4 bits per weight). Scales stay fp32 and the
delta is rebuilt in fp32: a fine-tune's deltas are ~1e-3 and would lose digits in bf16
(docs/algorithms.md §10).
"""

from __future__ import annotations

import math

import torch
from gym_core.api import GymError, MatrixQuantizer

from gym_example_plugin import AbsmaxConfig

BITS = (4, 8)


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """Integers in [0, 15] (any shape) -> uint8, two per byte, the first in the low
    nibble; an odd count is padded with a zero nibble."""
    flat = values.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: the first ``numel`` values as uint8."""
    both = torch.stack([packed & 0x0F, packed >> 4], dim=1)
    return both.reshape(-1)[:numel]


class AbsmaxQuantizer(MatrixQuantizer):
    """Built on gym's matrix-quantizer shell: it picks the target matrices
    (``quant.targets``), stores every other tensor exactly, records shapes and the
    quantizer's name, and checks every stored part against :meth:`part_specs` before
    :meth:`dequantize_matrix` reads it. This class holds only the scheme."""

    Config = AbsmaxConfig

    def __init__(self, cfg):
        super().__init__(cfg)  # bits is 4 or 8: AbsmaxConfig declares it
        self.bits = int(cfg.bits)
        self.qmax = 2 ** (self.bits - 1) - 1

    def file_meta(self):
        return {"bits": str(self.bits)}

    def quantize_matrix(self, key, d):
        peak = d.abs().max()
        if not torch.isfinite(peak):
            raise GymError(f"delta tensor '{key}' has NaN or infinite entries")
        # An all-zero tensor gets scale 1 (any scale reconstructs zeros exactly).
        scale = peak / self.qmax if peak > 0 else torch.tensor(1.0)
        q = torch.round(d / scale).clamp(-self.qmax, self.qmax).to(torch.int8).reshape(-1)
        stored = q if self.bits == 8 else pack_nibbles((q + 8).to(torch.uint8))
        return {"q": stored, "scale": scale.reshape(1).float()}

    def part_specs(self, shape, meta):
        numel = math.prod(shape)
        if meta.get("bits") == "8":
            return {"q": (torch.int8, numel), "scale": (torch.float32, 1)}
        if meta.get("bits") == "4":
            return {"q": (torch.uint8, (numel + 1) // 2), "scale": (torch.float32, 1)}
        raise GymError(f"bits={meta.get('bits')!r} in the file's metadata: absmax writes 4 or 8")

    def dequantize_matrix(self, key, shape, parts, meta):
        numel = math.prod(shape)
        if meta["bits"] == "8":
            q = parts["q"].to(torch.float32)
        else:
            q = unpack_nibbles(parts["q"], numel).to(torch.float32) - 8
        return (q * parts["scale"]).view(shape)
