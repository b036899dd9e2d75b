"""Variants of one base model, held in their compact form: a run's packed delta (BitDelta,
DeltaQuant, any quantizer: :meth:`gym_core.deltas.delta.Quantizer.operators`) or its LoRA adapter.

A variant is a set of :class:`~gym_core.deltas.delta.DeltaOperator`, one per linear layer it
changes; the server adds each one's ``x @ D^T`` to the base layer's output for the rows
that asked for that variant. Loading checks that the variant was made for the base being
served: every matrix's shape, and the run's recorded ``model`` config when there is one.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gym_core.base.errors import GymError
from gym_core.deltas.delta import DeltaOperator, load_packed

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
SOURCE = Path(__file__).with_name("lora.cpp")


def lora_kernels():
    from gym_core.base.native import load_ops

    load_ops("gym_lora_serving", str(SOURCE), ("-fopenmp-simd",))
    return torch.ops.gym_lora


class LoraOperator(DeltaOperator):
    """``scaling * B @ A`` of one LoRA layer, kept factored (rank r)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scaling: float):
        super().__init__((b.shape[0], a.shape[1]))
        self.a = a.detach().float().contiguous()  # [r, in]
        self.bt = b.detach().float().t().contiguous()  # [r, out]
        self.rank = int(a.shape[0])
        self.scaling = float(scaling)

    @property
    def nbytes(self) -> int:
        return (self.a.numel() + self.bt.numel()) * 4

    def apply(self, x):
        return torch.nn.functional.linear(torch.nn.functional.linear(x, self.a),
                                          self.bt.t()) * self.scaling

    @classmethod
    def prepare(cls, ops):
        """Per group: A's and B^T's addresses and the rank (0s: no adapter here), and
        the scaling. ``ops`` keeps the matrices alive while these are used."""
        ints = torch.tensor([[op.a.data_ptr(), op.bt.data_ptr(), op.rank] if op is not None
                             else [0, 0, 0] for op in ops], dtype=torch.int64).t().contiguous()
        scalings = torch.tensor([op.scaling if op is not None else 0.0 for op in ops],
                                dtype=torch.float32)
        return ints[0], ints[1], ints[2], scalings

    @classmethod
    def add_to(cls, x, y, groups, ops, prepared=None):
        first = next(op for op in ops if op is not None)
        a, bt, ranks, scalings = prepared if prepared is not None else cls.prepare(ops)
        lora_kernels().apply(x, y, groups.idx, groups.offs, a, bt, ranks, scalings,
                             first.in_features, first.out_features)


@dataclass
class Base:
    """What variants are checked against: the served model's linear layers and config."""

    model_cfg: object  # the gym ModelConfig the base was loaded from
    linear: dict[str, tuple[int, int]]  # module name -> (out, in)
    description: str
    norms: dict[str, float] = field(default_factory=dict)  # module name -> ||W||_F

    @classmethod
    def of(cls, model: torch.nn.Module, model_cfg, description: str) -> Base:
        linear = {name: (m.out_features, m.in_features) for name, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear)}
        with torch.no_grad():
            norms = {name: float(m.weight.float().norm()) for name, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear)}
        return cls(model_cfg, linear, description, norms)


#: a served variant may change a layer by at most this many times the base weight's
#: Frobenius norm: a fine-tune moves weights by a fraction of their size, so a delta far
#: larger is a damaged or crafted file (a scale of 1e30 with a recomputed checksum)
MAX_DELTA_RATIO = 100.0
_PROBES = 4


def check_magnitude(target: Path, ops: dict[str, DeltaOperator], base: Base) -> None:
    """Refuse a variant whose change to any layer is not finite or larger than
    :data:`MAX_DELTA_RATIO` times the base weight's norm. ``||D||_F`` is estimated from
    ``_PROBES`` Gaussian probes (``E ||G D^T||^2 = k ||D||_F^2``), whatever the operator:
    packed sign matrices, quantized groups and LoRA factors alike."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, op in ops.items():
            norm = base.norms.get(key)
            if norm is None:
                continue
            probes = torch.randn(_PROBES, op.in_features, generator=g)
            size = float(op.apply(probes).float().norm()) / _PROBES ** 0.5
            if not math.isfinite(size) or size > MAX_DELTA_RATIO * max(norm, 1e-12):
                raise GymError(
                    f"variant {target} changes '{key}' by about {size:.3g} (Frobenius norm), "
                    f"where the base weight's norm is {norm:.3g}: more than "
                    f"{MAX_DELTA_RATIO:g} times the base is not a fine-tune of it (a damaged "
                    "or crafted file); refused")


def confine(raw: str, folders: list[Path]) -> Path | None:
    """The variant path ``raw`` (absolute, or relative to one of ``folders``) if it lies
    inside one of ``folders`` once symbolic links and ``..`` are resolved; None otherwise.
    Nothing about the file system outside ``folders`` shows in the answer."""
    import os

    path = Path(raw).expanduser()
    roots = [Path(os.path.realpath(f)) for f in folders]
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, *(r / path for r in roots)]
    inside = []
    for c in candidates:
        real = Path(os.path.realpath(c))
        if any(real == r or real.is_relative_to(r) for r in roots):
            inside.append(real)
    return next((c for c in inside if c.exists()), inside[0] if inside else None)


@dataclass
class Variant:
    name: str
    kind: str  # the quantizer's name ("bitdelta", "deltaquant", ...) or "lora"
    source: str  # the file or folder it was loaded from
    ops: dict[str, DeltaOperator]  # linear module name -> operator
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def nbytes(self) -> int:
        return sum(op.nbytes for op in self.ops.values())

    def describe(self) -> dict:
        return {"id": self.name, "object": "variant", "kind": self.kind, "source": self.source,
                "bytes": self.nbytes, "layers": len(self.ops), "created": self.created}


# ----------------------------------------------------------------------------------------
# where a variant comes from
# ----------------------------------------------------------------------------------------


def _is_adapter(path: Path) -> bool:
    return path.is_dir() and (path / "adapter_config.json").is_file()


def _is_run(path: Path) -> bool:
    return path.is_dir() and ((path / "delta").is_dir() or _is_adapter(path / "final"))


def resolve(path: Path) -> Path:
    """A run directory -> the file or folder to serve: its one delta file, else its
    LoRA adapter (``final/``). Files and adapter folders are returned as they are."""
    if path.is_file() or _is_adapter(path):
        return path
    if not path.exists():
        raise GymError(f"variant {path} does not exist")
    deltas = sorted((path / "delta").glob("*.safetensors")) if (path / "delta").is_dir() else []
    if len(deltas) == 1:
        return deltas[0]
    if len(deltas) > 1:
        raise GymError(
            f"run {path} has {len(deltas)} delta files ({', '.join(d.name for d in deltas)}): "
            f"name one, e.g. NAME={deltas[0]}"
        )
    if _is_adapter(path / "final"):
        return path / "final"
    raise GymError(
        f"{path} is not a variant: expected a run directory (with delta/*.safetensors or a "
        "LoRA adapter in final/), a delta .safetensors file or a LoRA adapter folder"
    )


def expand(specs: list[str]) -> list[tuple[str, Path]]:
    """``--variants`` arguments -> (name, path) pairs. Each is ``NAME=PATH`` or ``PATH``
    (named after the run directory, or the file's stem); a folder holding runs stands for
    every run in it."""
    out: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, raw = spec.partition("=")
        if not sep:
            name, raw = "", spec
        path = Path(raw).expanduser()
        if not name and path.is_dir() and not _is_run(path) and not _is_adapter(path):
            runs = sorted(p for p in path.iterdir() if _is_run(p))
            if not runs:
                raise GymError(f"--variants {spec}: {path} holds no runs (folders with delta/ "
                               "or final/)")
            out += [(p.name, p) for p in runs]
            continue
        out.append((name or default_name(path), path))
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise GymError(f"--variants names {', '.join(dup)} more than once: give each a "
                       "distinct name with NAME=PATH")
    return out


def default_name(path: Path) -> str:
    path = path.resolve()
    if path.is_file():  # runs/<run>/delta/<quant>.safetensors -> <run>
        return path.parent.parent.name if path.parent.name == "delta" else path.stem
    if path.name == "final" and _is_run(path.parent):
        return path.parent.name
    return path.name


def run_dir_of(path: Path) -> Path | None:
    """The run directory a variant file/folder belongs to (where .hydra/ is), if any."""
    for p in [path, *path.resolve().parents][:3]:
        if (p / ".hydra" / "config.yaml").is_file():
            return p
    return None


# ----------------------------------------------------------------------------------------
# loading and checking
# ----------------------------------------------------------------------------------------


def load_variant(name: str, path: Path, base: Base, plugins) -> Variant:
    """Load and check one variant; a :class:`GymError` names the file and what is wrong."""
    if not NAME_RE.match(name):
        raise GymError(f"variant name {name!r} must be 1-128 letters, digits or ._:/- "
                       "(starting with a letter or digit)")
    target = resolve(Path(path).expanduser())
    check_recorded_base(target, base)
    if target.is_file():
        kind, ops = _delta_operators(target, plugins)
    else:
        kind, ops = "lora", _lora_operators(target)
    if not ops:
        raise GymError(f"variant {target} changes no linear layer")
    for key, op in ops.items():
        shape = base.linear.get(key)
        if shape is None:
            raise GymError(f"variant {target} changes '{key}', which {base.description} has "
                           "no linear layer of: it was made for another model")
        if (op.out_features, op.in_features) != shape:
            raise GymError(
                f"variant {target} has a [{op.out_features}, {op.in_features}] delta for "
                f"'{key}', where {base.description} has [{shape[0]}, {shape[1]}]: it was "
                "made for another model"
            )
    check_magnitude(target, ops, base)
    return Variant(name, kind, str(target), ops)


def check_recorded_base(target: Path, base: Base) -> None:
    """The run's recorded model config (``.hydra/config.yaml``) names the same base."""
    run = run_dir_of(target)
    if run is None:
        return
    from omegaconf import OmegaConf

    try:
        recorded = OmegaConf.load(run / ".hydra" / "config.yaml").get("model")
    except Exception as exc:  # a damaged YAML file
        raise GymError(f"{run / '.hydra' / 'config.yaml'} is not readable: {exc}") from exc
    if recorded is None:
        return
    mine = base.model_cfg
    problem = None
    if recorded.get("source") != mine.source:
        problem = f"model={recorded.get('source')}, this server's base is model={mine.source}"
    elif mine.source == "tiny":
        theirs, ours = dict(recorded.get("tiny") or {}), dict(OmegaConf.to_container(
            OmegaConf.structured(mine.tiny) if not OmegaConf.is_config(mine.tiny) else mine.tiny))
        if theirs != ours:
            problem = f"model.tiny={theirs}, this server's base has {ours}"
    elif mine.source == "local":
        theirs = recorded.get("path")
        if theirs and Path(theirs).expanduser().exists() and \
                Path(theirs).expanduser().resolve() != Path(mine.path).expanduser().resolve():
            problem = f"model.path={theirs}, this server's base is {mine.path}"
    if problem:
        raise GymError(f"variant {target} was trained on another base ({problem})")


def _delta_operators(path: Path, plugins) -> tuple[str, dict[str, DeltaOperator]]:
    from omegaconf import OmegaConf

    packed = load_packed(path)
    qname = packed.meta.get("quantizer")
    if not qname:
        raise GymError(f"{path} has no 'quantizer' metadata: it is not a gym delta file")
    if qname not in plugins.registry("quant"):
        raise GymError(f"{path} was written by quantizer '{qname}', which is not installed here")
    comp = plugins.component("quant", qname)
    quantizer = comp.load()(OmegaConf.structured(comp.config))
    try:
        shapes = json.loads(packed.meta.get("shapes", "{}"))
    except json.JSONDecodeError as exc:
        raise GymError(f"{path}: its 'shapes' metadata is not JSON ({exc}): the file is damaged") from exc
    try:
        matrices = quantizer.operators(packed)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise GymError(f"{path} could not be read as a {qname} delta ({exc}): the file is damaged") from exc
    keys = shapes or packed.tensors  # a full-precision delta is its tensors
    unserved = [k for k in keys if k not in matrices]
    if unserved:
        raise GymError(
            f"{path} changes {unserved[0]!r}{' and others' if len(unserved) > 1 else ''}, which "
            "is not a matrix: the server applies deltas of linear layers only (a full "
            "fine-tune also changes norms and embeddings: serve its merged model instead)"
        )
    ops = {}
    for key, op in matrices.items():
        if not key.endswith(".weight"):
            raise GymError(f"{path} changes '{key}', which is not a layer's weight")
        ops[key.removesuffix(".weight")] = op
    return qname, ops


def _lora_operators(folder: Path) -> dict[str, DeltaOperator]:
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    try:
        cfg = LoraConfig.from_pretrained(str(folder))
    except Exception as exc:
        raise GymError(f"{folder / 'adapter_config.json'} is not a LoRA adapter config: {exc}") from exc
    unsupported = [what for what, on in (
        ("DoRA (use_dora)", getattr(cfg, "use_dora", False)),
        (f"bias={cfg.bias!r}", cfg.bias != "none"),
        ("modules_to_save", bool(cfg.modules_to_save)),
    ) if on]
    if unsupported:
        raise GymError(f"LoRA adapter {folder} uses {', '.join(unsupported)}, which the server "
                       "cannot apply per row: serve its merged model instead")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise GymError(f"LoRA adapter {folder} has no adapter_model.safetensors")
    try:
        state = load_file(str(weights))
    except Exception as exc:
        raise GymError(f"{weights} is not a readable safetensors file: {exc}") from exc
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        m = re.match(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
        if m is None:
            raise GymError(f"{weights} holds '{key}', which is not a LoRA A/B matrix")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    lora_kernels()  # compile (first time) here, not in the serving thread
    ops = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise GymError(f"{weights} has lora_{next(iter(ab))} of '{module}' without its pair")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise GymError(f"{weights}: '{module}' has A {tuple(a.shape)} and B "
                           f"{tuple(b.shape)}, which do not multiply: the file is damaged")
        r_key = get_pattern_key(cfg.rank_pattern.keys(), module) if cfg.rank_pattern else None
        a_key = get_pattern_key(cfg.alpha_pattern.keys(), module) if cfg.alpha_pattern else None
        r = cfg.rank_pattern.get(r_key, cfg.r) if r_key else cfg.r
        alpha = cfg.alpha_pattern.get(a_key, cfg.lora_alpha) if a_key else cfg.lora_alpha
        if r != a.shape[0]:
            raise GymError(f"{weights}: '{module}' has rank {a.shape[0]}, its config says {r}")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise GymError(f"{weights}: '{module}' has NaN or infinite entries")
        scaling = alpha / math.sqrt(r) if cfg.use_rslora else alpha / r
        ops[module] = LoraOperator(a, b, scaling)
    return ops


# ----------------------------------------------------------------------------------------
# the set being served
# ----------------------------------------------------------------------------------------


class Registry:
    """The variants being served, by name; safe to change while requests run (a request
    holds its variant, so removing one lets the requests already running finish)."""

    def __init__(self, base_name: str):
        self.base_name = base_name
        self._variants: dict[str, Variant] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Variant | None:
        with self._lock:
            return self._variants.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._variants)

    def all(self) -> list[Variant]:
        with self._lock:
            return list(self._variants.values())

    def add(self, variant: Variant, replace: bool = False) -> None:
        with self._lock:
            if variant.name == self.base_name:
                raise GymError(f"'{variant.name}' is the base model's name; pick another")
            if variant.name in self._variants and not replace:
                raise GymError(f"a variant named '{variant.name}' is already being served")
            self._variants[variant.name] = variant

    def remove(self, name: str) -> Variant | None:
        with self._lock:
            return self._variants.pop(name, None)
