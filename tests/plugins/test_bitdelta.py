"""BitDelta: exact sign round trip, alpha * sign reconstruction, honest sizes on disk."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from omegaconf import OmegaConf

from gym_bitdelta import BitDeltaConfig
from gym_bitdelta.bitdelta import BitDeltaQuantizer
from gym_core.base.errors import GymError
from gym_core.deltas.delta import apply_delta, load_packed, save_packed


def quantizer(**kw):
    return BitDeltaQuantizer(OmegaConf.structured(BitDeltaConfig(**kw)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_delta_with_nan_or_inf_is_refused_by_name(bad):
    d = torch.zeros(8, 8)
    d[3, 4] = bad
    with pytest.raises(GymError, match=r"'m\.q_proj\.weight' has NaN or infinite"):
        quantizer().quantize({"m.q_proj.weight": d})


def test_reconstruction_is_scale_times_sign():
    g = torch.Generator().manual_seed(0)
    delta = {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 24, generator=g) * 1e-3,
        "model.norm.weight": torch.randn(24, generator=g),
    }
    delta["model.layers.0.self_attn.q_proj.weight"][0, 0] = 0.0
    q = quantizer()
    packed = q.quantize(delta)
    out = q.dequantize(packed)
    d = delta["model.layers.0.self_attn.q_proj.weight"]
    alpha = packed.tensors["model.layers.0.self_attn.q_proj.weight.scale"][0]
    assert alpha.item() == pytest.approx(d.abs().mean().item(), rel=1e-6)  # mean|D|
    sign = torch.where(d >= 0, 1.0, -1.0)  # sign(0) = +1 by default
    assert torch.equal(out["model.layers.0.self_attn.q_proj.weight"], alpha * sign)
    assert out["model.layers.0.self_attn.q_proj.weight"][0, 0] == alpha
    # norms are not projections: stored exactly as they are
    assert torch.equal(out["model.norm.weight"], delta["model.norm.weight"])
    # sign(0) = -1 when asked
    out_neg = quantizer(sign_of_zero=-1).dequantize(quantizer(sign_of_zero=-1).quantize(delta))
    assert out_neg["model.layers.0.self_attn.q_proj.weight"][0, 0] == -alpha


def test_alpha_is_the_l2_optimal_scale():
    d = torch.randn(32, 32, generator=torch.Generator().manual_seed(1))
    q = quantizer()
    best = q.dequantize(q.quantize({"a.o_proj.weight": d}))["a.o_proj.weight"]
    err = (best - d).norm()
    sign = torch.where(d >= 0, 1.0, -1.0)
    for factor in (0.9, 1.1):
        assert (factor * best.abs().max() * sign - d).norm() > err


def test_file_size_matches_stated_bits_per_weight(tmp_path):
    g = torch.Generator().manual_seed(2)
    delta = {f"l{i}.mlp.up_proj.weight": torch.randn(64, 96, generator=g) for i in range(3)}
    packed = quantizer().quantize(delta)
    n = 3 * 64 * 96
    # one bit per weight plus one fp32 scale per matrix
    assert packed.bits_per_weight == pytest.approx((n + 3 * 32) / n)
    assert packed.compression_ratio == pytest.approx(16 / packed.bits_per_weight)
    path = tmp_path / "delta.safetensors"
    size = save_packed(packed, path)
    assert size == path.stat().st_size
    with path.open("rb") as fh:
        header_len = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(header_len))
    data_bytes = size - 8 - header_len
    assert data_bytes == packed.nbytes == n // 8 + 3 * 4
    assert 8 * data_bytes / n == pytest.approx(packed.bits_per_weight)
    assert header["__metadata__"]["quantizer"] == "bitdelta"
    restored = quantizer().dequantize(load_packed(path))
    assert set(restored) == set(delta)


def test_apply_delta_adds_in_fp32():
    lin = torch.nn.Linear(4, 4, bias=False)
    before = lin.weight.detach().clone()
    d = torch.full((4, 4), 1e-3)
    apply_delta(lin, {"weight": d})
    assert torch.allclose(lin.weight, before + d)
