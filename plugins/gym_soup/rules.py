"""DeltaSoup rules (docs/algorithms.md §11) on flattened deltas [n contributors, d weights].
Coordinate-wise rules work in column chunks so memory stays near the input's size."""

from __future__ import annotations

import math

import torch

from gym_core.api import Aggregate, Aggregator, GymError

CHUNK = 1 << 20  # columns per chunk for sorting rules


def _uniform(name: str, weights: torch.Tensor) -> None:
    if not bool((weights == weights[0]).all()):
        raise GymError(
            f"soup={name} treats every contributor alike and cannot use soup.weights="
            f"{weights.tolist()}; use soup=mean or soup=geometric_median for weights"
        )


def _sorted_chunks(deltas: torch.Tensor):
    for start in range(0, deltas.shape[1], CHUNK):
        yield start, deltas[:, start: start + CHUNK].sort(dim=0).values


class Mean(Aggregator):
    def aggregate(self, deltas, weights, generator):
        w = weights / weights.sum() if self.cfg.normalize else weights
        return Aggregate(self.cfg.lam * (w @ deltas), [False] * len(weights))

    def sensitivity(self, clip_norm, weights):
        # One contributor of norm <= C moves lam * w_k D_k / sum(w) by at most
        # lam * max(w) C / sum(w) (the denominator is the fixed cohort, §11.4).
        w = weights / weights.sum() if self.cfg.normalize else weights
        return float(abs(self.cfg.lam) * w.max() * clip_norm)


class Median(Aggregator):
    def aggregate(self, deltas, weights, generator):
        _uniform("median", weights)
        n = deltas.shape[0]
        out = torch.empty(deltas.shape[1])
        for start, s in _sorted_chunks(deltas):
            out[start: start + s.shape[1]] = (s[(n - 1) // 2] + s[n // 2]) / 2
        return Aggregate(out, [False] * n)


class TrimmedMean(Aggregator):
    def aggregate(self, deltas, weights, generator):
        _uniform("trimmed_mean", weights)
        n = deltas.shape[0]
        k = math.floor(self.cfg.beta * n)
        if n - 2 * k < 1:  # beta in [0, 0.5): TrimmedMeanConfig declares it
            raise GymError(f"soup.beta={self.cfg.beta} must be in [0, 0.5) and leave at least "
                           f"one of the {n} contributors per coordinate")
        out = torch.empty(deltas.shape[1])
        for start, s in _sorted_chunks(deltas):
            out[start: start + s.shape[1]] = s[k: n - k].mean(dim=0)
        return Aggregate(out, [False] * n)


class Krum(Aggregator):
    def aggregate(self, deltas, weights, generator):
        _uniform(self.cfg.name, weights)
        n, f = deltas.shape[0], self.cfg.f
        if n < 2 * f + 3:
            raise GymError(f"soup={self.cfg.name} with soup.f={f} needs at least {2 * f + 3} "
                           f"contributors (n >= 2f + 3), got {n}")
        m = n - f if self.cfg.m is None else self.cfg.m
        if m > n:  # m >= 1: KrumConfig declares it
            raise GymError(f"soup.m={m} must be between 1 and the {n} contributors")
        # squared distances from the Gram matrix in fp64 (d is large, values small)
        x = deltas.double()
        sq = (x * x).sum(dim=1)
        dist = (sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * x @ x.T).clamp_min(0)
        dist.fill_diagonal_(math.inf)
        scores = dist.sort(dim=1).values[:, : n - f - 2].sum(dim=1)
        chosen = scores.argsort()[:m]
        excluded = [True] * n
        for i in chosen.tolist():
            excluded[i] = False
        return Aggregate(deltas[chosen].mean(dim=0), excluded)


class GeometricMedian(Aggregator):
    def aggregate(self, deltas, weights, generator):
        cfg = self.cfg
        w = (weights / weights.sum()).double()
        z = (w.float() @ deltas).double()
        for _ in range(cfg.max_iterations):
            dist = (deltas.double() - z).norm(dim=1)
            b = w / dist.clamp_min(cfg.nu)
            new = (b / b.sum()).float() @ deltas
            step = float((new.double() - z).norm())
            z = new.double()
            if step <= cfg.tol * float(z.norm()):
                break
        return Aggregate(z.float(), [False] * deltas.shape[0])


def ties_merge(tensors: torch.Tensor, lam: float) -> torch.Tensor:
    """Elect a sign per coordinate (sign of the sum) and average the non-zero entries that
    agree with it (TIES steps 2-3)."""
    elected = torch.sign(tensors.sum(dim=0))
    agree = (torch.sign(tensors) == elected) & (tensors != 0)
    count = agree.sum(dim=0).clamp_min(1)
    return lam * (tensors * agree).sum(dim=0) / count


class Ties(Aggregator):
    def aggregate(self, deltas, weights, generator):
        density = self.cfg.density  # in (0, 1]: TiesConfig declares it
        tasks = deltas * weights.unsqueeze(1)
        keep = max(1, math.ceil(density * deltas.shape[1]))
        trimmed = torch.zeros_like(tasks)
        for i, t in enumerate(tasks):
            # the keep-th largest magnitude is the threshold (ties at it may keep a few more)
            threshold = t.abs().kthvalue(t.numel() - keep + 1).values
            trimmed[i] = torch.where(t.abs() >= threshold, t, torch.zeros(()))
        return Aggregate(ties_merge(trimmed, self.cfg.lam), [False] * len(weights))


class Dare(Aggregator):
    def aggregate(self, deltas, weights, generator):
        cfg = self.cfg  # p in [0, 1), combine mean | ties: DareConfig declares them
        keep = torch.rand(deltas.shape, generator=generator) >= cfg.p
        rescaled = deltas * keep / (1 - cfg.p)  # unbiased: E[rescaled] = deltas
        if cfg.combine == "mean":
            w = weights / weights.sum()
            return Aggregate(cfg.lam * (w @ rescaled), [False] * len(weights))
        return Aggregate(ties_merge(rescaled * weights.unsqueeze(1), cfg.lam),
                         [False] * len(weights))
