"""DeltaSoup: merge many contributors' deltas into one (docs/algorithms.md §11).

The core reads the inputs (any quantizer's files, decoded through the quantizer their
metadata names), flattens them into one fp32 matrix [contributors, weights], clips each
contributor, calls the rule (an :class:`Aggregator` plugin), adds DP noise when asked,
and writes one full-precision delta file plus a JSON report. The rules themselves live
in plugins (``gym_soup`` for the built-in ones).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from gym_core.base.errors import GymError
from gym_core.base.files import write_json
from gym_core.deltas.delta import FullPrecision, read_delta, save_packed


@dataclass
class Aggregate:
    vector: torch.Tensor  # the merged delta, flattened like the inputs
    excluded: list[bool]  # per contributor: left out of the result by the rule


class Aggregator:
    """Base of aggregation rules: ``aggregate`` merges the rows of ``deltas``."""

    Config: ClassVar[type]

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def aggregate(self, deltas: torch.Tensor, weights: torch.Tensor,
                  generator: torch.Generator) -> Aggregate:
        """``deltas`` [n, d] fp32 (already clipped), ``weights`` [n] (all 1 unless the user
        gave some), ``generator`` for any randomness (DARE's masks)."""
        raise NotImplementedError

    def sensitivity(self, clip_norm: float, weights: torch.Tensor) -> float | None:
        """The L2 sensitivity of the aggregate to adding or removing one contributor
        whose delta norm is at most ``clip_norm``, or ``None`` where it has no such bound
        (then DP noise is refused for this rule)."""
        return None


def resolve_input(path: str) -> Path:
    """A delta file, or a run directory holding exactly one ``delta/*.safetensors``."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted((p / "delta").glob("*.safetensors")) if (p / "delta").is_dir() else []
        if len(files) != 1:
            raise GymError(
                f"soup.inputs names the directory {p}, which holds {len(files)} delta files in "
                f"{p / 'delta'} (a run directory has one when it ran with quant=<name>); "
                "name the delta file itself"
            )
        return files[0]
    if not p.is_file():
        raise GymError(f"soup.inputs names {p}, which does not exist")
    return p


def make_soup(cfg: Any, out_dir: Path, plugins) -> dict[str, Any]:
    """Merge ``cfg.inputs`` with rule ``cfg.name`` (from ``plugins``, the loaded plugins);
    write ``soup.safetensors`` and ``report.json`` into ``out_dir``; return the report.
    ``cfg``'s values are checked against its schema's declarations first (the soup app
    has checked them already; in-process callers get the same one-line errors)."""
    from gym_core.config.fields import check_values

    check_values(cfg, "soup")
    rule = plugins.component("soup", cfg.name).load()(cfg)
    paths = [resolve_input(p) for p in cfg.inputs]
    if len(paths) < 2:
        raise GymError(f"soup.inputs has {len(paths)} delta(s); a soup needs at least two")
    deltas = [read_delta(p, plugins) for p in paths]
    shapes = {k: tuple(v.shape) for k, v in deltas[0].items()}
    for path, d in zip(paths[1:], deltas[1:]):
        other = {k: tuple(v.shape) for k, v in d.items()}
        if other != shapes:
            diff = sorted(set(shapes) ^ set(other)) or [k for k in shapes if shapes[k] != other[k]]
            raise GymError(
                f"{path} does not match {paths[0]}: they differ in {diff[:3]}; a soup merges "
                "deltas of the same base model and the same set of weights"
            )
    keys = sorted(shapes)
    flat = torch.stack([torch.cat([d[k].reshape(-1).float() for k in keys]) for d in deltas])
    del deltas
    n = flat.shape[0]
    # one per input, >= 0, a positive sum: SoupConfig declares it
    weights = torch.ones(n) if cfg.weights is None else torch.tensor(list(cfg.weights), dtype=torch.float32)

    norms = flat.norm(dim=1)
    clipped = [False] * n
    if cfg.clip_norm is not None:
        factor = (cfg.clip_norm / norms.clamp_min(1e-30)).clamp(max=1.0)  # §11.4
        clipped = [bool(f < 1.0) for f in factor]
        flat = flat * factor.unsqueeze(1)

    seed = cfg.seed if cfg.seed is not None else secrets.randbits(63)
    generator = torch.Generator().manual_seed(seed)
    result = rule.aggregate(flat, weights, generator)

    privacy = None
    if cfg.noise_multiplier > 0:
        if cfg.clip_norm is None:
            raise GymError(
                "soup.noise_multiplier > 0 needs soup.clip_norm: without clipping one "
                "contributor's influence is unbounded and the noise protects nothing"
            )
        sens = rule.sensitivity(cfg.clip_norm, weights)
        if sens is None:
            raise GymError(
                f"soup={cfg.name} has no bounded L2 sensitivity, so Gaussian noise gives it no "
                "stated privacy; use soup=mean (DP-FedAvg) with soup.noise_multiplier"
            )
        std = cfg.noise_multiplier * sens
        noise = torch.randn(result.vector.shape, generator=generator) * std
        result.vector = result.vector + noise
        privacy = {
            "noise_std": std, "sensitivity": sens, "noise_multiplier": cfg.noise_multiplier,
            "clip_norm": cfg.clip_norm, "sample_rate": cfg.sample_rate, "rounds": cfg.rounds,
            "delta": cfg.dp_delta,
            "epsilon": dp_epsilon(cfg.noise_multiplier, cfg.sample_rate, cfg.rounds, cfg.dp_delta),
            "accountant": "opacus RDP (sampled Gaussian mechanism)",
            "adjacency": "add/remove one contributor (replace-one doubles the sensitivity)",
            "rng": "torch.Generator seeded from the OS entropy" if cfg.seed is None
                   else f"torch.Generator, seed {seed} (reproducible: not private)",
        }

    merged, offset = {}, 0
    for k in keys:
        numel = 1
        for s in shapes[k]:
            numel *= s
        merged[k] = result.vector[offset: offset + numel].view(shapes[k]).clone()
        offset += numel
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    packed = FullPrecision(None).quantize(merged)
    packed.meta.update({"soup": cfg.name, "contributors": str(n)})
    size = save_packed(packed, out_dir / "soup.safetensors")
    # to the aggregate, from what the rule saw (the clipped delta when clipping)
    distances = (flat - result.vector).norm(dim=1)
    report = {
        "rule": cfg.name,
        "output": str(out_dir / "soup.safetensors"),
        "output_bytes": size,
        "num_params": packed.num_params,
        "aggregate_norm": float(result.vector.norm()),
        "contributors": [
            {
                "input": str(p),
                "weight": float(w),
                "norm": float(norms[i]),
                "clipped": clipped[i],
                "distance": float(distances[i]),
                "excluded": bool(result.excluded[i]),
            }
            for i, (p, w) in enumerate(zip(paths, weights.tolist()))
        ],
        "privacy": privacy,
    }
    write_json(out_dir / "report.json", report)
    return report


def dp_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """(epsilon, delta)-DP of ``rounds`` sampled Gaussian mechanisms, from opacus's RDP
    accountant (an optional dependency: ``pip install opacus``)."""
    try:
        from opacus.accountants import RDPAccountant
    except ImportError as exc:
        raise GymError(
            "soup.noise_multiplier > 0 reports (epsilon, delta) with opacus's accountant, which "
            "is not installed: pip install 'gym-core[dp]' (or pip install opacus)"
        ) from exc
    accountant = RDPAccountant()
    accountant.history = [(float(noise_multiplier), float(sample_rate), int(rounds))]
    return float(accountant.get_epsilon(delta=delta))
