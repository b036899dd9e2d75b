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
import struct

import pytest
import torch

from gym_core.delta import PackedDelta, load_packed, save_packed
from gym_core.errors import GymError


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
    """Checks shared by every quantizer; subclasses provide the ``quantizer`` fixture."""

    @pytest.fixture
    def quantizer(self):
        raise NotImplementedError("define a `quantizer` fixture returning your quantizer")

    @pytest.fixture
    def delta(self):
        return model_like_delta()

    def test_metadata_names_the_quantizer(self, quantizer, delta):
        packed = quantizer.quantize(delta)
        assert isinstance(packed, PackedDelta)
        # read_delta and soups find the decoder through this name
        assert packed.meta["quantizer"] == quantizer.cfg.name
        assert all(isinstance(v, str) for v in packed.meta.values())
        assert packed.num_params == sum(d.numel() for d in delta.values())

    def test_round_trip_through_the_file(self, quantizer, delta, tmp_path):
        packed = quantizer.quantize(delta)
        in_memory = quantizer.dequantize(packed)
        path = tmp_path / "delta.safetensors"
        save_packed(packed, path)
        from_file = quantizer.dequantize(load_packed(path))
        assert set(from_file) == set(delta)
        for key, d in delta.items():
            assert from_file[key].shape == d.shape, key
            assert from_file[key].dtype == torch.float32, key
            assert torch.equal(from_file[key], in_memory[key]), key

    def test_stated_bits_per_weight_is_the_file(self, quantizer, delta, tmp_path):
        packed = quantizer.quantize(delta)
        path = tmp_path / "delta.safetensors"
        size = save_packed(packed, path)
        assert size == path.stat().st_size
        assert data_bytes_on_disk(path) == packed.nbytes
        assert packed.bits_per_weight == pytest.approx(8 * packed.nbytes / packed.num_params)
        assert packed.compression_ratio == pytest.approx(16 / packed.bits_per_weight)
        with open(path, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        assert header["__metadata__"]["quantizer"] == quantizer.cfg.name

    def test_reconstruction_beats_no_delta(self, quantizer, delta):
        restored = quantizer.dequantize(quantizer.quantize(delta))
        for key, d in delta.items():
            assert (restored[key] - d).norm() < d.norm(), key

    def test_tiny_deltas_keep_their_precision(self, quantizer, delta):
        """Scales and reconstruction in fp32 (ALGORITHMS.md §6): a delta 1e-4 times
        smaller is reconstructed 1e-4 times smaller, not flushed to zero."""
        big = quantizer.dequantize(quantizer.quantize(delta))
        tiny = quantizer.dequantize(quantizer.quantize({k: v * 1e-4 for k, v in delta.items()}))
        for key in delta:
            assert torch.allclose(tiny[key] * 1e4, big[key], rtol=1e-3, atol=0), key

    def test_input_is_not_modified(self, quantizer, delta):
        copy = {k: v.clone() for k, v in delta.items()}
        quantizer.dequantize(quantizer.quantize(delta))
        for key in delta:
            assert torch.equal(delta[key], copy[key]), key

    def test_a_file_from_another_quantizer_is_refused(self, quantizer, delta):
        packed = quantizer.quantize(delta)
        other = PackedDelta(packed.tensors, dict(packed.meta, quantizer="someone_else"),
                            packed.num_params)
        with pytest.raises(GymError, match="someone_else"):
            quantizer.dequantize(other)
