"""gym's sampler on the GRPO shape against transformers' ``generate``, beside the
machine's compute limit; and the training pass (forward + backward of the completions'
log-probs) against the same limit. Everything in one process, back to back.

The limit: FLOPs of a decode step (2 x weights x rows, attention included) divided by
the GFLOP/s of a large fp32 matmul measured in the same run, with the same threads.
Rows: 4 prompts x G=8, at most 32 new tokens, SmolLM2-135M-Instruct + LoRA r16, fp32.

    python benchmarks/generation.py                 # 5 timed rounds, interleaved
    python benchmarks/generation.py --rounds 3 --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from gym_core.base.threads import prepare_environment

prepare_environment()  # as gym's entry point does, before torch loads OpenMP


def matmul_peak(threads: int, n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of an n x n x n fp32 matmul (the best of ``reps``)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def model_flops(config, rows: int, context: int) -> float:
    """FLOPs of one decode step for ``rows`` rows at ``context`` cached positions: 2 x
    every weight of the linear layers and the LM head per row, plus attention (q.k and
    p.v over the context)."""
    d, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or d // heads
    per_layer = d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * inter
    weights = layers * per_layer + config.vocab_size * d
    attention = layers * heads * hd * context * 2
    return 2 * rows * (weights + attention)


def train_pass_flops(config, prompt_tokens: int, completion_tokens: int) -> float:
    """Forward + backward of the training pass with frozen base weights (LoRA): the
    backward computes input gradients only, about the forward's FLOPs again; the LM head
    runs on completion positions only."""
    d, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or d // heads
    per_layer = d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * inter
    body = 2 * layers * per_layer * (prompt_tokens + completion_tokens)
    head = 2 * config.vocab_size * d * completion_tokens
    return 2 * (body + head)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (after a warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="default: gym's choice")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    from gym_core.base import threads
    from gym_core.model.policy import load_policy
    from gym_core.plugin.startup import bootstrap, compose
    from gym_core.sampling.generation import Sampling, completion_masks, generate
    from gym_core.train.losses import completion_logprobs

    plan = threads.configure(args.threads)
    plugins = bootstrap()
    cfg = compose(["model=smollm2"])
    task = plugins.component("data", cfg.data.name).load()(cfg.data)
    torch.manual_seed(0)
    policy = load_policy(cfg.model, torch.device("cpu"))
    model, tok = policy.model, policy.tokenizer
    g, t_max = args.generations, args.max_new_tokens
    prompts = [ex["prompt"] for ex in task.train[: args.prompts]]
    from gym_core.data.tasks import render_prompts

    enc = tok(render_prompts(tok, prompts, None), return_tensors="pt", padding=True,
              add_special_tokens=False)
    p_ids, p_mask = enc.input_ids, enc.attention_mask
    rows = p_ids.shape[0] * g
    seeds = [s * 1009 + i for s in range(args.prompts) for i in range(g)]
    model.eval()

    def gym(fused, eos):
        def run():
            ids, _ = generate(model, p_ids, p_mask, num_samples=g, max_new_tokens=t_max,
                              eos_token_id=eos, pad_token_id=tok.pad_token_id,
                              sampling=Sampling(), row_seeds=seeds, fused=fused,
                              with_logprobs=True)
            return ids
        return run

    def hf(eos):
        def run():
            out = model.generate(input_ids=p_ids, attention_mask=p_mask, do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=t_max,
                                 num_return_sequences=g, pad_token_id=tok.pad_token_id,
                                 eos_token_id=eos)
            return out[:, p_ids.shape[1]:]
        return run

    never = -1  # an EOS id no token has: every row runs t_max steps
    impls = {
        ("ends at EOS", "gym sampler"): gym(None, tok.eos_token_id),
        ("ends at EOS", "gym, model's own forward"): gym(False, tok.eos_token_id),
        ("ends at EOS", "transformers generate"): hf(tok.eos_token_id),
        (f"{t_max} tokens", "gym sampler"): gym(None, never),
        (f"{t_max} tokens", "gym, model's own forward"): gym(False, never),
        (f"{t_max} tokens", "transformers generate"): hf(None),
    }
    peak = matmul_peak(plan.current)
    times = {k: [] for k in impls}
    tokens = {k: [] for k in impls}
    with torch.no_grad():
        for fn in impls.values():  # warm-up
            fn()
        for r in range(args.rounds):
            for k, fn in impls.items():
                t = time.perf_counter()
                ids = fn()
                times[k].append(time.perf_counter() - t)
                if k[0] == "ends at EOS":
                    mask, _ = completion_masks(ids, tok.eos_token_id)
                    tokens[k].append(int(mask.sum()))
                else:
                    tokens[k].append(ids.numel())
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    peak = max(peak, matmul_peak(plan.current))
    context = p_ids.shape[1] + t_max // 2
    step_flops = model_flops(model.config, rows, context)
    limit = rows / (step_flops / (peak * 1e9))  # tokens/s at the compute limit

    # the training pass on completions the sampler drew
    ids = gym(None, tok.eos_token_id)()
    c_mask, _ = completion_masks(ids, tok.eos_token_id)
    ids = ids.masked_fill(c_mask == 0, tok.pad_token_id)
    model.train()
    train_times = []
    for r in range(args.rounds + 1):
        t = time.perf_counter()
        logp = completion_logprobs(model, p_ids, p_mask, ids, c_mask)
        (logp * c_mask).sum().backward()
        model.zero_grad(set_to_none=True)
        if r:
            train_times.append(time.perf_counter() - t)
    train_flops = train_pass_flops(model.config, int(p_mask.sum()), int(ids.numel()))

    results = []
    print(f"Sampling: SmolLM2-135M-Instruct + LoRA r16, {args.prompts} prompts x G={g}, "
          f"<= {t_max} new tokens, fp32, {plan.current} threads; median of {args.rounds} "
          "rounds")
    print(f"fp32 matmul peak (2048^3): {peak:.1f} GFLOP/s; decode step at batch {rows}: "
          f"{step_flops / 1e9:.2f} GFLOP -> limit {limit:.0f} tokens/s")
    head = (f"{'run':<12} | {'implementation':<25} | {'s/call':>7} | {'tokens':>6} | "
            f"{'tok/s':>7} | {'of limit':>8} | {'vs generate':>11}")
    print(head)
    print("-" * len(head))
    for k in impls:
        sec = statistics.median(times[k])
        tps = statistics.median(n / s for n, s in zip(tokens[k], times[k]))
        ref = statistics.median(n / s for n, s in zip(tokens[(k[0], "transformers generate")],
                                                      times[(k[0], "transformers generate")]))
        results.append({"run": k[0], "impl": k[1], "sec": sec, "tokens": tokens[k][0],
                        "tokens_per_sec": tps, "of_limit": tps / limit, "vs_generate": tps / ref,
                        "secs": times[k]})
        print(f"{k[0]:<12} | {k[1]:<25} | {sec:>7.2f} | {tokens[k][0]:>6} | {tps:>7.1f} | "
              f"{tps / limit:>7.1%} | {tps / ref:>10.2f}x")
    sec = statistics.median(train_times)
    print(f"\nTraining pass (completion_logprobs forward + backward, {int(c_mask.sum())} "
          f"completion tokens of {ids.numel()} positions): {sec:.2f} s, "
          f"{train_flops / 1e9:.0f} GFLOP -> {train_flops / sec / 1e9:.1f} GFLOP/s, "
          f"{train_flops / sec / 1e9 / peak:.1%} of the matmul peak")
    if args.json:
        args.json.write_text(json.dumps({
            "threads": plan.current, "peak_gflops": peak, "step_gflop": step_flops / 1e9,
            "limit_tokens_per_sec": limit, "sampling": results,
            "train_pass": {"sec": sec, "gflop": train_flops / 1e9, "secs": train_times}},
            indent=2))


if __name__ == "__main__":
    main()
