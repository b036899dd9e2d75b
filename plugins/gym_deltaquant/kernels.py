"""DeltaQuant's fused CPU kernels (numba): per unit, the statistics, the scale and the
codes in one call, the unit still in cache for the second pass; then the packing.

A tensor is seen as ``rows`` rows of ``cols`` entries, each row cut into units of
``gs`` entries (the last one shorter when ``gs`` does not divide ``cols``): per tensor
granularity is ``cols = gs = numel``, per channel ``gs = cols``. Unit ``(r, g)`` is the
flat slice ``[r cols + g gs, r cols + min((g + 1) gs, cols))``; its outputs sit at index
``r ng + g`` with ``ng = ceil(cols / gs)``. :func:`unit_spans` lists the units; the
kernels take that list.

Every loop runs over a slice from index 0 so that LLVM can prove the indices
non-negative and vectorise (an index numba might have to wrap around blocks SIMD).
max|x| is taken on the IEEE bit patterns as unsigned integers (the same order for
non-negative floats, and a NaN sorts above inf, so it is never lost): numba's float
``max`` does not vectorise. The formulas are those of docs/algorithms.md §10, in fp32 like
the torch expressions in the docstrings, with sums accumulated in fp64.
"""

from __future__ import annotations

import numba
import numpy as np

_ABS = np.uint32(0x7FFFFFFF)
_LOW31 = np.int32(0x7FFFFFFF)


@numba.njit(nogil=True, cache=True)
def unit_spans(size, cols, gs):
    """Start and length of every unit of a flat tensor of ``size`` entries, in output
    order: unit ``(r, g)`` at index ``r ng + g``."""
    ng = (cols + gs - 1) // gs
    starts = np.empty(size // cols * ng, np.int64)
    lengths = np.empty_like(starts)
    for r in range(size // cols):
        for g in range(ng):
            starts[r * ng + g] = r * cols + g * gs
            lengths[r * ng + g] = min(gs, cols - g * gs)
    return starts, lengths


@numba.njit(nogil=True, cache=True)
def sym_units(x, starts, lengths, qmax, scale, codes):
    """kbit symmetric: s = max|u| / qmax; code = round(u / s) + qmax (s = 0: code qmax)."""
    bits = x.view(np.uint32)
    cast = np.empty(1, np.uint32)  # max|u|'s bits, read back as a float
    cast_f = cast.view(np.float32)
    for j in range(starts.size):
        a, n = starts[j], lengths[j]
        ub = bits[a : a + n]
        m = np.uint32(0)
        for i in range(n):
            v = ub[i] & _ABS
            m = v if v > m else m
        cast[0] = m
        s = cast_f[0] / np.float32(qmax)
        scale[j] = s
        safe = s if s > 0 else np.float32(1.0)
        u = x[a : a + n]
        c = codes[a : a + n]
        for i in range(n):  # |u / s| <= qmax: no clamp needed
            c[i] = np.uint8(np.rint(u[i] / safe) + np.float32(qmax))


@numba.njit(nogil=True, cache=True)
def asym_units(x, starts, lengths, levels, scale, zero, codes):
    """kbit asymmetric on [min(u, 0), max(u, 0)]: s = (hi - lo) / levels,
    z = clamp(round(-lo / s), 0, levels), code = clamp(round(u / s) + z, 0, levels)."""
    keys = x.view(np.int32)  # IEEE bits -> int32 in the floats' order
    ends = np.empty(2, np.int32)  # min and max keys, read back as floats
    ends_f = ends.view(np.float32)
    for j in range(starts.size):
        a, n = starts[j], lengths[j]
        uk = keys[a : a + n]
        kmin = np.int32(0x7FFFFFFF)
        kmax = np.int32(-0x80000000)
        for i in range(n):
            k = uk[i] ^ ((uk[i] >> 31) & _LOW31)
            kmin = k if k < kmin else kmin
            kmax = k if k > kmax else kmax
        ends[0] = kmin ^ ((kmin >> 31) & _LOW31)
        ends[1] = kmax ^ ((kmax >> 31) & _LOW31)
        lo = min(ends_f[0], np.float32(0.0))
        hi = max(ends_f[1], np.float32(0.0))
        s = (hi - lo) / np.float32(levels)
        safe = s if s > 0 else np.float32(1.0)
        z = min(max(np.rint(-lo / safe), np.float32(0.0)), np.float32(levels))
        scale[j] = s
        zero[j] = np.uint8(z)
        u = x[a : a + n]
        c = codes[a : a + n]
        for i in range(n):
            q = np.rint(u[i] / safe) + z
            c[i] = np.uint8(min(max(q, np.float32(0.0)), np.float32(levels)))


@numba.njit(nogil=True, cache=True, fastmath={"reassoc"})
def ternary_units(x, starts, lengths, alpha, codes):
    """ternary (TWN): t = 0.7 mean|u|, keep = |u| > t, alpha = mean |u| over kept
    entries (NaN when the unit is not finite), code = sign(u) keep + 1."""
    for j in range(starts.size):
        a, n = starts[j], lengths[j]
        u = x[a : a + n]
        total = 0.0
        for i in range(n):
            total += np.float64(abs(u[i]))
        t = np.float32(0.7 * total / n)
        kept_sum = 0.0
        kept = 0
        c = codes[a : a + n]
        for i in range(n):
            m = abs(u[i])
            keep = m > t
            kept_sum += np.float64(m) if keep else 0.0
            kept += 1 if keep else 0
            c[i] = np.uint8(1 + (keep and u[i] > 0) - (keep and u[i] < 0))
        # a NaN or inf in the unit keeps nothing: report it through the scale
        finite = np.isfinite(total)
        alpha[j] = np.float32(kept_sum / max(kept, 1)) if finite else np.nan


@numba.njit(nogil=True, cache=True)
def pack_whole(codes, bits, out):
    """Codes of 1, 2 or 4 bits, ``8 // bits`` per byte, the first in the low bits."""
    per = 8 // bits
    if per == 8:
        for j in range(out.size):
            c = codes[8 * j : 8 * j + 8]
            out[j] = (c[0] | (c[1] << 1) | (c[2] << 2) | (c[3] << 3) | (c[4] << 4)
                      | (c[5] << 5) | (c[6] << 6) | (c[7] << 7))
    elif per == 4:
        for j in range(out.size):
            c = codes[4 * j : 4 * j + 4]
            out[j] = c[0] | (c[1] << 2) | (c[2] << 4) | (c[3] << 6)
    else:
        for j in range(out.size):
            out[j] = codes[2 * j] | (codes[2 * j + 1] << 4)


@numba.njit(nogil=True, cache=True)
def pack_3bit(codes, out):
    """Eight 3-bit codes as one 24-bit little-endian integer in three bytes."""
    for j in range(out.size // 3):
        c = codes[8 * j : 8 * j + 8]
        v = np.uint32(0)
        for k in range(8):
            v |= np.uint32(c[k]) << np.uint32(3 * k)
        o = out[3 * j : 3 * j + 3]
        o[0] = np.uint8(v & 0xFF)
        o[1] = np.uint8((v >> 8) & 0xFF)
        o[2] = np.uint8(v >> 16)


@numba.njit(nogil=True, cache=True)
def pack_trits(codes, out):
    """Five codes in {0, 1, 2} per byte in base 3, the first least significant."""
    for j in range(out.size):
        c = codes[5 * j : 5 * j + 5]
        out[j] = c[0] + 3 * c[1] + 9 * c[2] + 27 * c[3] + 81 * c[4]
