"""Sign bits packed 8 per byte: the one 1-bit kernel (BitDelta's signs, DeltaQuant's
binary mode, and whatever else stores alpha * sign(D), docs/algorithms.md §9, §10.4).

Layout: the tensor's entries in flat (row-major) order, bit k of byte j is entry 8 j + k
(little-endian within the byte), 1 for a positive entry; the last byte is zero-padded.
"""

from __future__ import annotations

import numba
import numpy as np
import torch


@numba.njit(nogil=True, cache=True, fastmath={"reassoc"})
def _pack_units(x, starts, lengths, strict, out, abs_sums):
    """One pass over fp32 ``x``: sign bits into ``out`` (zeroed by the caller; 1 for
    ``x > 0`` when ``strict``, else ``x >= 0``) and, per unit (contiguous slices that
    partition ``x`` in order), sum|x| in fp64 into ``abs_sums``."""
    for j in range(starts.size):
        a, n = starts[j], lengths[j]
        total = 0.0
        head = min(n, (-a) % 8)  # entries before the unit's first whole byte
        for i in range(a, a + head):
            total += np.float64(abs(x[i]))
            if x[i] > 0 or (not strict and x[i] == 0):
                out[i // 8] |= np.uint8(1 << (i % 8))
        first = (a + head) // 8
        full = (n - head) // 8
        xs = x[a + head : a + head + 8 * full]
        ob = out[first : first + full]
        for b in range(full):  # `strict` is loop-invariant: LLVM hoists the test
            v = np.uint32(0)
            if strict:
                for k in range(8):
                    total += np.float64(abs(xs[8 * b + k]))
                    v |= np.uint32(xs[8 * b + k] > 0) << np.uint32(k)
            else:
                for k in range(8):
                    total += np.float64(abs(xs[8 * b + k]))
                    v |= np.uint32(xs[8 * b + k] >= 0) << np.uint32(k)
            ob[b] = np.uint8(v)
        for i in range(a + head + 8 * full, a + n):
            total += np.float64(abs(x[i]))
            if x[i] > 0 or (not strict and x[i] == 0):
                out[i // 8] |= np.uint8(1 << (i % 8))
        abs_sums[j] = total


def pack_signs(d: torch.Tensor, sign_of_zero: int = 1, unit_starts=None, unit_lengths=None
               ) -> tuple[torch.Tensor, np.ndarray]:
    """The signs of ``d`` (any shape) packed 8 per byte (0 counts as ``sign_of_zero``,
    +1 or -1), and sum|d| in fp64 per unit: the whole tensor, or the contiguous flat
    slices ``unit_starts``/``unit_lengths`` (int64 arrays partitioning it in order)."""
    x = d.detach().float().contiguous().cpu().numpy().reshape(-1)
    if unit_starts is None:
        unit_starts = np.zeros(1, np.int64)
        unit_lengths = np.full(1, x.size, np.int64)
    out = np.zeros((x.size + 7) // 8, np.uint8)
    sums = np.empty(unit_starts.size, np.float64)
    _pack_units(x, unit_starts, unit_lengths, sign_of_zero == -1, out, sums)
    return torch.from_numpy(out), sums


def packed_sign_bytes(numel: int) -> int:
    return (numel + 7) // 8


def unpack_signs(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: the first ``numel`` bits as a bool tensor (True for
    positive). ``packed`` must be uint8 and hold exactly :func:`packed_sign_bytes` bytes
    (NumPy would zero-fill a short buffer into a full-size answer)."""
    if packed.dtype != torch.uint8 or packed.numel() != packed_sign_bytes(numel):
        from gym_core.base.errors import GymError

        raise GymError(f"packed signs are {packed.dtype} with {packed.numel()} entries where "
                       f"{numel} signs need uint8 with {packed_sign_bytes(numel)}: the delta "
                       "file is damaged")
    bits = np.unpackbits(packed.contiguous().cpu().numpy(), count=numel, bitorder="little")
    return torch.from_numpy(bits).bool()
