"""Shared-prompt generation and log-probs equal their plain counterparts."""

from __future__ import annotations

import pytest
import torch

from gym_core.sampling.generation import Sampling, completion_masks, generate, warp_logits
from gym_core.train.losses import completion_logprobs, selective_log_softmax
from tests.conftest import tiny_lora_policy


@pytest.fixture(scope="module")
def policy():
    return tiny_lora_policy()


def prompts(policy, texts):
    enc = policy.tokenizer(texts, return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def test_shared_prompt_logprobs_equal_full_forward_with_gradients(policy):
    model = policy.model
    p_ids, p_mask = prompts(policy, ["What is 2 + 3?", "Hi"])  # different lengths: left pad
    g = 3
    gen = torch.Generator().manual_seed(0)
    c_ids = torch.randint(0, 250, (2 * g, 5), generator=gen)
    c_mask = torch.ones_like(c_ids)
    c_mask[1, 3:] = 0  # a completion that ended early

    shared = completion_logprobs(model, p_ids, p_mask, c_ids, c_mask)
    grads_shared = torch.autograd.grad((shared * c_mask).sum(), policy.trainable_parameters())

    full_ids = torch.cat([p_ids.repeat_interleave(g, 0), c_ids], 1)
    full_mask = torch.cat([p_mask.repeat_interleave(g, 0), c_mask], 1)
    logits = model(input_ids=full_ids, attention_mask=full_mask).logits[:, -6:-1]
    plain = selective_log_softmax(logits.float(), c_ids)
    grads_plain = torch.autograd.grad((plain * c_mask).sum(), policy.trainable_parameters())

    torch.testing.assert_close(shared * c_mask, plain * c_mask, rtol=1e-4, atol=1e-5)
    assert (shared[c_mask == 0] == 0).all()  # only the completion's tokens are scored
    for a, b in zip(grads_shared, grads_plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_sampled_groups_are_contiguous_and_stop_at_eos(policy):
    model, tok = policy.model, policy.tokenizer
    p_ids, p_mask = prompts(policy, ["a", "b"])
    torch.manual_seed(0)
    out = generate(model, p_ids, p_mask, num_samples=4, max_new_tokens=6,
                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                   sampling=Sampling(temperature=1.0))
    assert out.shape[0] == 8 and out.shape[1] <= 6
    for row in out.tolist():
        if tok.eos_token_id in row:
            after = row[row.index(tok.eos_token_id) + 1 :]
            assert all(t == tok.pad_token_id for t in after)


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    k2 = warp_logits(logits, Sampling(top_k=2)).softmax(-1)
    assert k2.tolist()[0] == pytest.approx([0.5 / 0.8, 0.3 / 0.8, 0, 0])
    # top_p 0.7: 0.5 alone is < 0.7, so 0.3 is kept too; 0.15 is dropped (0.8 covers it)
    p = warp_logits(logits, Sampling(top_p=0.7)).softmax(-1)
    assert p.tolist()[0] == pytest.approx([0.5 / 0.8, 0.3 / 0.8, 0, 0])
    t = warp_logits(logits, Sampling(temperature=0.5)).softmax(-1)
    expected = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 2
    assert t.tolist()[0] == pytest.approx((expected / expected.sum()).tolist())


def test_detached_completions_share_the_prompt_and_leave_gradients_intact(policy):
    model = policy.model
    p_ids, p_mask = prompts(policy, ["What is 2 + 3?", "Hi"])
    gen = torch.Generator().manual_seed(1)
    c_ids, d_ids = (torch.randint(0, 250, (2, 4), generator=gen) for _ in range(2))
    ones = torch.ones_like(c_ids)
    plain = completion_logprobs(model, p_ids, p_mask, c_ids, ones)
    g_plain = torch.autograd.grad(plain.sum(), policy.trainable_parameters())
    own, other = completion_logprobs(model, p_ids, p_mask, c_ids, ones, detached=(d_ids, ones))
    g_own = torch.autograd.grad(own.sum(), policy.trainable_parameters())
    assert not other.requires_grad
    torch.testing.assert_close(other, completion_logprobs(model, p_ids, p_mask, d_ids, ones).detach())
    for a, b in zip(g_plain, g_own):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_decoding_samples_what_the_models_own_forward_samples(arch, monkeypatch):
    """The fused decode step (LoRA merged, packed weights, preallocated cache, finished
    rows leaving the batch) draws the same tokens as the model's own forward for the
    same row seeds, and its log-probs agree to float32 rounding."""
    from gym_core.sampling.fused import FusedDecoder

    policy = tiny_lora_policy(arch)
    model, tok = policy.model, policy.tokenizer
    assert FusedDecoder.build(model, 64) is not None
    p_ids, p_mask = prompts(policy, ["What is 2 + 3?", "Hello there, how are", "x"])
    seeds = list(range(300, 324))
    kw = dict(num_samples=8, max_new_tokens=100, pad_token_id=tok.pad_token_id,
              sampling=Sampling(temperature=0.3), row_seeds=seeds, with_logprobs=True)
    eos = tok.eos_token_id
    kept = []
    monkeypatch.setattr(FusedDecoder, "keep_rows",
                        lambda self, index, f=FusedDecoder.keep_rows: kept.append(len(index))
                        or f(self, index))
    ids, lp = generate(model, p_ids, p_mask, eos_token_id=eos, fused=False, **kw)
    ids_f, lp_f = generate(model, p_ids, p_mask, eos_token_id=eos, fused=True, **kw)
    ended = (ids == eos).any(1)
    assert 0 < ended.sum() < len(ended)
    if arch == "llama":  # (seeded: 12 of the 24 rows end, so the batch shrinks once)
        assert kept, "no finished rows left the batch"
    assert torch.equal(ids, ids_f)
    torch.testing.assert_close(lp_f, lp, rtol=0, atol=1e-4)
    # padding after EOS and zero log-probs there, on both paths
    mask, _ = completion_masks(ids_f, eos)
    assert (ids_f[mask == 0] == tok.pad_token_id).all() and (lp_f[mask == 0] == 0).all()


def test_sampler_logprobs_are_the_trainers_logprobs(policy):
    """What the sampler records for each drawn token is what the training pass computes
    for it (the mismatch the importance-sampling correction sees is rounding only)."""
    model, tok = policy.model, policy.tokenizer
    p_ids, p_mask = prompts(policy, ["What is 2 + 3?", "Hi"])
    ids, lp = generate(model, p_ids, p_mask, num_samples=4, max_new_tokens=10,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       sampling=Sampling(), row_seeds=list(range(8)), with_logprobs=True)
    mask, _ = completion_masks(ids, tok.eos_token_id)
    with torch.no_grad():
        trainer = completion_logprobs(model, p_ids, p_mask, ids, mask)
    torch.testing.assert_close(lp * mask, trainer * mask, rtol=0, atol=1e-4)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_generation_matches_transformers_generate(arch, fused):
    policy = tiny_lora_policy(arch)
    model, tok = policy.model, policy.tokenizer
    p_ids, p_mask = prompts(policy, ["What is 2 + 3?", "Hello there, how are"])
    ours = generate(model, p_ids, p_mask, num_samples=1, max_new_tokens=12, fused=fused,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                    sampling=Sampling(do_sample=False))
    ref = model.generate(input_ids=p_ids, attention_mask=p_mask, do_sample=False,
                         max_new_tokens=12, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)[:, p_ids.shape[1]:]
    assert torch.equal(ours, ref[:, : ours.shape[1]])


def test_logprobs_are_of_the_tempered_distribution(policy):
    """Online methods score what they sampled from: softmax(logits / T), for the policy
    and the reference alike (docs/algorithms.md §0.2)."""
    from gym_core.sampling.rollout import Rollout

    p_ids, p_mask = prompts(policy, ["What is 2 + 3?"])
    c_ids = torch.tensor([[50, 51, 52], [60, 61, 62]])
    batch = Rollout(prompt_ids=p_ids, prompt_mask=p_mask, completion_ids=c_ids,
                    completion_mask=torch.ones_like(c_ids), truncated=torch.zeros(2, dtype=torch.bool),
                    rewards=torch.zeros(2), group_size=2, examples=[{}, {}], completions=["", ""])
    full = torch.cat([p_ids.repeat(2, 1), c_ids], 1)
    mask = torch.cat([p_mask.repeat(2, 1), torch.ones_like(c_ids)], 1)
    logits = policy.model(input_ids=full, attention_mask=mask).logits[:, -4:-1].float()
    with policy.model.disable_adapter():
        ref_logits = policy.model(input_ids=full, attention_mask=mask).logits[:, -4:-1].float()
    try:
        policy.temperature = 0.7
        tempered = policy.logprobs(batch)
        ref = policy.logprobs(batch, reference=True)
    finally:
        policy.temperature = 1.0
    torch.testing.assert_close(tempered, selective_log_softmax(logits / 0.7, c_ids),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ref, selective_log_softmax(ref_logits / 0.7, c_ids),
                               rtol=1e-4, atol=1e-5)
    assert not torch.allclose(tempered, policy.logprobs(batch), atol=1e-3)


def test_hidden_states_are_the_lm_heads_inputs_with_left_padded_prompts(policy):
    """hidden=True returns, for each completion token, the final hidden state that the LM
    head turned into its logits (the prompt's last position for the first token)."""
    p_ids, p_mask = prompts(policy, ["What is 2 + 3?", "Hi"])
    c_ids = torch.randint(0, 250, (4, 4), generator=torch.Generator().manual_seed(1))
    c_mask = torch.ones_like(c_ids)
    logp, hidden = completion_logprobs(policy.model, p_ids, p_mask, c_ids, c_mask, hidden=True)
    head = policy.model.get_output_embeddings()
    rebuilt = selective_log_softmax(head(hidden).float(), c_ids)
    torch.testing.assert_close(logp, rebuilt, rtol=1e-5, atol=1e-5)
    assert hidden.shape == (4, 4, policy.model.config.hidden_size)
