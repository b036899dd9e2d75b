"""The contract every quantizer plugin passes: what the run, ``read_delta`` and soups rely on.

Subclass :class:`QuantizerContract` in a test file and provide a ``quantizer`` fixture
returning a configured instance; pytest runs every check below on it::

    import pytest
    from omegaconf import OmegaConf
    from gym_core.contracts.quantizer import QuantizerContract
    from gym_myquant import MyQuantConfig
    from gym_myquant.impl import MyQuantizer

    class TestMyQuantContract(QuantizerContract):
        @pytest.fixture(params=[2, 4])
        def quantizer(self, request):
            return MyQuantizer(OmegaConf.structured(MyQuantConfig(bits=request.param)))

The ``delta`` fixture (override it to use your own shapes) is a small model-like delta:
projection matrices with an input width that is not a multiple of 128, a norm vector,
values of a real fine-tune's size (~1e-3).
"""

from __future__ import annotations

import json
import re
import struct

import pytest
import torch

from gym_core.api import GymError, PackedDelta, load_packed, save_packed


def model_like_delta(seed: int = 0, scale: float = 1e-3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(48, 200, generator=g) * scale,
        "model.layers.0.mlp.down_proj.weight": torch.randn(200, 96, generator=g) * scale,
        "model.layers.0.mlp.up_proj.weight": torch.randn(96, 200, generator=g) * scale,
        "model.norm.weight": torch.randn(200, generator=g) * scale,
    }


def data_bytes_on_disk(path) -> int:
    """Bytes of tensor data in a safetensors file (its size less the JSON header)."""
    with open(path, "rb") as fh:
        header_len = struct.unpack("<Q", fh.read(8))[0]
    return path.stat().st_size - 8 - header_len


class QuantizerContract:
    """Checks shared by every quantizer; subclasses provide the ``quantizer`` fixture.

    Every assertion says what was expected and what came back: pytest does not rewrite
    the asserts of an installed package, so a bare ``AssertionError`` would say nothing."""

    @pytest.fixture
    def quantizer(self):
        raise NotImplementedError("define a `quantizer` fixture returning your quantizer")

    @pytest.fixture
    def delta(self):
        return model_like_delta()

    def test_metadata_names_the_quantizer(self, quantizer, delta):
        packed = quantizer.quantize(delta)
        assert isinstance(packed, PackedDelta), (
            f"quantize() must return a PackedDelta, returned {type(packed).__name__}")
        # read_delta and soups find the decoder through this name
        assert packed.meta.get("quantizer") == quantizer.cfg.name, (
            f"meta['quantizer'] must be the option name {quantizer.cfg.name!r}, is "
            f"{packed.meta.get('quantizer')!r}")
        wrong = {k: type(v).__name__ for k, v in packed.meta.items() if not isinstance(v, str)}
        assert not wrong, f"metadata values must be strings (safetensors), these are not: {wrong}"
        expected = sum(d.numel() for d in delta.values())
        assert packed.num_params == expected, (
            f"num_params must count every delta entry ({expected}), is {packed.num_params}")

    def test_round_trip_through_the_file(self, quantizer, delta, tmp_path):
        packed = quantizer.quantize(delta)
        in_memory = quantizer.dequantize(packed)
        path = tmp_path / "delta.safetensors"
        save_packed(packed, path)
        from_file = quantizer.dequantize(load_packed(path))
        assert set(from_file) == set(delta), (
            f"dequantize must return every delta tensor: missing "
            f"{sorted(set(delta) - set(from_file))}, unexpected {sorted(set(from_file) - set(delta))}")
        for key, d in delta.items():
            got = from_file[key]
            assert got.shape == d.shape, f"{key}: expected shape {tuple(d.shape)}, got {tuple(got.shape)}"
            assert got.dtype == torch.float32, f"{key}: expected float32, got {got.dtype}"
            assert torch.equal(got, in_memory[key]), (
                f"{key}: decoding the file differs from decoding the PackedDelta in memory "
                f"(max difference {(got - in_memory[key]).abs().max().item():.3g})")

    def test_stated_bits_per_weight_is_the_file(self, quantizer, delta, tmp_path):
        packed = quantizer.quantize(delta)
        path = tmp_path / "delta.safetensors"
        size = save_packed(packed, path)
        assert size == path.stat().st_size, f"save_packed returned {size}, the file has " \
            f"{path.stat().st_size} bytes"
        on_disk = data_bytes_on_disk(path)
        assert on_disk == packed.nbytes, (
            f"the file holds {on_disk} bytes of tensors, PackedDelta.nbytes says {packed.nbytes}")
        stated = 8 * packed.nbytes / packed.num_params
        assert packed.bits_per_weight == pytest.approx(stated), (
            f"bits_per_weight is {packed.bits_per_weight}, the file gives {stated}")
        assert packed.compression_ratio == pytest.approx(16 / packed.bits_per_weight)
        with open(path, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        got = header.get("__metadata__", {}).get("quantizer")
        assert got == quantizer.cfg.name, (
            f"the file's metadata must name the quantizer {quantizer.cfg.name!r}, names {got!r}")

    def test_reconstruction_beats_no_delta(self, quantizer, delta):
        restored = quantizer.dequantize(quantizer.quantize(delta))
        for key, d in delta.items():
            err, base = (restored[key] - d).norm().item(), d.norm().item()
            assert err < base, (
                f"{key}: the reconstruction error {err:.3g} is not below the delta's own norm "
                f"{base:.3g}: no delta at all would be as close")

    def test_tiny_deltas_keep_their_precision(self, quantizer, delta):
        """Scales and reconstruction in fp32 (docs/algorithms.md §10.8): a delta 1e-4 times
        smaller is reconstructed 1e-4 times smaller, not flushed to zero."""
        big = quantizer.dequantize(quantizer.quantize(delta))
        tiny = quantizer.dequantize(quantizer.quantize({k: v * 1e-4 for k, v in delta.items()}))
        for key in delta:
            worst = ((tiny[key] * 1e4 - big[key]).abs() / big[key].abs().clamp_min(1e-30)).max()
            assert torch.allclose(tiny[key] * 1e4, big[key], rtol=1e-3, atol=0), (
                f"{key}: a delta scaled by 1e-4 comes back with relative error {worst.item():.3g} "
                "(expected < 1e-3): keep scales and the reconstruction in fp32")

    def test_input_is_not_modified(self, quantizer, delta):
        copy = {k: v.clone() for k, v in delta.items()}
        quantizer.dequantize(quantizer.quantize(delta))
        for key in delta:
            assert torch.equal(delta[key], copy[key]), f"quantize modified its input '{key}'"

    def test_a_file_from_another_quantizer_is_refused(self, quantizer, delta):
        packed = quantizer.quantize(delta)
        other = PackedDelta(packed.tensors, dict(packed.meta, quantizer="someone_else"),
                            packed.num_params)
        with pytest.raises(GymError, match="someone_else"):
            quantizer.dequantize(other)

    def test_a_truncated_tensor_is_refused_by_name(self, quantizer, delta):
        """A damaged file must be refused with a GymError naming the tensor before any
        kernel reads it, never decoded into garbage or read past the end of a buffer."""
        packed = quantizer.quantize(delta)
        for name, t in packed.tensors.items():
            if t.numel() < 2:
                continue
            cut = PackedDelta(dict(packed.tensors, **{name: t.reshape(-1)[:1].clone()}),
                              dict(packed.meta), packed.num_params)
            with pytest.raises(GymError, match=re.escape(name)):
                quantizer.dequantize(cut)
