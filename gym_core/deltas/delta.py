"""Deltas (fine-tuned minus base weights), the packed form quantizers produce, and the
safetensors file both live in. Quantizer plugins implement :class:`Quantizer`."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file

from gym_core.base.errors import GymError
from gym_core.base.files import atomic_path


@dataclass
class PackedDelta:
    """A quantized delta: the tensors written to disk and string metadata."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, str] = field(default_factory=dict)
    num_params: int = 0  # delta entries represented (for bits per weight)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / max(self.num_params, 1)

    @property
    def compression_ratio(self) -> float:
        """Against the bf16 delta it replaces (16 bits per weight)."""
        return 16.0 / self.bits_per_weight


class Quantizer:
    """Base of quantizer plugins: ``quantize(delta) -> PackedDelta`` with real bit packing
    and ``dequantize(packed) -> delta`` (fp32 tensors keyed like the delta). Schemes that
    compress each matrix on its own derive from :class:`MatrixQuantizer` instead."""

    Config: ClassVar[type]

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def quantize(self, delta: dict[str, torch.Tensor]) -> PackedDelta:
        raise NotImplementedError

    def dequantize(self, packed: PackedDelta) -> dict[str, torch.Tensor]:
        """The fp32 delta; a file whose tensors do not match its metadata (sizes, dtypes,
        names) raises :class:`GymError` naming the tensor, before any kernel reads it."""
        raise NotImplementedError

    def operators(self, packed: PackedDelta) -> dict[str, DeltaOperator]:
        """Serving: each matrix of ``packed`` as a :class:`DeltaOperator` that applies it to
        activations (``python -m gym_core.serve`` adds ``x @ D^T`` to the base layer's
        output for the rows of this variant), keyed like the delta. Tensors that are not
        matrices (norms, biases) get none.

        The default decodes one matrix per call with :meth:`dequantize` and drops it after
        the product: correct for any quantizer whose tensors are named ``<key>.<part>``
        with the shapes in ``meta["shapes"]`` (gym's are), holding only the packed bytes,
        but it rebuilds the matrix on every call. Override it with an operator that works
        on the packed form directly (BitDelta's does)."""
        if "shapes" not in packed.meta:
            raise GymError(
                f"this {packed.meta.get('quantizer')!r} delta has no 'shapes' metadata, so "
                "its matrices cannot be served one at a time: the quantizer must override "
                "Quantizer.operators"
            )
        ops: dict[str, DeltaOperator] = {}
        for key, shape in json.loads(packed.meta["shapes"]).items():
            if len(shape) != 2:
                continue
            own = {k: v for k, v in packed.tensors.items() if k.startswith(key + ".")}
            sub = PackedDelta(own, dict(packed.meta, shapes=json.dumps({key: shape})),
                              math.prod(shape))
            ops[key] = DequantizingOperator(self, sub, key, shape)
        return ops

    def calibrate(self, packed: PackedDelta, ctx: CalibrationContext) -> PackedDelta | None:
        """Optional: improve ``packed`` with data (e.g. BitDelta's scale distillation).

        Called by the run after :meth:`quantize` with the fine-tuned model, a base-model
        loader and the task's training prompts. Return the improved packed delta, or
        ``None`` when this quantizer (as configured) does no calibration (the default);
        when it returns one, the run scores the delta before and after it
        (``summary.json``: ``quant_stats.after_quant_uncalibrated`` and
        ``eval.after_quant``).
        """
        return None

    def stats(self) -> dict[str, Any]:
        """Facts about the last quantize/calibrate (e.g. distillation losses), added to
        ``summary.json``'s ``quant_stats``. Default: none."""
        return {}

    def check_origin(self, packed: PackedDelta) -> None:
        """Refuse a file another quantizer wrote (its metadata names the quantizer)."""
        wrote = packed.meta.get("quantizer")
        if wrote != self.cfg.name:
            raise GymError(
                f"this delta was written by quantizer {wrote!r}, not {self.cfg.name!r}: "
                "decode it with that quantizer (read_delta picks it from the file)"
            )


class MatrixQuantizer(Quantizer):
    """The shell of quantizers that compress each target matrix on its own (BitDelta,
    DeltaQuant, ...): 2-D tensors whose name ends in one of ``cfg.targets``
    (:class:`gym_core.config.schema.MatrixQuantConfig`) go through :meth:`quantize_matrix`;
    every other tensor is stored exactly (``<key>.full``, fp32). The file's metadata
    records the quantizer's name, every tensor's shape and :meth:`file_meta`; decoding
    checks the name, then every stored part against :meth:`part_specs` (dtype and size
    from the recorded shape) before :meth:`dequantize_matrix` reads it, so a truncated
    or foreign file is refused by tensor name instead of being read past its end.

    A subclass implements :meth:`quantize_matrix`, :meth:`part_specs` and
    :meth:`dequantize_matrix` (and :meth:`file_meta` when decoding needs settings).
    """

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.cfg.targets)

    def quantize_matrix(self, key: str, d: torch.Tensor) -> dict[str, torch.Tensor]:
        """One fp32 matrix -> its stored parts ``{suffix: tensor}`` (saved as
        ``<key>.<suffix>``). Runs on several threads at once (:func:`map_tensors`)."""
        raise NotImplementedError

    def part_specs(self, shape: tuple[int, ...], meta: dict[str, str]
                   ) -> dict[str, tuple[torch.dtype, int]]:
        """The parts a matrix of ``shape`` is stored as: ``{suffix: (dtype, numel)}``."""
        raise NotImplementedError

    def dequantize_matrix(self, key: str, shape: tuple[int, ...], parts: dict[str, torch.Tensor],
                          meta: dict[str, str]) -> torch.Tensor:
        """The fp32 matrix from its checked parts."""
        raise NotImplementedError

    def file_meta(self) -> dict[str, str]:
        """Settings decoding needs, stored in the file's metadata. Default: none."""
        return {}

    def quantize(self, delta):
        targets = self.targets

        def one(key, d):
            if d.dim() == 2 and d.numel() > 0 and key.endswith(targets):
                return {f"{key}.{suffix}": t for suffix, t in self.quantize_matrix(key, d).items()}
            full = d.detach().float().clone()
            if not torch.isfinite(full).all():
                raise GymError(f"delta tensor '{key}' has NaN or infinite entries: the "
                               "fine-tuned weights diverged; use a checkpoint from before that")
            return {f"{key}.full": full}

        tensors = {}
        for part in map_tensors(one, delta):
            tensors.update(part)
        meta = {"quantizer": self.cfg.name, "shapes": shapes_meta(delta), **self.file_meta()}
        return PackedDelta(tensors, meta, sum(d.numel() for d in delta.values()))

    def checked_parts(self, packed: PackedDelta
                      ) -> dict[str, tuple[tuple[int, ...], dict[str, torch.Tensor]]]:
        """Every tensor of ``packed`` as ``key -> (shape, parts)``, checked: the file is
        this quantizer's, every part the metadata calls for is there with the dtype and
        size :meth:`part_specs` gives (a pass-through tensor is the one part ``"full"``),
        and nothing else is in the file. Decoders (and serving operators) read only
        these."""
        self.check_origin(packed)
        shapes = recorded_shapes(packed)
        out, described = {}, set()
        for key, shape in shapes.items():
            if f"{key}.full" in packed.tensors:
                specs = {"full": (torch.float32, math.prod(shape))}
            else:
                specs = self.part_specs(shape, packed.meta)
                if not any(f"{key}.{suffix}" in packed.tensors for suffix in specs):
                    raise GymError(f"the delta has no tensor '{key}.full' (nor "
                                   f"{self.cfg.name}'s parts of '{key}'), which its metadata "
                                   "calls for: the file is damaged or incomplete")
            out[key] = (shape, {suffix: _checked(packed, f"{key}.{suffix}", dtype, numel)
                                for suffix, (dtype, numel) in specs.items()})
            described |= {f"{key}.{suffix}" for suffix in specs}
        unknown = sorted(set(packed.tensors) - described)
        if unknown:
            raise GymError(f"the delta holds tensors its metadata does not describe "
                           f"({', '.join(unknown[:3])}): the file is damaged or not "
                           f"{self.cfg.name}'s")
        return out

    def dequantize(self, packed):
        out = {}
        for key, (shape, parts) in self.checked_parts(packed).items():
            if "full" in parts:
                out[key] = parts["full"].float().reshape(shape)
            else:
                out[key] = self.dequantize_matrix(key, shape, parts, packed.meta)
            if tuple(out[key].shape) != shape:
                raise GymError(f"{self.cfg.name} decoded '{key}' with shape "
                               f"{tuple(out[key].shape)}, not the recorded {shape}")
            if not bool(torch.isfinite(out[key]).all()):  # a NaN scale spreads over a matrix
                raise GymError(f"delta tensor '{key}' decodes to NaN or infinite values (its "
                               "scale or values are not finite): the file is damaged")
        return out


def recorded_shapes(packed: PackedDelta) -> dict[str, tuple[int, ...]]:
    """The ``shapes`` metadata of a packed delta, checked: tensor name -> shape."""
    try:
        raw = json.loads(packed.meta["shapes"])
    except (KeyError, ValueError) as exc:
        raise GymError(f"the delta has no readable 'shapes' metadata ({exc}): the file is "
                       "damaged or was not written by gym") from None
    if not isinstance(raw, dict) or not all(
            isinstance(k, str) and isinstance(v, list) and len(v) <= 8
            and all(isinstance(n, int) and 0 <= n < 2**40 for n in v) for k, v in raw.items()):
        raise GymError("the delta's 'shapes' metadata is not a map of tensor names to "
                       "shapes: the file is damaged or was not written by gym")
    return {k: tuple(v) for k, v in raw.items()}


def _checked(packed: PackedDelta, name: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
    t = packed.tensors.get(name)
    if t is None:
        raise GymError(f"the delta has no tensor '{name}', which its metadata calls for: "
                       "the file is damaged or incomplete")
    if t.dtype != dtype or t.numel() != numel:
        raise GymError(f"delta tensor '{name}' is {t.dtype} with {t.numel()} entries where "
                       f"its metadata calls for {dtype} with {numel}: the file is damaged "
                       "or not this quantizer's")
    return t.reshape(-1)


class RowGroups:
    """Rows of a batch grouped by variant, for :meth:`DeltaOperator.add_to`: group ``g``
    is rows ``idx[offs[g]:offs[g + 1]]`` of the flattened activations."""

    def __init__(self, idx: torch.Tensor, offs: list[int]):
        self.idx = idx.to(torch.int32).contiguous()
        self.bounds = list(offs)
        self.offs = torch.tensor(self.bounds, dtype=torch.int32)
        self._rows: dict[int, torch.Tensor] = {}

    @classmethod
    def single(cls, n: int) -> RowGroups:
        return cls(torch.arange(n, dtype=torch.int32), [0, n])

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def rows(self, g: int) -> torch.Tensor:
        """Group ``g``'s row indices (int64, cached)."""
        if g not in self._rows:
            self._rows[g] = self.idx[self.bounds[g]:self.bounds[g + 1]].long()
        return self._rows[g]


class DeltaOperator:
    """One matrix ``D [out, in]`` of a packed delta, applied to activations without
    rebuilding the weights. :meth:`apply` is the product for one batch of rows;
    :meth:`add_to` the batched form the server calls once per layer and operator class,
    for every group of rows whose variant has an operator of that class there."""

    def __init__(self, shape):
        self.out_features, self.in_features = (int(s) for s in shape)

    @property
    def nbytes(self) -> int:
        """Memory this operator holds (bytes)."""
        raise NotImplementedError

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x [n, in] @ D^T -> [n, out]`` (fp32)."""
        raise NotImplementedError

    @classmethod
    def prepare(cls, ops: list[DeltaOperator | None]) -> Any:
        """What :meth:`add_to` needs about ``ops`` besides the activations (kernel
        arguments such as the operators' addresses). The server computes it once per layer
        and keeps it while the batch's variants stay the same, so steps do not rebuild it."""
        return None

    @classmethod
    def add_to(cls, x: torch.Tensor, y: torch.Tensor, groups: RowGroups,
               ops: list[DeltaOperator | None], prepared: Any = None) -> None:
        """``y[rows of g] += x[rows of g] @ D_g^T`` for every group ``g`` whose
        ``ops[g]`` is not None (all of this class). ``x [N, in]``, ``y [N, out]``, fp32;
        ``prepared`` is :meth:`prepare`'s result for these ``ops`` (or None: compute it).
        The default loops over the groups; override it with one kernel call."""
        for g, op in enumerate(ops):
            if op is not None:
                rows = groups.rows(g)
                y.index_add_(0, rows, op.apply(x.index_select(0, rows)))


class DenseOperator(DeltaOperator):
    """A matrix stored as it is (fp32)."""

    def __init__(self, d: torch.Tensor):
        super().__init__(d.shape)
        self.d = d.detach().float().contiguous()

    @property
    def nbytes(self) -> int:
        return self.d.numel() * self.d.element_size()

    def apply(self, x):
        return torch.nn.functional.linear(x, self.d)


class DequantizingOperator(DeltaOperator):
    """:meth:`Quantizer.operators`' default: decodes its matrix on every call (transient)."""

    def __init__(self, quantizer: Quantizer, packed: PackedDelta, key: str, shape):
        super().__init__(shape)
        self.quantizer, self.packed, self.key = quantizer, packed, key

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes

    def apply(self, x):
        return torch.nn.functional.linear(x, self.quantizer.dequantize(self.packed)[self.key])


@dataclass
class CalibrationContext:
    """What :meth:`Quantizer.calibrate` gets from the run."""

    teacher: torch.nn.Module  # the fine-tuned model (eval mode; do not modify it)
    # () -> the run's base model on ``device`` (eval mode), shared with the run (it may be
    # the policy's own frozen weights): read it, replace its weights with
    # torch.func.functional_call, but never modify it in place
    load_base: Any
    tokenizer: Any
    prompts: list[str]  # the task's training prompts, chat template applied
    device: torch.device


def lora_delta(model) -> dict[str, torch.Tensor]:
    """The exact weight delta of every LoRA layer (B @ A * scaling), in fp32, keyed by the
    base weight's name in the plain model ("model.layers.0.self_attn.q_proj.weight")."""
    from peft.tuners.lora import LoraLayer

    delta = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                d = module.get_delta_weight(adapter).detach().float().cpu()
                key = base_key(name) + ".weight"
                delta[key] = delta[key] + d if key in delta else d
    return delta


def state_delta(fine: dict[str, torch.Tensor], base: dict[str, torch.Tensor]):
    """fine - base (fp32) for every parameter that changed."""
    out = {}
    for k, v in fine.items():
        d = v.detach().float().cpu() - base[k].detach().float().cpu()
        if torch.count_nonzero(d):
            out[k] = d
    return out


def base_key(peft_name: str) -> str:
    """Map a peft module name to the plain model's ("base_model.model.x" -> "x")."""
    for prefix in ("base_model.model.",):
        if peft_name.startswith(prefix):
            peft_name = peft_name[len(prefix) :]
    return peft_name.replace(".base_layer", "")


@torch.no_grad()
def apply_delta(model: torch.nn.Module, delta: dict[str, torch.Tensor]) -> None:
    """model weights += delta, added in fp32 and cast once (a tiny delta added to bf16
    weights would be lost, docs/algorithms.md §10)."""
    params = dict(model.named_parameters())
    for key, d in delta.items():
        if key not in params:
            raise GymError(f"the delta has '{key}', which this model does not have")
        p = params[key]
        if p.shape != d.shape:
            raise GymError(f"delta '{key}' has shape {tuple(d.shape)}, the model {tuple(p.shape)}")
        p.copy_((p.float() + d.to(p.device)).to(p.dtype))


CHECKSUM = "sha256"  # metadata entry: content_digest() of everything else in the file


def content_digest(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """sha256 over the metadata (but the checksum itself) and every tensor's name, dtype,
    shape and bytes, in name order: any bit flipped in a delta file changes it."""
    import hashlib

    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in meta.items() if k != CHECKSUM},
                        sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_packed(packed: PackedDelta, path: Path) -> int:
    """Write atomically as safetensors, with a checksum of the content in the metadata;
    returns the file's size in bytes."""
    path = Path(path)
    meta = dict(packed.meta, num_params=str(packed.num_params))
    meta[CHECKSUM] = content_digest(packed.tensors, meta)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in packed.tensors.items()}, str(tmp),
                  metadata=meta)
    return path.stat().st_size


def load_packed(path: Path, *, require_checksum: bool = True) -> PackedDelta:
    """Read a delta file written by :func:`save_packed`; its checksum must be there and
    match (``require_checksum=False`` reads a file without one, e.g. to re-save it)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise GymError(f"delta file {path} does not exist")
    try:
        with safe_open(str(path), "pt") as fh:
            meta = dict(fh.metadata() or {})
        tensors = load_file(str(path))
    except Exception as exc:
        raise GymError(f"{path} is not a readable safetensors delta file: {exc}") from None
    if CHECKSUM not in meta and require_checksum:
        raise GymError(f"{path} has no checksum in its metadata: gym writes one with every "
                       "delta file (save_packed), so this file was written by another tool "
                       "or edited; write it with gym_core.deltas.delta.save_packed")
    if CHECKSUM in meta and content_digest(tensors, meta) != meta[CHECKSUM]:
        raise GymError(f"{path}: its content does not match the checksum written with it (a "
                       "bit flipped on disk or in transfer, or the file was edited): the "
                       "file is damaged; copy it again from its source")
    meta.pop(CHECKSUM, None)
    try:
        num = int(meta.pop("num_params", "0"))
    except ValueError:
        raise GymError(f"{path}: its 'num_params' metadata is not a number: the file is "
                       "damaged or was not written by gym") from None
    return PackedDelta(tensors, meta, num)


def map_tensors(fn: Callable[[str, torch.Tensor], Any], delta: dict[str, torch.Tensor]) -> list:
    """``[fn(key, tensor) for key, tensor in delta.items()]`` on a pool of
    ``torch.get_num_threads()`` threads, in order. For quantizers whose per-tensor work
    releases the GIL (numba ``nogil`` kernels, NumPy, torch ops): a delta has hundreds of
    matrices, so spreading whole tensors over the cores beats splitting each one."""
    items = list(delta.items())
    workers = min(torch.get_num_threads(), len(items))
    if workers <= 1:
        return [fn(k, v) for k, v in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda kv: fn(*kv), items))


def shapes_meta(delta: dict[str, torch.Tensor]) -> str:
    return json.dumps({k: list(v.shape) for k, v in delta.items()})


class FullPrecision(MatrixQuantizer):
    """``quant=none``'s file format: the delta itself, fp32, every tensor stored exactly.
    Runs with ``quant=none`` write no delta; soups read and write this format."""

    targets = ()

    def __init__(self, cfg: Any = None) -> None:
        from gym_core.config.schema import QuantConfig

        super().__init__(cfg if cfg is not None else QuantConfig())

    def part_specs(self, shape, meta):
        return {}

    def operators(self, packed):
        """Serving a full-precision delta (a soup): its matrices as they are."""
        return {k: DenseOperator(v) for k, v in self.dequantize(packed).items() if v.dim() == 2}


def read_delta(path: Path, plugins) -> dict[str, torch.Tensor]:
    """The fp32 delta in a delta file, whichever quantizer wrote it: the file's metadata
    names the quantizer, which must be installed (``plugins``, the loaded plugins), and
    its ``dequantize`` decodes it. A damaged file raises :class:`GymError` naming it."""
    from omegaconf import OmegaConf

    packed = load_packed(path)
    name = packed.meta.get("quantizer")
    if not name:
        raise GymError(
            f"{path} has no 'quantizer' entry in its safetensors metadata, so gym cannot tell "
            "how to decode it; write delta files with gym_core.deltas.delta.save_packed"
        )
    if name not in plugins.registry("quant"):
        raise GymError(
            f"{path} was written by quantizer '{name}', which is not installed here "
            f"(installed: {', '.join(plugins.registry('quant').names())}); install the plugin "
            "that provides it"
        )
    comp = plugins.component("quant", name)
    quantizer = comp.load()(OmegaConf.structured(comp.config))
    try:
        return quantizer.dequantize(packed)
    except GymError as exc:
        raise GymError(f"{path}: {exc}") from None


def reconstruction_error(delta: dict[str, torch.Tensor], restored: dict[str, torch.Tensor]):
    """How far a dequantized delta is from the original (docs/algorithms.md §10.7), per
    tensor and over all of them: relative Frobenius error ||D - D_hat|| / ||D||,
    SNR in dB 10 log10(||D||^2 / ||D - D_hat||^2) and cosine(D, D_hat), in fp64."""

    def metrics(sq_d, sq_e, dot, sq_r):
        rel = (sq_e / sq_d) ** 0.5 if sq_d > 0 else 0.0
        # an exact reconstruction has no finite SNR: null in the JSON
        snr = 10 * math.log10(sq_d / sq_e) if sq_e > 0 and sq_d > 0 else None
        cos = dot / (sq_d * sq_r) ** 0.5 if sq_d > 0 and sq_r > 0 else 0.0
        return {"rel_fro_error": round(rel, 6), "snr_db": None if snr is None else round(snr, 3),
                "cosine": round(cos, 6)}

    per, total = {}, [0.0, 0.0, 0.0, 0.0]
    for key, d in delta.items():
        d = d.double()
        r = restored[key].double()
        parts = [float(d.square().sum()), float((d - r).square().sum()),
                 float((d * r).sum()), float(r.square().sum())]
        per[key] = metrics(*parts)
        total = [a + b for a, b in zip(total, parts)]
    return {"total": metrics(*total), "per_tensor": per}
