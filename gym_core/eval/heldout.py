"""Held-out evaluation: greedy answers to the task's test prompts, scored by its metric."""

from __future__ import annotations

import torch

from gym_core.base.threads import rebalance
from gym_core.sampling.generation import Sampling, sample
from gym_core.train.distributed import Dist


@torch.no_grad()
def evaluate(model, tokenizer, examples, metric_fn, *, system_prompt=None, batch_size=64,
             max_new_tokens=32, desc="eval", dist: Dist | None = None,
             max_prompt_length: int | None = None, progress: bool = False) -> float:
    """Mean of ``metric_fn`` over greedy completions of ``examples`` (one KV-cached
    generation per batch of prompts). Under torchrun each rank scores every world-th
    example and the sums are all-reduced: every rank returns the same mean.
    ``progress``: a progress bar named ``desc``, counting prompts."""
    dist = dist or Dist()
    if not examples:
        return float("nan")
    total = len(examples)
    examples = examples[dist.rank :: dist.world]
    scores: list[float] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(examples), desc=desc, unit="prompt")
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [ex["prompt"] for ex in chunk]
        rebalance()
        out = sample(model, tokenizer, prompts, system_prompt=system_prompt,
                     max_new_tokens=max_new_tokens, sampling=Sampling(do_sample=False),
                     max_prompt_length=max_prompt_length)
        scores.extend(metric_fn(prompts, out.texts, chunk))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return dist.all_reduce_sum([sum(scores)])[0] / total


@torch.no_grad()
def preference_accuracy(policy, examples, *, batch_size=32, max_prompt_length=256,
                        max_completion_length=64, dist: Dist | None = None,
                        desc: str = "preference", progress: bool = False) -> float | None:
    """Share of held-out pairs whose chosen completion has the higher log-probability
    under the policy (summed over its tokens), prompts rendered as in training. None when
    the examples hold no pairs. ``progress``: a progress bar named ``desc``, counting
    pairs."""
    dist = dist or Dist()
    pairs = [ex for ex in examples if "chosen" in ex and "rejected" in ex]
    if not pairs:
        return None
    total = len(pairs)
    pairs = pairs[dist.rank :: dist.world]
    model = policy.model
    was_training, temperature = model.training, policy.temperature
    model.eval()
    # the metric compares the model's own log-probs (T = 1), whatever temperature the
    # trained method samples and scores at
    policy.temperature = 1.0
    wins = 0.0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pairs), desc=desc, unit="pair")
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = policy.encode([ex["prompt"] for ex in chunk],
                              [[ex["chosen"], ex["rejected"]] for ex in chunk],
                              max_prompt_length=max_prompt_length,
                              max_completion_length=max_completion_length)
        # without gradients: ranks may hold different numbers of batches, and no DDP
        # synchronisation is needed
        logp = policy.logprobs(batch)
        sums = (logp * batch.completion_mask).sum(-1).view(-1, 2)
        wins += (sums[:, 0] > sums[:, 1]).float().sum().item()
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    model.train(was_training)
    policy.temperature = temperature
    return dist.all_reduce_sum([wins])[0] / total


#: An episode counts as solved when the environment ended it and the reward of its last
#: turn reaches this: the pass threshold of ``gym_core.eval`` (a verifier score of 1).
SOLVED_AT = 1.0


@torch.no_grad()
def evaluate_episodes(model, tokenizer, env_cls, env_cfg, examples, *, system_prompt=None,
                      batch_size=64, desc="eval", dist: Dist | None = None,
                      max_prompt_length: int | None = None, progress: bool = False,
                      fused: bool | None = None) -> dict | None:
    """Greedy episodes of ``examples`` with the environment (one per example, batched
    like :func:`evaluate`, the environment's limits as in training), summarised:

    - ``accuracy``: the share of episodes the environment ended (``done``) with a last
      turn's reward of at least :data:`SOLVED_AT` (calculator: the final answer's last
      number is right; wordle: the word was found);
    - ``mean_return``: the mean of the episodes' summed turn rewards (undiscounted);
    - ``tool_call_share``: episodes with at least one well-formed tool call;
    - ``tool_ok_share``: episodes with at least one tool call and no tool error (no
      malformed call, no call whose result was ``error: ...``), no environment error;
    - ``mean_turns``, ``error_share`` (the environment failed), ``truncated_share``.

    Under torchrun each rank plays every world-th example and the sums are all-reduced.
    ``fused``: as :func:`~gym_core.sampling.episodes.sample_episodes` (None: the fused
    decoder when the model has one). None without examples."""
    from gym_core.sampling.episodes import sample_episodes

    dist = dist or Dist()
    if not examples:
        return None
    total = len(examples)
    examples = examples[dist.rank :: dist.world]
    keys = ("accuracy", "mean_return", "tool_call_share", "tool_ok_share", "mean_turns",
            "error_share", "truncated_share")
    sums = [0.0] * len(keys)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(examples), desc=desc, unit="episode")
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        rebalance()
        out = sample_episodes(model, tokenizer, env_cls, env_cfg, chunk, num_samples=1,
                              sampling=Sampling(do_sample=False), system_prompt=system_prompt,
                              max_prompt_length=max_prompt_length, fused=fused)
        for rec in out.records:
            called = rec.tool_calls > 0
            solved = rec.done and rec.error is None and bool(rec.rewards) \
                and rec.rewards[-1] >= SOLVED_AT
            values = (solved, sum(rec.rewards), called,
                      called and rec.tool_errors == 0 and rec.error is None,
                      rec.turns, rec.error is not None, rec.truncated)
            sums = [s + float(v) for s, v in zip(sums, values)]
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    sums = dist.all_reduce_sum(sums)
    return {**{k: s / total for k, s in zip(keys, sums)}, "episodes": total}
