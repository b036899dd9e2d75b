"""The serving engine in-process: rows of different variants batched together, joining
and leaving between steps, give each variant's merged model its exact greedy tokens."""

from __future__ import annotations

import queue

import pytest
import torch

from gym_core.deltas.delta import DenseOperator, RowGroups, read_delta
from gym_core.model.policy import load_base
from gym_core.plugin.startup import bootstrap
from gym_core.serve.engine import Engine, Params, Request
from gym_core.serve.variants import Base, LoraOperator, load_variant
from tests.serve_helpers import chat_ids, greedy, make_run, merged_model, model_cfg

PROMPTS = ["hi", "What is 2 + 3?", "Tell me about the sea and the sky, at length please."]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    runs = {"bd": make_run(root, "bd", "bitdelta", 1), "dq": make_run(root, "dq", "deltaquant", 2),
            "lora": make_run(root, "lora", "lora", 3), "bd2": make_run(root, "bd2", "bitdelta", 4),
            # a full-precision delta, as soups write them
            "soup": make_run(root, "soup", "none", 5)}
    base, tok = load_base(model_cfg())
    info = Base.of(base, model_cfg(), "tiny")
    variants = {n: load_variant(n, p, info, bootstrap()) for n, p in runs.items()}
    merged = {n: merged_model(p)[0] for n, p in runs.items()}
    merged[None] = load_base(model_cfg())[0]
    return base, tok, variants, merged


def run(engine, jobs):
    """Submit (variant, prompt ids, params) jobs at once; their "done" events."""
    done = []
    for variant, ids, params in jobs:
        q: queue.Queue = queue.Queue()
        engine.submit(Request(ids, variant, params,
                              lambda ev, q=q: q.put(ev) if ev.kind != "text" else None))
        done.append(q)
    return [q.get(timeout=300) for q in done]


def test_mixed_batches_joining_and_leaving_give_exact_tokens(setup):
    base, tok, variants, merged = setup
    engine = Engine(base, tok, max_rows=3)  # 18 requests through 3 slots: joins and leaves
    try:
        jobs = []
        for i, name in enumerate([None, "bd", "dq", "lora", "bd2", "soup"] * 3):
            ids = chat_ids(tok, PROMPTS[i % 3])
            jobs.append((name, ids, 4 + 3 * (i % 4)))
        events = run(engine, [(variants.get(n), ids, Params(max_tokens=m, temperature=0))
                              for n, ids, m in jobs])
        for (name, ids, m), ev in zip(jobs, events):
            assert ev.kind == "done", ev.text
            assert ev.token_ids == greedy(merged[name], tok, ids, m), name
        assert engine.load()["max_running"] == 3 and engine.load()["kv_cache_bytes"] == 0
    finally:
        engine.stop()


def test_a_sampled_row_does_not_depend_on_its_batch(setup):
    base, tok, variants, _ = setup
    engine = Engine(base, tok, max_rows=8)
    try:
        params = Params(max_tokens=10, temperature=0.9, top_p=0.9, seed=11)
        ids = chat_ids(tok, PROMPTS[1])
        (alone,) = run(engine, [(variants["bd"], ids, params)])
        crowd = run(engine, [(variants["lora"], chat_ids(tok, PROMPTS[2]), params),
                             (variants["bd"], ids, params), (None, ids, params)])
        assert crowd[1].token_ids == alone.token_ids
        assert crowd[0].token_ids != alone.token_ids
    finally:
        engine.stop()


def test_operators_of_every_kind_agree_with_their_dense_delta(setup):
    base, tok, variants, _ = setup
    x = torch.randn(5, 64)
    for name, variant in variants.items():
        op = variant.ops["model.layers.0.self_attn.q_proj"]
        if name == "lora":
            assert isinstance(op, LoraOperator)
            dense = op.bt.t() @ op.a * op.scaling
        else:
            dense = read_delta(variant.source, bootstrap())["model.layers.0.self_attn.q_proj.weight"]
        y = torch.zeros(5, op.out_features)
        type(op).add_to(x, y, RowGroups.single(5), [op])
        assert torch.allclose(y, x @ dense.T, atol=1e-4), name
        assert torch.allclose(op.apply(x), x @ dense.T, atol=1e-4), name
    assert DenseOperator(torch.eye(3)).nbytes == 36


def test_variant_memory_is_its_packed_size(setup):
    _, _, variants, _ = setup
    from gym_core.deltas.delta import load_packed

    packed = load_packed(variants["bd"].source)
    assert variants["bd"].nbytes == packed.nbytes  # signs + scales, nothing unpacked


SYSTEM = "You answer in one short line. Think about the sum, then give it."


def test_prompts_that_begin_alike_run_their_start_once_and_give_exact_tokens(setup):
    """Automatic prefix caching: prompts joining together that share a start (same
    variant) have it computed once and kept; later prompts that begin with it copy its
    keys and values. Each variant keeps its own prefixes, and every answer is still its
    merged model's greedy one."""
    base, tok, variants, merged = setup

    def ids(question):
        return tok(tok.apply_chat_template(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
            tokenize=False, add_generation_prompt=True), add_special_tokens=False).input_ids

    questions = [f"What is {a} + {b}?" for a, b in [(2, 3), (10, 7), (4, 4), (30, 12), (9, 1),
                                                    (5, 6), (7, 7), (8, 2)]]
    jobs = [(name, ids(q), 3 + 2 * (i % 3)) for i, q in enumerate(questions)
            for name in (None, "lora")]
    engine = Engine(base, tok, max_rows=4)  # 16 requests through 4 rows: later ones join alone
    try:
        events = run(engine, [(variants.get(n), x, Params(max_tokens=m, temperature=0))
                              for n, x, m in jobs])
        for (name, x, m), ev in zip(jobs, events):
            assert ev.kind == "done", ev.text
            assert ev.token_ids == greedy(merged[name], tok, x, m), name
        load = engine.load()
        prefixes = list(engine.decoder.prefixes.values())
    finally:
        engine.stop()
    first, second = ids(questions[0]), ids(questions[1])
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert tok.decode(first[:shared]).endswith("What is ")  # the system prompt and that
    assert {p.of(None) for p in prefixes} == {True, False}  # one for the base, one for lora
    assert all(p.length >= shared for p in prefixes)
    assert load["prefix_hits"] >= 12, load  # all but the first join's prompts at least
    assert load["prefix_tokens_reused"] >= 12 * shared
    assert 0 < load["prefix_cache_bytes"] == sum(p.nbytes for p in prefixes)

    off = Engine(base, tok, max_rows=4, prefix_cache_bytes=0)
    try:
        again = run(off, [(variants.get(n), x, Params(max_tokens=m, temperature=0))
                          for n, x, m in jobs])
        assert off.load()["prefix_hits"] == 0 and off.load()["prefix_cache_bytes"] == 0
    finally:
        off.stop()
    assert [e.token_ids for e in again] == [e.token_ids for e in events]


def test_the_prefix_cache_keeps_to_its_budget_and_forgets_removed_variants(setup, tmp_path):
    import gc

    from gym_core.sampling.fused import build_decoder

    base, tok, variants, merged = setup
    starts = [list(range(40 + i, 80 + i)) for i in range(3)]  # three unrelated starts
    decoder = build_decoder(base, 256)
    decoder.open_rows(16, 256, prefix_cache_bytes=1)
    decoder.join([starts[0] + [5], starts[0] + [6]], [None, None])
    assert decoder.prefixes == {} and decoder.prefix_bytes == 0  # larger than the budget
    decoder.release()

    decoder.open_rows(16, 256, prefix_cache_bytes=2**30)
    decoder.join([starts[0] + [5], starts[0] + [6]], [None, None])
    one = decoder.prefix_bytes
    decoder.open_rows(16, 256, prefix_cache_bytes=2 * one)  # room for two
    for s in starts:
        decoder.join([s + [5], s + [6]], [None, None])
    assert [p.tokens[0] for p in decoder.prefixes.values()] == [41, 42]  # the oldest went
    assert decoder.prefix_bytes == 2 * one
    # a reused prefix becomes the most recent: the next new one pushes the other out
    decoder.join([starts[1] + [7]], [None])
    decoder.join([starts[0] + [5], starts[0] + [6]], [None, None])
    assert [p.tokens[0] for p in decoder.prefixes.values()] == [41, 40]
    decoder.release()

    info = Base.of(base, model_cfg(), "tiny")
    fresh = load_variant("fresh", make_run(tmp_path, "fresh", "bitdelta", 7), info, bootstrap())
    decoder.open_rows(16, 256, prefix_cache_bytes=2**30)
    decoder.join([starts[2] + [5], starts[2] + [6]], [fresh, fresh])
    assert [p.of(fresh) for p in decoder.prefixes.values()] == [True]
    decoder.release()
    decoder.deltas.forget()  # as the engine does when idle
    del fresh
    gc.collect()
    decoder.join([starts[2] + [5]], [None])  # the removed variant's prefix is dropped
    assert decoder.prefixes == {}


def test_a_prompt_shares_its_start_with_an_earlier_one(setup):
    """Requests one at a time (a chat's system prompt): the second finds its start in an
    earlier prompt and keeps it, the third copies it; answers stay exact."""
    base, tok, variants, merged = setup
    engine = Engine(base, tok, max_rows=1)
    try:
        for i, q in enumerate(["What is 2 + 3?", "Name a sea.", "Count to 4."]):
            x = tok(tok.apply_chat_template(
                [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
                tokenize=False, add_generation_prompt=True), add_special_tokens=False).input_ids
            ev, = run(engine, [(None, x, Params(max_tokens=5, temperature=0))])
            assert ev.token_ids == greedy(merged[None], tok, x, 5)
            assert engine.load()["prefix_hits"] == i  # none for the first, then one each
    finally:
        engine.stop()
    assert len(engine.decoder.prefixes) == 1


@pytest.mark.parametrize("fused", [True, False])
def test_a_chunk_extends_rows_as_a_full_forward_reads_them(setup, fused):
    """extend (the multi-turn sampler's environment replies): chunks appended to rows of
    different lengths in one pass, between decode steps, give every row the logits the
    model's own forward gives over its whole sequence; on the engine and on the model's
    own forward (the fallback)."""
    import random

    from gym_core.sampling.fused import build_decoder

    base, tok, variants, merged = setup
    rng = random.Random(0)

    def ids(n):
        return [rng.randrange(100, 200) for _ in range(n)]

    prompts = [ids(20), ids(12)]
    seqs = [list(prompts[0]), list(prompts[0]), list(prompts[1]), list(prompts[1])]
    decoder = build_decoder(base, 256, fused=fused)
    decoder.open_rows(4, 256)
    decoder.join(prompts, [None, None], copies=2)

    def step():
        tokens = ids(4)
        for s, t in zip(seqs, tokens):
            s.append(t)
        return decoder.advance(torch.tensor(tokens), [None] * 4)

    def extend(rows, sizes):
        chunks = [ids(n) for n in sizes]
        for r, c in zip(rows, chunks):
            seqs[r].extend(c)
        decoder.extend(rows, chunks)

    for _ in range(3):
        step()
    extend([1], [30])
    step()
    extend([0, 2], [41, 1])
    step()
    extend([3, 1], [7, 20])
    logits = step()
    with torch.no_grad():
        for r, s in enumerate(seqs):
            want = base(torch.tensor([s])).logits[0, -1]
            assert torch.allclose(logits[r], want, atol=1e-4), r


def test_a_join_is_one_pass_whatever_prefixes_its_prompts_have(setup):
    """Prompts of four variants, each beginning like an earlier prompt of its own
    variant: their four new prefixes are computed in one pass and the prompts in one
    more; the next four, each with its own kept prefix, in one pass. The logits are those
    of a decoder without the cache."""
    from gym_core.sampling.fused import build_decoder

    base, tok, variants, merged = setup
    names = ["bd", "dq", "lora", "bd2"]
    start = list(range(50, 90))

    def run(budget, rounds):
        decoder = build_decoder(base, 256)
        decoder.open_rows(16, 256, prefix_cache_bytes=budget)
        calls, real = [0], decoder._prompts

        def counted(*a, **k):
            calls[0] += 1
            return real(*a, **k)

        decoder._prompts = counted
        out = []
        for r in range(rounds):
            calls[0] = 0
            logits = decoder.join([start + [5 + r, 6 + i] for i in range(4)],
                                  [variants[n] for n in names])
            out.append((calls[0], logits))
        return out, decoder

    cached, decoder = run(2**30, 3)
    plain, _ = run(0, 3)
    assert [c for c, _ in cached] == [1, 2, 1]  # none kept yet; four kept; four reused
    assert len(decoder.prefixes) == 4 and decoder.prefix_stats["prefix_hits"] == 8
    for (_, a), (_, b) in zip(cached, plain):
        assert torch.allclose(a, b, atol=1e-4)
