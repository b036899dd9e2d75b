"""The built-in DeltaSoup rules (docs/algorithms.md §11): ``python -m gym_core.soup soup=<name>``.

Robust rules (median, trimmed_mean, krum, multi_krum, geometric_median) resist a minority
of bad contributors; merging rules (mean with lambda = task arithmetic, ties, dare)
combine honest task vectors. Only ``mean`` supports DP noise (its sensitivity is bounded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gym_core.api import SoupConfig, bounded, hookimpl, one_of


@dataclass
class MeanConfig(SoupConfig):
    """Weighted mean, scaled: lam * sum_k w_k D_k / sum_k w_k (uniform soup at lam 1).
    normalize=false gives task arithmetic, lam * sum_k w_k D_k (§11.3)."""

    name: str = "mean"
    lam: float = bounded(1.0)
    normalize: bool = True


@dataclass
class MedianConfig(SoupConfig):
    """Coordinate-wise median (Yin et al.; breakdown point 1/2); even counts average the
    two middle values."""

    name: str = "median"


@dataclass
class TrimmedMeanConfig(SoupConfig):
    """Per coordinate, drop the floor(beta n) largest and smallest values and average the
    rest; choose beta > f/n for f bad contributors."""

    name: str = "trimmed_mean"
    beta: float = bounded(0.2, ge=0, lt=0.5)


@dataclass
class KrumConfig(SoupConfig):
    """Krum: score_i = sum of squared distances to its n-f-2 nearest others; average the
    m best-scored (m 1: Krum; multi_krum: m = n - f). Needs n >= 2f + 3."""

    name: str = "krum"
    f: int = bounded(1, ge=0)  # contributors assumed malicious
    m: int | None = bounded(1, ge=1, hint="null: n - f")


@dataclass
class MultiKrumConfig(KrumConfig):
    name: str = "multi_krum"
    m: int | None = None


@dataclass
class GeometricMedianConfig(SoupConfig):
    """argmin_z sum_i w_i ||D_i - z|| by smoothed Weiszfeld (RFA): z <- sum b_i D_i / sum b_i,
    b_i = w_i / max(nu, ||D_i - z||), from the weighted mean."""

    name: str = "geometric_median"
    # RFA uses ~3 iterations; from the mean, one x100 outlier among six still pulls the
    # third iterate ~16% of the honest norm away, so iterate until it settles.
    max_iterations: int = bounded(100, ge=1)
    tol: float = bounded(1e-6, ge=0)  # stop when the step is below tol * ||z||
    nu: float = bounded(1e-8, gt=0)


@dataclass
class TiesConfig(SoupConfig):
    """TIES-merging: keep each delta's top `density` entries by magnitude, elect a sign per
    coordinate (sign of the sum), average the entries that agree; times lam."""

    name: str = "ties"
    density: float = bounded(0.2, gt=0, le=1)
    lam: float = bounded(1.0)


@dataclass
class DareConfig(SoupConfig):
    """DARE: drop each entry with probability p and rescale the rest by 1/(1-p), then
    merge: combine=mean (dare_linear: the weighted mean, times lam) or ties (dare_ties:
    sign election and disjoint mean, no magnitude trim)."""

    name: str = "dare"
    p: float = bounded(0.9, ge=0, lt=1)
    combine: str = one_of(Literal["mean", "ties"], "mean")
    lam: float = bounded(1.0)


RULES = {
    "mean": MeanConfig, "median": MedianConfig, "trimmed_mean": TrimmedMeanConfig,
    "krum": KrumConfig, "multi_krum": MultiKrumConfig,
    "geometric_median": GeometricMedianConfig, "ties": TiesConfig, "dare": DareConfig,
}
IMPLS = {
    "mean": "Mean", "median": "Median", "trimmed_mean": "TrimmedMean", "krum": "Krum",
    "multi_krum": "Krum", "geometric_median": "GeometricMedian", "ties": "Ties", "dare": "Dare",
}


@hookimpl
def gym_add_aggregators(registry):
    for name, config in RULES.items():
        registry.add(name, config, f"gym_soup.rules:{IMPLS[name]}")
