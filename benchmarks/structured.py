"""The cost of constrained decoding per token (gym_core/sampling/structured.py,
docs/algorithms.md §8.5): llguidance's mask for one row, the mask applied to the logits,
and the whole sampler with and without the constraint, on a model's vocabulary.

1. mask: a matcher of the library-operations schema walks a valid reply token by token;
   each step times computing the row's bitmask (``fill_next_token_bitmask``) and
   unpacking it onto a [1, V] logits row.
2. sampler: ``sample`` on ``--rows`` chat prompts, ``--tokens`` new tokens, greedy, with
   and without ``logits_mask`` (the constrained rows stop when their JSON is complete,
   so the time is divided by the tokens actually generated).

    python benchmarks/structured.py                       # SmolLM2-135M-Instruct
    python benchmarks/structured.py --model tiny --rounds 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from gym_core.base.threads import prepare_environment

prepare_environment()  # as gym's entry point does, before torch loads OpenMP


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 or tiny")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    import torch

    from gym_cl_grpo import prompts
    from gym_cl_grpo.experience import Experience, labels
    from gym_core.model.policy import load_policy
    from gym_core.plugin.startup import compose
    from gym_core.sampling import structured
    from gym_core.sampling.generation import Sampling, sample

    cfg = compose([f"model={args.model}"])
    policy = load_policy(cfg.model, torch.device("cpu"))
    tok = policy.tokenizer
    vocab = policy.model.get_output_embeddings().weight.shape[0]
    shown = labels([Experience(i, f"When case {i} holds, check it twice.") for i in range(8)])
    schema = prompts.operations_schema(shown, 3)
    grammar = structured.grammar(schema)
    reply = json.dumps({"operations": [
        {"operation": "ADD", "id": None, "content": "When a sum exceeds nine, carry the one."},
        {"operation": "UPDATE", "id": "G3", "content": "When units differ, convert first."},
        {"operation": "DELETE", "id": "G5", "content": None}]}, separators=(",", ":"))
    ids = tok(reply, add_special_tokens=False).input_ids

    t0 = time.perf_counter()
    structured.ll_tokenizer(tok, vocab)
    tokenizer_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    structured.grammar(schema)
    compile_s = time.perf_counter() - t0

    mask_us = []
    for _ in range(args.rounds):
        m = structured.new_matcher(tok, grammar, vocab)
        logits = torch.zeros(1, vocab)
        t0 = time.perf_counter()
        for t in ids:
            structured.mask_logits([m], logits, tok.eos_token_id)
            structured.consume(m, t, tok.eos_token_id)
        mask_us.append((time.perf_counter() - t0) / len(ids) * 1e6)
        if m.is_error():
            raise SystemExit(f"the reply does not follow the schema: {m.get_error()}")

    convs = [[{"role": "user", "content": f"Update the library, case {i}."}]
             for i in range(args.rows)]
    free_us, constrained_us = [], []
    for _ in range(args.rounds):
        for out, mask in ((free_us, None), (constrained_us, True)):
            kw = {"logits_mask": structured.json_masks(tok, schema, len(convs))} if mask else {}
            t0 = time.perf_counter()
            got = sample(policy.model, tok, convs, system_prompt=None,
                         max_new_tokens=args.tokens, sampling=Sampling(do_sample=False), **kw)
            n = int(got.completion_mask.sum())
            out.append((time.perf_counter() - t0) / n * 1e6)

    result = {
        "model": args.model, "vocab": vocab, "reply_tokens": len(ids), "rows": args.rows,
        "tokenizer_build_s": round(tokenizer_s, 3), "schema_compile_s": round(compile_s, 4),
        "mask_us_per_token": round(statistics.median(mask_us), 1),
        "sampler_us_per_token_free": round(statistics.median(free_us), 1),
        "sampler_us_per_token_constrained": round(statistics.median(constrained_us), 1),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
