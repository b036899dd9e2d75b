"""Scoring a model on a task's examples with gym's sampler: greedy accuracy, or ``n``
samples per prompt and the unbiased ``pass@k`` (Chen et al. 2021, "Evaluating Large
Language Models Trained on Code", eq. 1) and ``avg@n``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from gym_core.base.errors import GymError


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from ``n`` samples of which ``c`` are correct:
    ``1 - C(n - c, k) / C(n, k)``, computed as a product (no large binomials)."""
    if not 0 < k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n (n = {n})")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


@dataclass
class Settings:
    """How completions are drawn and scored (what the results store's digest covers)."""

    n: int = 1  # samples per prompt; 1 with temperature 0: greedy
    ks: tuple[int, ...] = (1,)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    batch_size: int = 64
    seed: int = 0
    pass_threshold: float = 1.0  # a sample counts as solved when its score reaches this

    @property
    def greedy(self) -> bool:
        return self.n == 1

    def check(self) -> None:
        if self.n < 1:
            raise GymError(f"eval.n={self.n} must be at least 1")
        bad = [k for k in self.ks if not 1 <= k <= self.n]
        if bad:
            raise GymError(f"eval.k={list(self.ks)} has values outside 1..eval.n={self.n}; "
                           f"pass@k needs k <= n samples (raise eval.n or drop {bad})")
        if self.n > 1 and self.temperature <= 0:
            raise GymError("eval.n > 1 samples need eval.temperature > 0 (temperature 0 "
                           "draws the same greedy answer n times)")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise GymError("eval.max_new_tokens and eval.batch_size must be at least 1")

    def digest_fields(self) -> dict:
        if self.greedy:
            return {"n": 1, "max_new_tokens": self.max_new_tokens}
        return {"n": self.n, "ks": list(self.ks), "temperature": self.temperature,
                "top_p": self.top_p, "max_new_tokens": self.max_new_tokens,
                "seed": self.seed, "pass_threshold": self.pass_threshold}


def summarise(scores: list[list[float]], s: Settings, metric: str) -> dict[str, float]:
    """Per-prompt score lists (``n`` each) as the reported metrics: ``metric`` (greedy),
    or ``pass@k`` for each k and ``avg@n`` (the mean score of all samples)."""
    if not scores:
        return {}
    if s.greedy:
        return {metric: float(np.mean([x[0] for x in scores]))}
    out = {}
    for k in s.ks:
        out[f"pass@{k}"] = float(np.mean([
            pass_at_k(len(x), sum(v >= s.pass_threshold for v in x), k) for x in scores]))
    out[f"avg@{s.n}"] = float(np.mean([np.mean(x) for x in scores]))
    return out


ScoreFn = Callable[[list, list[str], list[dict]], list[float]]


@torch.no_grad()
def score_local(model, tokenizer, examples: list[dict], metric_fn: ScoreFn, s: Settings, *,
                system_prompt: str | None = None, max_prompt_length: int | None = None,
                progress: Callable[[int], None] | None = None) -> list[list[float]]:
    """``n`` completions of each example's prompt from gym's sampler (greedy for n = 1),
    each scored by ``metric_fn``; a list of ``n`` scores per example. Sampled rows are
    seeded per (example, sample), so the scores do not depend on the batch size."""
    from gym_core.base.threads import rebalance
    from gym_core.sampling.generation import Sampling, sample

    sampling = (Sampling(do_sample=False) if s.greedy else
                Sampling(do_sample=True, temperature=s.temperature, top_p=s.top_p))
    out: list[list[float]] = []
    per_batch = max(1, s.batch_size // s.n)
    for start in range(0, len(examples), per_batch):
        chunk = examples[start : start + per_batch]
        rebalance()
        seeds = None if s.greedy else [s.seed * 1_000_003 + (start + i) * s.n + j
                                       for i in range(len(chunk)) for j in range(s.n)]
        got = sample(model, tokenizer, [ex["prompt"] for ex in chunk],
                     system_prompt=system_prompt, max_new_tokens=s.max_new_tokens,
                     sampling=sampling, num_samples=s.n, row_seeds=seeds,
                     max_prompt_length=max_prompt_length)
        prompts = [ex["prompt"] for ex in chunk for _ in range(s.n)]
        rows = [ex for ex in chunk for _ in range(s.n)]
        flat = [float(v) for v in metric_fn(prompts, got.texts, rows)]
        out.extend(flat[i * s.n : (i + 1) * s.n] for i in range(len(chunk)))
        if progress is not None:
            progress(len(chunk))
    return out
