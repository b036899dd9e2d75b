"""Serving BitDelta variants: each sign matrix kept packed (one bit per weight, in the
"nibble lanes" layout of serving.cpp) and applied to activations by a C++ kernel that
reads the bits directly; no variant is ever expanded to a float matrix."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from gym_core.api import DeltaOperator, DenseOperator, GymError, RowGroups

SOURCE = Path(__file__).with_name("serving.cpp")


def kernels():
    """``torch.ops.gym_bitdelta`` (repack, apply), compiled on first use."""
    from gym_core.api import load_ops

    load_ops("gym_bitdelta_serving", str(SOURCE))
    return torch.ops.gym_bitdelta


class SignOperator(DeltaOperator):
    """``alpha * S`` for a packed sign matrix ``S [out, in]``."""

    def __init__(self, words: torch.Tensor, alpha: float, shape):
        super().__init__(shape)
        self.words = words  # int32, the nibble-lane layout (serving.cpp)
        self.alpha = float(alpha)

    @classmethod
    def from_packed(cls, signs: torch.Tensor, alpha: float, shape) -> SignOperator:
        out, inp = (int(s) for s in shape)
        if signs.dtype != torch.uint8 or signs.numel() != (out * inp + 7) // 8:
            raise GymError(
                f"sign tensor of {signs.numel()} {signs.dtype} entries for a [{out}, {inp}] "
                f"matrix, which needs {(out * inp + 7) // 8} uint8: the file is damaged"
            )
        return cls(kernels().repack(signs.contiguous(), out, inp), alpha, shape)

    @property
    def nbytes(self) -> int:
        return self.words.numel() * 4 + 4

    def apply(self, x):
        y = torch.zeros(x.shape[0], self.out_features, dtype=torch.float32)
        self.add_to(x.float().contiguous(), y, RowGroups.single(x.shape[0]), [self])
        return y

    @classmethod
    def prepare(cls, ops):
        """The kernel's per-group arguments: sign-matrix addresses (0: no delta here) and
        scales. ``ops`` keeps the matrices alive while these are used."""
        ptrs = torch.tensor([op.words.data_ptr() if op is not None else 0 for op in ops],
                            dtype=torch.int64)
        alphas = torch.tensor([op.alpha if op is not None else 0.0 for op in ops],
                              dtype=torch.float32)
        return ptrs, alphas

    @classmethod
    def add_to(cls, x, y, groups, ops, prepared=None):
        first = next(op for op in ops if op is not None)
        ptrs, alphas = prepared if prepared is not None else cls.prepare(ops)
        kernels().apply(x, y, groups.idx, groups.offs, ptrs, alphas, first.in_features,
                        first.out_features)


def operators(parts: dict) -> dict[str, DeltaOperator]:
    """Every matrix of a BitDelta delta (``MatrixQuantizer.checked_parts``: sizes and
    dtypes already checked) as an operator: sign-compressed ones as
    :class:`SignOperator`, matrices stored as they are (``full``) dense."""
    ops: dict[str, DeltaOperator] = {}
    for key, (shape, tensors) in parts.items():
        if len(shape) != 2:
            continue
        if "full" in tensors:
            ops[key] = DenseOperator(tensors["full"].float().reshape(shape))
            continue
        alpha = float(tensors["scale"].reshape(()))
        if not math.isfinite(alpha):
            raise GymError(f"the BitDelta scale of '{key}' is {alpha}: the file is damaged")
        ops[key] = SignOperator.from_packed(tensors["signs"], alpha, shape)
    return ops
