"""DeltaQuant: exact packed sizes, bit layouts, error bounds, the quantizer contract."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from gym_core.base.errors import GymError
from gym_core.contracts.quantizer import QuantizerContract, data_bytes_on_disk
from gym_core.deltas.delta import load_packed, read_delta, reconstruction_error, save_packed
from gym_core.plugin.startup import bootstrap
from gym_deltaquant import DeltaQuantConfig
from gym_deltaquant.deltaquant import (
    DeltaQuantizer,
    pack_codes,
    pack_trits,
    unpack_codes,
    unpack_trits,
)

KEY = "model.layers.0.mlp.up_proj.weight"


def quantizer(**kw):
    return DeltaQuantizer(OmegaConf.structured(DeltaQuantConfig(**kw)))


def randn(*shape, seed=0, scale=1e-3):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


class TestDeltaQuantContract(QuantizerContract):
    @pytest.fixture(params=[
        {"bits": 2}, {"bits": 3}, {"bits": 4, "granularity": "channel"},
        {"bits": 8, "symmetric": False, "granularity": "tensor"},
        {"bits": 3, "symmetric": False}, {"mode": "binary"}, {"mode": "ternary"},
    ], ids=lambda p: "-".join(f"{k}{v}" for k, v in p.items()))
    def quantizer(self, request):
        return quantizer(**request.param)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("numel", [1, 7, 8, 13, 1000])
def test_codes_round_trip_exactly(bits, numel):
    codes = torch.randint(0, 2**bits, (numel,), generator=torch.Generator().manual_seed(numel),
                          dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(numel / 8) * bits
    assert torch.equal(unpack_codes(packed, bits, numel), codes)


def test_three_bit_layout_packs_eight_codes_into_three_bytes():
    # codes 0..7: bits laid out little-endian, 3 per code: the 24-bit integer
    # sum(c_i << 3i) = 0b111_110_101_100_011_010_001_000 = 0xFAC688
    packed = pack_codes(torch.arange(8, dtype=torch.uint8), 3)
    assert packed.tolist() == [0x88, 0xC6, 0xFA]
    assert pack_codes(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 4).tolist() == [0x21, 0x03, 0, 0]  # padded to 8 codes


def test_ternary_packs_five_values_per_byte():
    codes = torch.tensor([2, 1, 0, 2, 1, 2], dtype=torch.uint8)
    packed = pack_trits(codes)
    assert packed.tolist() == [2 + 1 * 3 + 0 * 9 + 2 * 27 + 1 * 81, 2]
    assert torch.equal(unpack_trits(packed, 6), codes)


@pytest.mark.parametrize(("kw", "data_bytes"), [
    # 96 x 200 = 19200 weights; 200 columns make 2 groups of 128 per row (one short)
    ({"bits": 4}, 19200 * 4 // 8 + 96 * 2 * 4),
    ({"bits": 3}, 19200 * 3 // 8 + 96 * 2 * 4),
    ({"bits": 2, "granularity": "channel"}, 19200 * 2 // 8 + 96 * 4),
    ({"bits": 8, "granularity": "tensor"}, 19200 + 4),
    ({"bits": 4, "symmetric": False}, 19200 // 2 + 96 * 2 * (4 + 1)),  # + a uint8 zero point
    ({"mode": "binary", "granularity": "channel"}, 19200 // 8 + 96 * 4),
    ({"mode": "ternary", "granularity": "tensor"}, 19200 // 5 + 4),
])
def test_exact_packed_sizes_on_disk(tmp_path, kw, data_bytes):
    packed = quantizer(**kw).quantize({KEY: randn(96, 200)})
    path = tmp_path / "d.safetensors"
    save_packed(packed, path)
    assert data_bytes_on_disk(path) == packed.nbytes == data_bytes
    assert packed.bits_per_weight == pytest.approx(8 * data_bytes / 19200)


def test_int4_group_128_is_4_25_bits_per_weight():
    packed = quantizer(bits=4).quantize({KEY: randn(64, 1024)})
    assert packed.bits_per_weight == pytest.approx(4 + 32 / 128)  # fp32 scale per group


def test_int8_per_channel_relative_error_is_under_one_percent():
    d = randn(256, 512, seed=3)
    q = quantizer(bits=8, granularity="channel")
    err = reconstruction_error({KEY: d}, q.dequantize(q.quantize({KEY: d})))["total"]
    # rounding error is uniform within +-s/2, s = max|row| / 127: for Gaussian rows
    # ~ (max/127) / sqrt(12) / std ~ 0.9%; measured 0.76%
    assert err["rel_fro_error"] < 0.01
    assert err["snr_db"] > 40 and err["cosine"] > 0.9999


def test_symmetric_int4_matches_the_formula_by_hand():
    d = torch.tensor([[0.7, -0.35, 0.1, 0.0]])
    q = quantizer(bits=4, granularity="channel")
    out = q.dequantize(q.quantize({KEY: d}))[KEY]
    s = 0.7 / 7  # max|D| / (2^3 - 1)
    assert torch.allclose(out, torch.tensor([[7, -4, 1, 0]]) * s)  # round(-3.5) = -4


def test_asymmetric_uses_a_zero_point():
    d = torch.tensor([[0.1, 0.2, 0.3, 0.4]])  # all positive: the range is [0, 0.4]
    q = quantizer(bits=2, symmetric=False, granularity="channel")
    packed = q.quantize({KEY: d})
    assert packed.tensors[f"{KEY}.zero"].tolist() == [0]
    s = 0.4 / 3
    assert torch.allclose(q.dequantize(packed)[KEY], torch.round(d / s) * s)


def test_finer_granularity_is_more_accurate():
    d = randn(64, 512, seed=4) * torch.logspace(-1, 1, 512)  # column scales vary 100x
    errs = []
    for g in ("tensor", "channel", "group"):
        q = quantizer(bits=4, granularity=g, group_size=64)
        errs.append(reconstruction_error({KEY: d}, q.dequantize(q.quantize({KEY: d})))
                    ["total"]["rel_fro_error"])
    assert errs[0] > errs[1] > errs[2]


def test_ternary_follows_twn():
    d = torch.tensor([[1.0, -0.1, 0.5, -2.0]])
    q = quantizer(mode="ternary", granularity="channel")
    out = q.dequantize(q.quantize({KEY: d}))[KEY]
    t = 0.7 * d.abs().mean()  # 0.63: keeps 1.0 and -2.0, drops 0.5 and -0.1
    alpha = (1.0 + 2.0) / 2
    assert float(t) == pytest.approx(0.63)
    assert torch.allclose(out, torch.tensor([[alpha, 0, 0, -alpha]]))


def reference_codes(d, mode, bits, symmetric, granularity, group_size):
    """The formulas of docs/algorithms.md §10 in plain torch, unit by unit: codes (flat, the
    matrix's order), scales and zero points, to check the fused kernels against."""
    rows, cols = d.shape
    if granularity == "tensor":
        units = [d.reshape(-1)]
    else:
        size = cols if granularity == "channel" else group_size
        units = [row[i:i + size] for row in d for i in range(0, cols, size)]
    codes, scales, zeros = [], [], []
    for u in units:
        if mode == "binary":
            scales.append(u.abs().mean())
            codes.append((u >= 0).to(torch.uint8))
        elif mode == "ternary":
            keep = u.abs() > 0.7 * u.abs().mean()
            scales.append(u.abs()[keep].sum() / keep.sum().clamp_min(1))
            codes.append((torch.sign(u) * keep + 1).to(torch.uint8))
        elif symmetric:
            qmax = 2 ** (bits - 1) - 1
            s = u.abs().max() / qmax
            scales.append(s)
            codes.append((torch.round(u / (s if s > 0 else 1.0)) + qmax).to(torch.uint8))
        else:
            levels = 2**bits - 1
            lo, hi = u.min().clamp_max(0), u.max().clamp_min(0)
            s = (hi - lo) / levels
            safe = s if s > 0 else torch.tensor(1.0)
            z = torch.round(-lo / safe).clamp(0, levels)
            scales.append(s)
            zeros.append(z.to(torch.uint8))
            codes.append((torch.round(u / safe) + z).clamp(0, levels).to(torch.uint8))
    return (torch.cat(codes), torch.stack(scales).float(),
            torch.stack(zeros) if zeros else None)


@pytest.mark.parametrize(("mode", "bits", "symmetric"), [
    ("kbit", 2, True), ("kbit", 3, True), ("kbit", 4, True), ("kbit", 8, True),
    ("kbit", 3, False), ("kbit", 4, False), ("binary", 4, True), ("ternary", 4, True),
])
@pytest.mark.parametrize(("granularity", "group_size"), [
    ("tensor", 128), ("channel", 128), ("group", 4), ("group", 7), ("group", 128),
])
@pytest.mark.parametrize("shape", [(7, 5), (33, 130)])
def test_fused_kernels_equal_the_formulas_unit_by_unit(shape, mode, bits, symmetric,
                                                       granularity, group_size):
    d = randn(*shape, seed=sum(shape))
    d[0, :3] = 0.0  # exact zeros; with (7, 5) and group 4 a unit of one zero and a short one
    d[1, 1] = -0.0
    q = quantizer(mode=mode, bits=bits, symmetric=symmetric, granularity=granularity,
                  group_size=group_size)
    packed = q.quantize({KEY: d})
    codes, scales, zeros = reference_codes(d, mode, bits, symmetric, granularity, group_size)
    if mode == "ternary":
        assert torch.equal(packed.tensors[f"{KEY}.codes"], pack_trits(codes))
    else:
        assert torch.equal(packed.tensors[f"{KEY}.codes"],
                           pack_codes(codes, 1 if mode == "binary" else bits))
    # kbit scales are the same fp32 division; binary/ternary means are summed in fp64
    assert torch.allclose(packed.tensors[f"{KEY}.scale"], scales, rtol=1e-6, atol=0)
    if zeros is not None:
        assert torch.equal(packed.tensors[f"{KEY}.zero"], zeros)


@pytest.mark.parametrize("kw", [{"bits": 4}, {"bits": 3, "symmetric": False},
                                {"mode": "binary"}, {"mode": "ternary"}])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_delta_with_nan_or_inf_is_refused_by_name(kw, bad):
    d = randn(16, 300)
    d[9, 260] = bad
    with pytest.raises(GymError, match=f"'{KEY}' has NaN or infinite"):
        quantizer(**kw).quantize({KEY: d, "model.layers.0.mlp.down_proj.weight": randn(8, 8)})


def test_non_projection_tensors_stay_exact_and_all_zero_rows_are_fine():
    d = {KEY: torch.zeros(4, 8), "model.norm.weight": randn(8)}
    q = quantizer(bits=3)
    out = q.dequantize(q.quantize(d))
    assert torch.equal(out[KEY], d[KEY])
    assert torch.equal(out["model.norm.weight"], d["model.norm.weight"])


def test_read_delta_finds_the_quantizer_in_the_file(tmp_path):
    d = {KEY: randn(32, 64)}
    q = quantizer(bits=3, granularity="channel")
    path = tmp_path / "d.safetensors"
    save_packed(q.quantize(d), path)
    # decoding reads mode, bits and granularity from the file, not from a config
    restored = read_delta(path, bootstrap())
    assert torch.equal(restored[KEY], q.dequantize(load_packed(path))[KEY])


@pytest.mark.parametrize(("kw", "match"), [
    ({"bits": 5}, "quant.bits=5"), ({"mode": "quaternary"}, "quant.mode"),
    ({"granularity": "row"}, "quant.granularity"), ({"group_size": 0}, "quant.group_size"),
])
def test_bad_settings_are_named(kw, match):
    """Refused by the config check every program runs before a job (the values
    DeltaQuantConfig declares), in one line naming the option."""
    from gym_core.config.fields import check_values
    from gym_deltaquant import DeltaQuantConfig

    with pytest.raises(GymError, match=match):
        check_values(OmegaConf.structured(DeltaQuantConfig(**kw)), "quant")


def test_grpo_then_deltaquant_int4_end_to_end(tmp_path, tiny_overrides):
    import json

    from gym_core.plugin.startup import compose
    from gym_core.train.job import run_job

    cfg = compose([*tiny_overrides, "trainer.max_steps=2", "quant=deltaquant", "quant.bits=4",
                   "run.name=dq"])
    summary = run_job(cfg, run_dir=tmp_path / "dq")
    q = summary["quant_stats"]
    path = tmp_path / "dq/delta/deltaquant.safetensors"
    assert q["delta_bytes"] == path.stat().st_size
    # int4, one fp32 scale per 128-column group: the tiny model's rows are 64 or 128 wide
    assert 4.25 <= q["bits_per_weight"] <= 4.5
    assert set(q["error"]["total"]) == {"rel_fro_error", "snr_db", "cosine"}
    assert len(q["error"]["per_tensor"]) == 2 * 7  # every projection of the 2 layers
    assert 0.0 <= summary["eval"]["after_quant"] <= 1.0
    assert json.loads((tmp_path / "dq/summary.json").read_text())["quant_stats"] == q
