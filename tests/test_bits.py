"""The core's 1-bit kernel (gym_core.deltas.bits): sign bits packed 8 per byte with sum|x| per
unit from the same pass, as BitDelta (one unit per matrix) and DeltaQuant's binary mode
(one unit per channel or group) use it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gym_core.deltas.bits import pack_signs, unpack_signs


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 64, 1000, 4099])
@pytest.mark.parametrize("sign_of_zero", [1, -1])
def test_signs_round_trip_exactly_and_mean_abs_comes_from_the_same_pass(numel, sign_of_zero):
    d = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    d[:: 5] = 0.0  # zeros, +0 and -0, take sign_of_zero
    d[1:: 7] = -0.0
    packed, sums = pack_signs(d, sign_of_zero)
    mean_abs = sums[0] / numel
    assert packed.dtype == torch.uint8 and packed.numel() == (numel + 7) // 8
    positive = d >= 0 if sign_of_zero == 1 else d > 0
    assert torch.equal(unpack_signs(packed, numel), positive)
    assert mean_abs == pytest.approx(d.double().abs().mean().item(), rel=1e-12)
    tail = numel % 8
    if tail:  # the padding bits of the last byte are zero
        assert packed[-1].item() >> tail == 0


def test_packing_layout_is_little_endian_per_byte():
    d = torch.tensor([1, -1, -1, -1, -1, -1, -1, -1, -1, 1, -1, -1, -1, -1, -1, 1.0])
    assert pack_signs(d)[0].tolist() == [1, 2 + 128]



@pytest.mark.parametrize("numel,cuts", [(10, [3]), (64, [8, 16, 40]), (37, [1, 2, 9, 17, 30]),
                                        (5, [])])
@pytest.mark.parametrize("sign_of_zero", [1, -1])
def test_units_give_the_same_bits_and_each_unit_its_own_sum(numel, cuts, sign_of_zero):
    d = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    d[::4] = 0.0
    starts = np.array([0, *cuts], np.int64)
    lengths = np.diff(np.append(starts, numel)).astype(np.int64)
    whole, _ = pack_signs(d, sign_of_zero)
    packed, sums = pack_signs(d, sign_of_zero, starts, lengths)
    assert torch.equal(packed, whole)  # unit boundaries never change the bit layout
    for a, n, got in zip(starts, lengths, sums):
        assert got == pytest.approx(d[a:a + n].double().abs().sum().item(), rel=1e-12, abs=0)
