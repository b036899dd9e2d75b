"""DeltaQuant: round-to-nearest quantization of a delta (docs/algorithms.md §10), with the
integers packed densely into bytes and the scales kept in fp32.

Each quantized matrix D[out, in] is viewed as *units* (one row of the view per scale):
the whole tensor, each output channel, or each group of ``group_size`` input columns of
a row (a short last group when ``in`` is not a multiple). Per unit:

- kbit symmetric: s = max|D| / (2^(k-1)-1), q = clamp(round(D/s), -(2^(k-1)-1), 2^(k-1)-1),
  stored as q + 2^(k-1)-1 in [0, 2^k-2]; D_hat = s (stored - (2^(k-1)-1)).
- kbit asymmetric: the range [min(D, 0), max(D, 0)] (zero stays exactly representable),
  s = (max-min) / (2^k-1), z = round(-min/s), q = clamp(round(D/s)+z, 0, 2^k-1);
  D_hat = s (q - z). z is stored as one uint8 per unit.
- binary: D_hat = alpha sign(D), alpha = mean|D| (sign(0) = +1).
- ternary (TWN): t = 0.7 mean|D|, q = sign(D) 1[|D| > t], alpha = mean|D| over kept
  entries; q + 1 in {0, 1, 2} packed five to a byte (3^5 = 243 <= 256).

k-bit codes are packed eight to k bytes, little-endian: code i of a block of eight
occupies bits [k i, k (i+1)) of the block's k-byte integer (3 bits: 8 codes in 3 bytes).
Only the matrix's real entries are packed (no group padding); a tensor's code count is
padded to a multiple of 8 (of 5 for ternary).

Quantizing runs in fused numba kernels (:mod:`gym_deltaquant.kernels`: statistics,
scale and codes in one call per tensor, then the packing), one tensor per core;
dequantizing is plain torch.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gym_core.api import GymError, MatrixQuantizer, pack_signs, unpack_signs
from gym_deltaquant import GRANULARITIES, KBITS, MODES, DeltaQuantConfig, kernels

_TRIT_POWERS = torch.tensor([1, 3, 9, 27, 81], dtype=torch.uint8)


# ----------------------------------------------------------------------------------------
# bit packing
# ----------------------------------------------------------------------------------------


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits take: blocks of 8 codes in ``bits`` bytes."""
    return math.ceil(numel / 8) * bits


def _flat_codes(codes, block: int) -> np.ndarray:
    """uint8 codes (tensor or array, any shape) as a flat array zero-padded to whole
    blocks; no copy when they already are."""
    flat = codes.reshape(-1).numpy() if isinstance(codes, torch.Tensor) else codes.reshape(-1)
    flat = np.ascontiguousarray(flat, dtype=np.uint8)
    pad = (-flat.size) % block
    return np.concatenate([flat, np.zeros(pad, np.uint8)]) if pad else flat


def pack_codes(codes, bits: int) -> torch.Tensor:
    """Unsigned integer codes < 2**bits (uint8 tensor or array, any shape) -> a flat
    uint8 tensor."""
    codes = _flat_codes(codes, 8)
    if bits == 8:
        return torch.from_numpy(codes)
    out = np.empty(packed_nbytes(codes.size, bits), np.uint8)
    if bits == 3:
        kernels.pack_3bit(codes, out)
    else:
        kernels.pack_whole(codes, bits, out)
    return torch.from_numpy(out)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes as a flat uint8 tensor."""
    if packed.numel() != packed_nbytes(numel, bits):
        raise GymError(
            f"a packed tensor has {packed.numel()} bytes where {numel} codes of {bits} bits "
            f"need {packed_nbytes(numel, bits)}: the delta file is damaged or not DeltaQuant's"
        )
    if bits == 8:
        return packed[:numel]
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        return ((packed.unsqueeze(1) >> shifts) & mask).reshape(-1)[:numel]
    byte_shifts = torch.arange(0, 8 * bits, 8, dtype=torch.int64)
    block = (packed.view(-1, bits).to(torch.int64) << byte_shifts).sum(dim=1)
    shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64)
    return ((block.unsqueeze(1) >> shifts) & mask).to(torch.uint8).reshape(-1)[:numel]


def pack_trits(codes) -> torch.Tensor:
    """Codes in {0, 1, 2} (uint8 tensor or array, any shape) -> uint8, five per byte in
    base 3 (first code least significant)."""
    codes = _flat_codes(codes, 5)
    out = np.empty(codes.size // 5, np.uint8)
    kernels.pack_trits(codes, out)
    return torch.from_numpy(out)


def unpack_trits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    if packed.numel() != math.ceil(numel / 5):
        raise GymError(
            f"a ternary tensor has {packed.numel()} bytes where {numel} values need "
            f"{math.ceil(numel / 5)}: the delta file is damaged or not DeltaQuant's"
        )
    return ((packed.unsqueeze(1) // _TRIT_POWERS) % 3).reshape(-1)[:numel]


# ----------------------------------------------------------------------------------------
# units: the rows of the view that share one scale
# ----------------------------------------------------------------------------------------


def _layout(shape, granularity: str, group_size: int):
    """(rows, cols, groups per row) of the unit view of a tensor of ``shape``."""
    rows, cols = (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (1, math.prod(shape))
    if granularity == "tensor":
        return 1, rows * cols, 1
    if granularity == "channel":
        return rows, cols, 1
    return rows, cols, math.ceil(cols / group_size)


def to_units(d: torch.Tensor, granularity: str, group_size: int) -> torch.Tensor:
    """``d`` as [units, unit_len], one row per scale (a short last group zero-padded)."""
    rows, cols, groups = _layout(d.shape, granularity, group_size)
    x = d.reshape(rows, cols)
    if granularity != "group":
        return x
    pad = groups * group_size - cols
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(rows * groups, group_size)


def from_units(x: torch.Tensor, shape, granularity: str, group_size: int) -> torch.Tensor:
    """Inverse of :func:`to_units`: drop the group padding, back to ``shape``."""
    rows, cols, _ = _layout(shape, granularity, group_size)
    return x.reshape(rows, -1)[:, :cols].reshape(shape)


# ----------------------------------------------------------------------------------------
# the quantizer
# ----------------------------------------------------------------------------------------


class DeltaQuantizer(MatrixQuantizer):
    Config = DeltaQuantConfig

    def __init__(self, cfg):
        super().__init__(cfg)  # values checked against DeltaQuantConfig's declarations
        # plain values: each OmegaConf attribute read costs microseconds, under the GIL
        self.opts = {"mode": str(cfg.mode), "bits": int(cfg.bits),
                     "symmetric": bool(cfg.symmetric), "granularity": str(cfg.granularity),
                     "group_size": int(cfg.group_size)}

    def file_meta(self):
        o = self.opts
        return {"mode": o["mode"], "bits": str(o["bits"]),
                "symmetric": str(o["symmetric"]).lower(), "granularity": o["granularity"],
                "group_size": str(o["group_size"])}

    def quantize_matrix(self, key, d):
        return quantize_tensor(key, d, **self.opts)

    @staticmethod
    def _settings(meta):
        try:
            mode, bits = meta["mode"], int(meta["bits"])
            granularity, group_size = meta["granularity"], int(meta["group_size"])
            symmetric = meta["symmetric"] == "true"
        except (KeyError, ValueError) as exc:
            raise GymError(f"the delta's DeltaQuant settings are missing or unreadable "
                           f"({exc}): the file is damaged") from None
        if (mode not in MODES or granularity not in GRANULARITIES or group_size < 1
                or (mode == "kbit" and bits not in KBITS)):
            raise GymError(f"the delta's DeltaQuant settings (mode {mode!r}, bits {bits}, "
                           f"granularity {granularity!r}, group size {group_size}) are not "
                           "ones DeltaQuant writes: the file is damaged")
        return mode, bits, symmetric, granularity, group_size

    def part_specs(self, shape, meta):
        mode, bits, symmetric, granularity, group_size = self._settings(meta)
        numel = math.prod(shape)
        rows, _, groups = _layout(shape, granularity, group_size)
        units = rows * groups if granularity != "tensor" else 1
        if mode == "ternary":
            codes = math.ceil(numel / 5)
        elif mode == "binary":
            codes = (numel + 7) // 8
        else:
            codes = packed_nbytes(numel, bits)
        specs = {"codes": (torch.uint8, codes), "scale": (torch.float32, units)}
        if mode == "kbit" and not symmetric:
            specs["zero"] = (torch.uint8, units)
        return specs

    def dequantize_matrix(self, key, shape, parts, meta):
        mode, bits, symmetric, granularity, group_size = self._settings(meta)
        numel = math.prod(shape)
        if mode == "ternary":
            codes = unpack_trits(parts["codes"], numel)
        elif mode == "binary":
            codes = unpack_signs(parts["codes"], numel)
        else:
            codes = unpack_codes(parts["codes"], bits, numel)
        units = to_units(codes.view(shape).float(), granularity, group_size)
        scale = parts["scale"].float().unsqueeze(1)
        if mode == "binary":
            values = scale * (units * 2 - 1)
        elif mode == "ternary":
            values = scale * (units - 1)
        elif symmetric:
            values = scale * (units - (2 ** (bits - 1) - 1))
        else:
            values = scale * (units - parts["zero"].float().unsqueeze(1))
        return from_units(values, shape, granularity, group_size)


def quantize_tensor(key: str, d: torch.Tensor, mode: str, bits: int, symmetric: bool,
                    granularity: str, group_size: int) -> dict[str, torch.Tensor]:
    """One matrix -> its packed codes, fp32 scales and (asymmetric) zero points."""
    x = d.detach().float().contiguous().cpu().numpy().reshape(-1)
    _, cols, _ = _layout(d.shape, granularity, group_size)
    starts, lengths = kernels.unit_spans(x.size, cols,
                                         group_size if granularity == "group" else cols)
    out = {}
    if mode == "binary":  # alpha sign(D) per unit: the core's 1-bit kernel
        out["codes"], sums = pack_signs(d, 1, starts, lengths)
        scale = (sums / lengths).astype(np.float32)
    else:
        per_block = 5 if mode == "ternary" else 8
        codes = np.empty(math.ceil(x.size / per_block) * per_block, np.uint8)
        codes[x.size:] = 0  # the padding codes of the last block
        scale = np.empty(starts.size, np.float32)
        if mode == "ternary":
            kernels.ternary_units(x, starts, lengths, scale, codes)
            out["codes"] = pack_trits(codes)
        elif symmetric:
            kernels.sym_units(x, starts, lengths, 2 ** (bits - 1) - 1, scale, codes)
            out["codes"] = pack_codes(codes, bits)
        else:
            zero = np.empty(starts.size, np.uint8)
            kernels.asym_units(x, starts, lengths, 2**bits - 1, scale, zero, codes)
            out["codes"] = pack_codes(codes, bits)
            out["zero"] = torch.from_numpy(zero)
    if not np.isfinite(scale).all():
        raise GymError(
            f"delta tensor '{key}' has NaN or infinite entries: the fine-tuned weights "
            "diverged; quantize a checkpoint from before that"
        )
    out["scale"] = torch.from_numpy(scale)
    return out
