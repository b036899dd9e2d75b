"""BitDelta: Delta_hat = alpha * Sign(Delta) per matrix, alpha = mean|Delta| (the
L2-optimal scale for fixed signs, ALGORITHMS.md §5). Signs are packed 8 per byte."""

from __future__ import annotations

import json

import torch

from gym_bitdelta import BitDeltaConfig
from gym_core.delta import PackedDelta, Quantizer, shapes_meta
from gym_core.errors import GymError

_SHIFTS = torch.arange(8, dtype=torch.uint8)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Booleans (any shape) -> uint8, 8 per byte, little-endian within the byte; the
    tail is zero-padded to a multiple of 8."""
    flat = bits.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) << _SHIFTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` bits as a bool tensor."""
    bits = (packed.unsqueeze(1) >> _SHIFTS) & 1
    return bits.reshape(-1)[:numel].bool()


class BitDeltaQuantizer(Quantizer):
    Config = BitDeltaConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.sign_of_zero not in (1, -1):
            raise GymError(f"quant.sign_of_zero={cfg.sign_of_zero} must be 1 or -1")

    def compressed(self, key: str, tensor: torch.Tensor) -> bool:
        return tensor.dim() == 2 and any(key.endswith(t) for t in self.cfg.targets)

    def quantize(self, delta):
        tensors, num = {}, 0
        for key, d in delta.items():
            d = d.float()
            num += d.numel()
            if self.compressed(key, d):
                positive = d >= 0 if self.cfg.sign_of_zero == 1 else d > 0
                tensors[f"{key}.signs"] = pack_bits(positive)
                tensors[f"{key}.scale"] = d.abs().mean().reshape(1)
            else:
                tensors[f"{key}.full"] = d.clone()
        meta = {"quantizer": "bitdelta", "shapes": shapes_meta(delta),
                "sign_of_zero": str(self.cfg.sign_of_zero)}
        return PackedDelta(tensors, meta, num)

    def dequantize(self, packed):
        if packed.meta.get("quantizer") != "bitdelta":
            raise GymError(
                f"this delta was written by quantizer {packed.meta.get('quantizer')!r}, "
                "not bitdelta: select that one with quant=<name>"
            )
        shapes = json.loads(packed.meta["shapes"])
        out = {}
        for key, shape in shapes.items():
            if f"{key}.full" in packed.tensors:
                out[key] = packed.tensors[f"{key}.full"].float()
                continue
            numel = 1
            for s in shape:
                numel *= s
            bits = unpack_bits(packed.tensors[f"{key}.signs"], numel).view(shape)
            scale = packed.tensors[f"{key}.scale"].float()
            out[key] = scale * (bits.float() * 2 - 1)
        return out
