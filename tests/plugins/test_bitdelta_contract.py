"""BitDelta and the full-precision format pass the quantizer contract."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from gym_bitdelta import BitDeltaConfig
from gym_bitdelta.bitdelta import BitDeltaQuantizer
from gym_core.config.schema import QuantConfig
from gym_core.contracts.quantizer import QuantizerContract
from gym_core.deltas.delta import FullPrecision


class TestBitDeltaContract(QuantizerContract):
    @pytest.fixture(params=[1, -1], ids=["sign0+", "sign0-"])
    def quantizer(self, request):
        return BitDeltaQuantizer(OmegaConf.structured(BitDeltaConfig(sign_of_zero=request.param)))


class TestFullPrecisionContract(QuantizerContract):
    @pytest.fixture
    def quantizer(self):
        return FullPrecision(OmegaConf.structured(QuantConfig()))
