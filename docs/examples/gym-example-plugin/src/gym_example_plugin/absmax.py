"""Absmax delta quantization: per tensor, one fp32 scale s = max|d| / q_max and one
signed integer q = round(d / s) in [-q_max, q_max] per weight (q_max = 2^(bits-1) - 1).

8 bits store q as int8 (8 bits per weight plus 32 per tensor); 4 bits store q + 8 in a
nibble, two per byte, low nibble first (4 bits per weight). Scales stay fp32 and the
delta is rebuilt in fp32: a fine-tune's deltas are ~1e-3 and would lose digits in bf16
(ALGORITHMS.md §6).
"""

from __future__ import annotations

import json

import torch
from gym_core.delta import PackedDelta, Quantizer, shapes_meta
from gym_core.errors import GymError

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


class AbsmaxQuantizer(Quantizer):
    Config = AbsmaxConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.bits not in BITS:
            raise GymError(f"quant.bits={cfg.bits}: absmax packs 4 or 8 bits per weight")
        self.qmax = 2 ** (cfg.bits - 1) - 1

    def quantize(self, delta):
        tensors, num = {}, 0
        for key, d in delta.items():
            d = d.detach().float().cpu()
            num += d.numel()
            peak = d.abs().max()
            # An all-zero tensor gets scale 1 (any scale reconstructs zeros exactly).
            scale = peak / self.qmax if peak > 0 else torch.tensor(1.0)
            q = torch.round(d / scale).clamp(-self.qmax, self.qmax).to(torch.int8)
            if self.cfg.bits == 8:
                tensors[f"{key}.q"] = q.reshape(-1)
            else:
                tensors[f"{key}.q"] = pack_nibbles((q + 8).to(torch.uint8))
            tensors[f"{key}.scale"] = scale.reshape(1).float()
        meta = {"quantizer": self.cfg.name, "bits": str(self.cfg.bits),
                "shapes": shapes_meta(delta)}
        return PackedDelta(tensors, meta, num)

    def dequantize(self, packed):
        if packed.meta.get("quantizer") != self.cfg.name:
            raise GymError(
                f"this delta was written by quantizer {packed.meta.get('quantizer')!r}, not "
                f"{self.cfg.name}: select that one with quant=<name>"
            )
        bits = int(packed.meta["bits"])
        out = {}
        for key, shape in json.loads(packed.meta["shapes"]).items():
            numel = 1
            for s in shape:
                numel *= s
            stored = packed.tensors[f"{key}.q"]
            if bits == 8:
                q = stored.to(torch.float32)
            else:
                q = unpack_nibbles(stored, numel).to(torch.float32) - 8
            out[key] = (q * packed.tensors[f"{key}.scale"].float()).view(shape)
        return out
