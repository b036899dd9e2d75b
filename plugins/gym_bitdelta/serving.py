"""Serving BitDelta variants: each sign matrix kept packed (one bit per weight, in the
"nibble lanes" layout of serving.cpp) and applied to activations by a C++ kernel that
reads the bits directly; no variant is ever expanded to a float matrix."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from gym_core.delta import DeltaOperator, DenseOperator, PackedDelta, RowGroups
from gym_core.errors import GymError

SOURCE = Path(__file__).with_name("serving.cpp")


def kernels():
    """``torch.ops.gym_bitdelta`` (repack, apply), compiled on first use."""
    from gym_core.native import load_ops

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


def operators(packed: PackedDelta) -> dict[str, DeltaOperator]:
    """Every matrix of a BitDelta delta as an operator: sign-compressed ones as
    :class:`SignOperator`, matrices stored as they are (``.full``) dense."""
    shapes = json.loads(packed.meta["shapes"])
    ops: dict[str, DeltaOperator] = {}
    for key, shape in shapes.items():
        if len(shape) != 2:
            continue
        full = packed.tensors.get(f"{key}.full")
        if full is not None:
            ops[key] = DenseOperator(full)
            continue
        signs, scale = packed.tensors.get(f"{key}.signs"), packed.tensors.get(f"{key}.scale")
        if signs is None or scale is None or scale.numel() != 1:
            raise GymError(f"the BitDelta delta lacks the signs or the scale of '{key}'")
        alpha = float(scale.reshape(()))
        if not math.isfinite(alpha):
            raise GymError(f"the BitDelta scale of '{key}' is {alpha}: the file is damaged")
        ops[key] = SignOperator.from_packed(signs, alpha, shape)
    return ops
