"""The absmax quantizer: gym's quantizer contract, plus the packing checked by hand."""

from __future__ import annotations

import pytest
import torch
from gym_core.api import GymError, check_values, load_packed, save_packed
from gym_core.contracts.quantizer import QuantizerContract
from omegaconf import OmegaConf

from gym_example_plugin import AbsmaxConfig
from gym_example_plugin.absmax import AbsmaxQuantizer

W = "model.layers.0.self_attn.q_proj.weight"  # a target matrix (its name ends in _proj.weight)


def make(bits: int) -> AbsmaxQuantizer:
    return AbsmaxQuantizer(OmegaConf.structured(AbsmaxConfig(bits=bits)))


class TestAbsmaxContract(QuantizerContract):
    """Everything gym relies on from a quantizer, at both bit widths."""

    @pytest.fixture(params=[4, 8])
    def quantizer(self, request):
        return make(request.param)


def test_eight_bits_by_hand(tmp_path):
    d = torch.tensor([[0.5, -1.27], [0.0, 0.011]])
    packed = make(8).quantize({W: d})
    # s = 1.27 / 127 = 0.01; q = round(d / s)
    assert packed.tensors[f"{W}.scale"].item() == pytest.approx(0.01)
    assert packed.tensors[f"{W}.q"].tolist() == [50, -127, 0, 1]
    assert packed.tensors[f"{W}.q"].dtype == torch.int8
    save_packed(packed, tmp_path / "d.safetensors")
    back = make(8).dequantize(load_packed(tmp_path / "d.safetensors"))[W]
    assert torch.allclose(back, torch.tensor([[0.5, -1.27], [0.0, 0.01]]))


def test_four_bits_pack_two_per_byte_by_hand():
    d = torch.tensor([[0.7, -0.7, 0.1, 0.0, 0.35]])
    packed = make(4).quantize({W: d})
    # s = 0.7 / 7 = 0.1; q = [7, -7, 1, 0, 4] (0.35 / 0.1 = 3.5 rounds to even: 4);
    # stored q + 8 = [15, 1, 9, 8, 12] -> bytes 15 | 1 << 4, 9 | 8 << 4, 12 | 0 << 4
    assert packed.tensors[f"{W}.q"].tolist() == [0x1F, 0x89, 0x0C]
    assert packed.bits_per_weight == pytest.approx(8 * (3 + 4) / 5)
    back = make(4).dequantize(packed)[W]
    assert torch.allclose(back, torch.tensor([[0.7, -0.7, 0.1, 0.0, 0.4]]))


def test_tensors_that_are_not_target_matrices_are_stored_exactly():
    norm = torch.tensor([1e-4, -3e-3, 0.5])
    packed = make(4).quantize({"model.norm.weight": norm})
    assert torch.equal(packed.tensors["model.norm.weight.full"], norm)


def test_a_truncated_file_is_refused_by_tensor_name():
    packed = make(4).quantize({W: torch.randn(4, 6)})
    packed.tensors[f"{W}.q"] = packed.tensors[f"{W}.q"][:1]
    with pytest.raises(GymError, match=f"{W}.q"):
        make(4).dequantize(packed)


def test_a_four_bit_file_is_read_back_whatever_the_config_says():
    packed = make(4).quantize({W: torch.tensor([[0.7, -0.7]])})
    assert torch.allclose(make(8).dequantize(packed)[W], torch.tensor([[0.7, -0.7]]))


def test_other_widths_are_refused():
    """AbsmaxConfig declares bits as 4 or 8: gym refuses another width before a run
    starts, with the line check_values gives."""
    with pytest.raises(GymError, match="quant.bits=3 is not one of 8, 4"):
        check_values(OmegaConf.structured(AbsmaxConfig(bits=3)), "quant")
