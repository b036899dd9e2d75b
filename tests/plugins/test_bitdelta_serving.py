"""BitDelta's serving kernel against dequantize-then-matmul: y = alpha * S x computed from
the packed sign bits, for any shape, many rows and many variants in one call."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from omegaconf import OmegaConf

from gym_bitdelta import BitDeltaConfig
from gym_bitdelta.bitdelta import BitDeltaQuantizer
from gym_bitdelta.serving import SignOperator
from gym_core.deltas.delta import DenseOperator, RowGroups
from tests.conftest import REPO

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (50, 70), (17, 33), (1, 5)]


def quantizer(**kw):
    return BitDeltaQuantizer(OmegaConf.structured(BitDeltaConfig(targets=["w"], **kw)))


def sign_matrix(shape, seed):
    q = quantizer()
    packed = q.quantize({"w": torch.randn(shape, generator=torch.Generator().manual_seed(seed))})
    return q.operators(packed)["w"], q.dequantize(packed)["w"]


@pytest.mark.parametrize("shape", SHAPES)
def test_sign_operator_is_dequantize_then_matmul(shape):
    op, dense = sign_matrix(shape, 0)
    assert isinstance(op, SignOperator)
    for n in (1, 2, 3, 4, 5, 9):
        x = torch.randn(n, shape[1], generator=torch.Generator().manual_seed(n))
        want = x.double() @ dense.double().T
        got = op.apply(x)
        # fp32 sums in another order: a few ulps of the row's magnitude
        tol = 1e-6 * (x.abs().double() @ dense.abs().double().T).max()
        assert (got.double() - want).abs().max() <= tol


def test_one_bit_per_weight_in_memory():
    op, _ = sign_matrix((576, 1536), 1)
    assert op.nbytes == 576 * 1536 // 8 + 4  # the packed signs and the scale, nothing else


def test_groups_of_rows_each_get_their_own_variant():
    ops, dense = zip(*(sign_matrix((96, 200), s) for s in range(4)))
    x = torch.randn(12, 200)
    y0 = torch.randn(12, 96)
    y = y0.clone()
    idx = torch.tensor([3, 0, 1, 5, 7, 2, 11, 10, 9, 8, 6], dtype=torch.int32)
    offs = [0, 3, 5, 6, 6, 11]
    chosen = [ops[0], ops[1], None, ops[3], ops[2]]  # group 2: rows without this layer
    SignOperator.add_to(x, y, RowGroups(idx, offs), chosen)
    want = y0.clone()
    for g, op in enumerate(chosen):
        if op is not None:
            rows = idx[offs[g]:offs[g + 1]].long()
            want[rows] += x[rows] @ dense[ops.index(op)].T
    assert torch.allclose(y, want, atol=1e-4)
    assert torch.equal(y[[2, 4]], y0[[2, 4]])  # rows in no group are untouched


def test_full_precision_matrices_stay_dense():
    q = BitDeltaQuantizer(OmegaConf.structured(BitDeltaConfig(targets=["q_proj.weight"])))
    packed = q.quantize({"a.q_proj.weight": torch.randn(8, 8), "a.other.weight": torch.randn(8, 8),
                         "norm.weight": torch.randn(8)})
    ops = q.operators(packed)
    assert set(ops) == {"a.q_proj.weight", "a.other.weight"}  # no operator for a vector
    assert isinstance(ops["a.other.weight"], DenseOperator)


def test_the_portable_path_gives_the_same_numbers(tmp_path):
    """Machines without AVX-512 run the plain C++ loop: built here with -DGYM_PORTABLE."""
    script = textwrap.dedent("""
        import torch
        from omegaconf import OmegaConf
        import gym_bitdelta.serving as serving
        from gym_core.base.native import load_ops
        from gym_bitdelta import BitDeltaConfig
        from gym_bitdelta.bitdelta import BitDeltaQuantizer
        load_ops("gym_bitdelta_serving_portable", str(serving.SOURCE), ("-DGYM_PORTABLE",))
        serving.kernels = lambda: torch.ops.gym_bitdelta
        q = BitDeltaQuantizer(OmegaConf.structured(BitDeltaConfig(targets=["w"])))
        for shape in [(576, 576), (50, 70)]:
            packed = q.quantize({"w": torch.randn(shape)})
            op, dense = q.operators(packed)["w"], q.dequantize(packed)["w"]
            x = torch.randn(5, shape[1])
            err = (op.apply(x).double() - x.double() @ dense.double().T).abs().max()
            assert err < 1e-3, err
        print("portable ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600, env={"PYTHONPATH": str(REPO),
                                                      **__import__("os").environ})
    assert "portable ok" in out.stdout, out.stdout + out.stderr
