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
