"""One decode engine under the sampler and the server: the server's tokens are the
sampler's (greedy and seeded, base and variant); Qwen3 (per-head q/k norms) is in the
engine's table, decodes as its own forward does, serves and exports to GGUF; a model
outside the table samples and serves through its own forward (one fallback) with one
warning, left-padded prompts as each alone."""

from __future__ import annotations

import queue
import time

import pytest
import torch

from gym_core.model.policy import load_base, tiny_tokenizer
from gym_core.plugin.startup import bootstrap
from gym_core.sampling import fused
from gym_core.sampling.generation import Sampling, generate
from gym_core.serve.engine import Engine, Params, Request
from gym_core.serve.variants import Base, load_variant
from tests.serve_helpers import chat_ids, make_run, merged_model, model_cfg

PROMPTS = ["What is 2 + 3?", "Name a colour.", "Write one word about the sea, please."]


def served(engine, jobs):
    """(variant, prompt ids, params) jobs submitted at once -> their completions' tokens."""
    qs = []
    for variant, ids, params in jobs:
        q: queue.Queue = queue.Queue()
        engine.submit(Request(ids, variant, params,
                              lambda ev, q=q: q.put(ev) if ev.kind != "text" else None))
        qs.append(q)
    events = [q.get(timeout=300) for q in qs]
    assert all(ev.kind == "done" for ev in events), [ev.text for ev in events]
    return [ev.token_ids for ev in events]


def sampled(model, tok, ids, max_new, temperature=0.0, seed=0, fused_path=None):
    """The sampler's completion of one prompt, cut after EOS."""
    t = torch.tensor([ids])
    sampling = Sampling(do_sample=temperature > 0, temperature=max(temperature, 1e-5))
    out = generate(model, t, torch.ones_like(t), num_samples=1, max_new_tokens=max_new,
                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                   sampling=sampling, row_seeds=[seed] if temperature > 0 else None,
                   fused=fused_path)[0].tolist()
    return out[: out.index(tok.eos_token_id) + 1] if tok.eos_token_id in out else out


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    run = make_run(root, "bd", "bitdelta", 1)
    base, tok = load_base(model_cfg())
    variant = load_variant("bd", run, Base.of(base, model_cfg(), "tiny"), bootstrap())
    return base, tok, variant, merged_model(run)[0]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_the_server_samples_what_the_sampler_samples(llama, temperature):
    """Each request, served in a batch with others at other lengths, gets the sampler's
    tokens for its seed: on the base exactly the same arithmetic, on a variant the
    sampler's merged weights (W + D) against the server's W x + D x."""
    base, tok, variant, merged = llama
    engine = Engine(base, tok, max_rows=4)
    try:
        assert isinstance(engine.decoder, fused.FusedDecoder)
        # the base's q/k/v are views of the engine's stacked matrix: held once
        q = base.model.layers[0].self_attn.q_proj.weight
        assert q.untyped_storage().data_ptr() == \
            engine.decoder.layers[0].qkv.weight.untyped_storage().data_ptr()
        jobs = [(v, chat_ids(tok, p), Params(max_tokens=12, temperature=temperature, seed=7 + i))
                for i, (v, p) in enumerate([(v, p) for v in (None, variant) for p in PROMPTS])]
        got = served(engine, jobs)
        for _ in range(100):  # "done" is sent before the row leaves
            if engine.load()["running"] == 0:
                break
            time.sleep(0.05)
        assert engine.load()["kv_cache_bytes"] == 0  # every row left: the cache is freed
    finally:
        engine.stop()
    for (v, ids, params), tokens in zip(jobs, got):
        want = sampled(merged if v is not None else base, tok, ids, 12, temperature, params.seed)
        assert tokens == want, (v is not None, tok.decode(ids))


def test_the_fallback_serves_what_the_fallback_samples(llama, monkeypatch):
    """The one fallback (:class:`fused.OwnForward`, the model's own forward) under the
    server: base and variant rows in one batch, rows of equal-length prompts sharing a
    cache and leaving it at different steps, rows joining while others run, get the
    sampler's tokens on the same fallback (a variant through forward hooks: the merged
    model's tokens)."""
    base, tok, variant, merged = llama
    monkeypatch.setattr(fused.FusedDecoder, "build", classmethod(lambda cls, *a, **kw: None))
    engine = Engine(base, tok, max_rows=5)
    try:
        assert isinstance(engine.decoder, fused.OwnForward)
        jobs = [(v, chat_ids(tok, p), Params(max_tokens=m, temperature=t, seed=seed))
                for v in (None, variant)
                for p, t, seed, m in ((PROMPTS[0], 0.0, 0, 12), (PROMPTS[0], 0.8, 1, 12),
                                      (PROMPTS[0], 0.8, 2, 5), (PROMPTS[2], 0.8, 3, 9))]
        got = served(engine, jobs)
        for _ in range(100):  # "done" is sent before the row leaves
            if engine.load()["running"] == 0:
                break
            time.sleep(0.05)
        assert engine.load()["kv_cache_bytes"] == 0
    finally:
        engine.stop()
    assert not any(m._forward_hooks for m in base.modules())  # hooks only during a pass
    for (v, ids, params), tokens in zip(jobs, got):
        want = sampled(merged if v is not None else base, tok, ids, params.max_tokens,
                       params.temperature, params.seed, fused_path=False)
        assert tokens == want, (v is not None, params)
    assert got[:4] != got[4:]  # the variant changes what is said


# ----------------------------------------------------------------------------------------
# Qwen3
# ----------------------------------------------------------------------------------------


def tiny_qwen3(heads: int = 4, kv_heads: int = 2, head_dim: int = 32):
    """A random Qwen3 whose head size is not hidden_size / heads (Qwen3 sets it apart),
    tied embeddings, its norms away from 1 so that leaving one out shows."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = tiny_tokenizer()
    tok.padding_side = "left"  # as gym loads tokenizers: completions line up
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    torch.manual_seed(3)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight", "layernorm.weight")):
                p.uniform_(0.5, 1.5)
    return model, tok


@pytest.fixture(scope="module")
def qwen3():
    return tiny_qwen3()


def test_qwen3_decodes_in_the_engine_as_its_own_forward(qwen3):
    model, tok = qwen3
    assert fused.FusedDecoder.build(model, 64) is not None
    p = tok(PROMPTS, return_tensors="pt", padding=True)
    kw = dict(num_samples=3, max_new_tokens=20, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id, with_logprobs=True)
    for sampling, seeds in ((Sampling(do_sample=False), None),
                            (Sampling(temperature=0.7), list(range(9)))):
        own, lp = generate(model, p.input_ids, p.attention_mask, sampling=sampling,
                           row_seeds=seeds, fused=False, **kw)
        eng, lp_f = generate(model, p.input_ids, p.attention_mask, sampling=sampling,
                             row_seeds=seeds, fused=True, **kw)
        assert torch.equal(own, eng)
        torch.testing.assert_close(lp_f, lp, rtol=0, atol=1e-4)


def test_qwen3_serves_the_samplers_tokens(qwen3, tmp_path):
    """Base rows and LoRA rows (their deltas added per original layer of the stacked
    q/k/v and gate/up) in one batch get the sampler's tokens of the base and of the
    merged adapter."""
    import copy

    from peft import LoraConfig, PeftModel, get_peft_model

    from gym_core.config.schema import ALL_LINEAR

    model, tok = qwen3
    torch.manual_seed(4)
    adapted = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8,
                                                              target_modules=ALL_LINEAR))
    for n, p in adapted.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.3)
    adapted.save_pretrained(tmp_path / "lora")
    merged = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "lora") \
        .merge_and_unload().eval()
    variant = load_variant("q3", tmp_path / "lora", Base.of(model, model_cfg(), "qwen3"),
                           bootstrap())
    engine = Engine(copy.deepcopy(model), tok, max_rows=3)
    try:
        jobs = [(v, chat_ids(tok, p), Params(max_tokens=10, temperature=t, seed=5))
                for v in (None, variant) for p in PROMPTS for t in (0.0, 0.9)]
        got = served(engine, jobs)
    finally:
        engine.stop()
    outputs = set()
    for (v, ids, params), tokens in zip(jobs, got):
        want = sampled(merged if v is not None else model, tok, ids, 10, params.temperature,
                       params.seed)
        assert tokens == want, (v is not None, params.temperature)
        outputs.add(tuple(tokens))
    assert len(outputs) > len(PROMPTS) * 2  # the variant changes what is said


def test_qwen3_exports_to_gguf(qwen3, tmp_path):
    import gguf

    from gym_core.deltas.gguf_file import write_gguf

    model, tok = qwen3
    path = tmp_path / "qwen3.gguf"
    write_gguf(model, tok, path, "f32", name="tiny-qwen3")
    reader = gguf.GGUFReader(str(path))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "qwen3"
    assert field("qwen3.attention.key_length") == 32 and field("qwen3.block_count") == 2
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    state = model.state_dict()
    for i in range(2):
        att = f"model.layers.{i}.self_attn."
        # llama.cpp's names for Qwen3's per-head norms; Q and K rows kept in order (NEOX)
        for ours, theirs in (("q_norm.weight", "attn_q_norm"), ("k_norm.weight", "attn_k_norm"),
                             ("q_proj.weight", "attn_q"), ("k_proj.weight", "attn_k")):
            got = tensors[f"blk.{i}.{theirs}.weight"].reshape(state[att + ours].shape)
            assert torch.equal(got, state[att + ours]), theirs
    assert len(tensors) == 2 + 2 * 11  # embeddings, final norm; 11 per layer


def test_qwen3_gguf_reads_back_with_transformers(tmp_path):
    """transformers' GGUF loader gives the same logits (its Qwen3 mapping reads no
    key_length and keeps Qwen3Config's head size, 128, which every Qwen3 has)."""
    from transformers import AutoModelForCausalLM

    from gym_core.deltas.gguf_file import write_gguf

    model, tok = tiny_qwen3(heads=2, kv_heads=1, head_dim=128)
    write_gguf(model, tok, tmp_path / "q.gguf", "f32", name="tiny-qwen3")
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf",
                                                dtype=torch.float32).eval()
    ids = torch.tensor([chat_ids(tok, PROMPTS[2])])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_tiny_qwen3_trains_a_grpo_step_sampling_in_the_engine(tmp_path, tiny_overrides,
                                                              capsys, monkeypatch):
    """``model=tiny model.tiny.arch=qwen3`` is a Qwen3 (q/k norms) that trains, its
    rollouts decoded by the engine, never by the fallback."""
    from gym_core.train.job import run_job
    from tests.conftest import compose

    built = []
    build = fused.FusedDecoder.build.__func__
    monkeypatch.setattr(fused.FusedDecoder, "build", classmethod(
        lambda cls, model, *a, **kw: built.append(
            (getattr(model, "get_base_model", lambda: model)().config.model_type,
             build(cls, model, *a, **kw))) or
        built[-1][1]))
    monkeypatch.setattr(fused, "_warned", set())
    capsys.readouterr()
    summary = run_job(compose([*tiny_overrides, "model.tiny.arch=qwen3", "trainer.max_steps=1",
                               "trainer.eval_before=false"]), run_dir=tmp_path / "run")
    assert summary["steps"] == 1 and summary["model"] == "tiny-qwen3"
    assert built and all(kind == "qwen3" and d is not None for kind, d in built), built
    assert "its own Hugging Face forward" not in capsys.readouterr().err


# ----------------------------------------------------------------------------------------
# outside the table
# ----------------------------------------------------------------------------------------


def test_a_model_outside_the_table_samples_and_serves_on_its_own_forward(capsys, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2,
                                       n_positions=128, eos_token_id=tok.eos_token_id,
                                       bos_token_id=tok.eos_token_id)).eval()
    monkeypatch.setattr(fused, "_warned", set())
    capsys.readouterr()
    ids = chat_ids(tok, PROMPTS[0])[-40:]
    want = sampled(model, tok, ids, 8, fused_path=False)  # the model's own forward
    assert sampled(model, tok, ids, 8) == want
    engine = Engine(model, tok, max_rows=2, max_len=128)
    try:
        assert isinstance(engine.decoder, fused.OwnForward)
        got = served(engine, [(None, ids, Params(max_tokens=8, temperature=0)),
                              (None, ids[5:], Params(max_tokens=8, temperature=0))])
    finally:
        engine.stop()
    assert got[0] == want and got[1] == sampled(model, tok, ids[5:], 8, fused_path=False)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "gym: warning" in line]
    assert len(warnings) == 1 and "'gpt2'" in warnings[0], warnings


def test_the_fallback_samples_padded_prompts_as_each_alone():
    """Left padding changes nothing on the fallback, even for absolute positions (GPT-2):
    a row's positions count from its prompt's first token, and its log-probs are its own."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny_tokenizer()
    tok.padding_side = "left"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2,
                                       n_positions=128)).eval()
    kw = dict(num_samples=3, max_new_tokens=16, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id, sampling=Sampling(temperature=0.8),
              with_logprobs=True, fused=False)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    ids, lp = generate(model, enc.input_ids, enc.attention_mask, row_seeds=list(range(9)), **kw)
    for i, text in enumerate(PROMPTS):
        one = tok([text], return_tensors="pt")
        alone, lp_alone = generate(model, one.input_ids, one.attention_mask,
                                   row_seeds=list(range(3 * i, 3 * i + 3)), **kw)
        rows = slice(3 * i, 3 * i + 3)
        assert torch.equal(ids[rows, :alone.shape[1]], alone)
        torch.testing.assert_close(lp[rows, :alone.shape[1]], lp_alone, rtol=0, atol=1e-5)
