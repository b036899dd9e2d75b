"""gym_core/sampling/decode.cpp computes what its torch reference (gym_core.sampling.fused.TorchOps)
computes, and the inverse-CDF sampler draws from the right distribution."""

from __future__ import annotations

import pytest
import torch

from gym_core.sampling import fused
from gym_core.sampling.fused import TorchOps, kernels


@pytest.fixture(scope="module")
def ops():
    k = kernels()
    if k is TorchOps:
        pytest.fail("gym's decode kernels did not compile on this machine")
    return k


def attend_inputs(b, g, kv, rep, d, plen, width, slot, seed=0, norms=False):
    """Rows at different lengths (the server's): row 0 at ``slot``, the others at or
    before it."""
    gen = torch.Generator().manual_seed(seed)
    heads, n = kv * rep, b * g
    qkv = torch.randn(n, (heads + 2 * kv) * d, generator=gen)
    prompt_keys = torch.randn(b, kv, d, fused._padded(plen), generator=gen)
    prompt_values = torch.randn(b, kv, plen, d, generator=gen)
    bias = torch.zeros(b, plen)
    bias[0, : plen // 3] = float("-inf")  # left padding of a shorter prompt
    if b > 1:
        bias[1, :1] = float("-inf")
    group = torch.arange(b).repeat_interleave(g)
    group = group[torch.randperm(n, generator=gen)]  # rows after compaction: any order
    keys = torch.randn(n, kv, d, fused._padded(width), generator=gen)
    values = torch.randn(n, kv, fused._padded(width), d, generator=gen)
    slots = torch.randint(0, slot + 1, (n,), generator=gen)
    slots[0] = slot
    angle = torch.rand(plen + width, d, generator=gen) * 3
    q_norm, k_norm = (torch.rand(d, generator=gen) + 0.5, torch.rand(d, generator=gen) + 0.5) \
        if norms else (None, None)
    return [qkv, prompt_keys, prompt_values, bias, group, keys, values, slots, slots + plen,
            angle.cos(), angle.sin(), heads, d ** -0.5, q_norm, k_norm, 1e-6]


@pytest.mark.parametrize("kv,rep,d,plen,slot,norms", [
    (3, 3, 64, 70, 20, False),  # SmolLM2's shape
    (1, 1, 16, 5, 0, False),  # first decode step, one head
    (2, 4, 24, 33, 31, False),  # head size not a whole vector, the cache's last slot
    (1, 10, 32, 17, 3, False),  # more query heads per group than the unrolled kernels
    (2, 2, 32, 9, 12, True),  # Qwen3: q and k normalized per head before rotary
    (2, 2, 32, 0, 12, True),  # the server's rows: no shared prompt, each its own
])
def test_attend_matches_torch(ops, kv, rep, d, plen, slot, norms):
    args = attend_inputs(3, 4, kv, rep, d, plen, 32, slot, norms=norms)
    if plen == 0:
        args[1], args[2], args[3] = args[1][:1], args[2][:1], args[3][:1]
        args[4] = torch.zeros_like(args[4])
    ref = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    out = ops.attend(*args)
    expected = TorchOps.attend(*ref)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # the new key (rotated) and value were written into the rows' own cache at their slots
    torch.testing.assert_close(args[5], ref[5], rtol=0, atol=1e-5)
    assert torch.equal(args[6], ref[6])


def test_attend_ignores_what_padding_and_other_prompts_hold(ops):
    """Keys under a prompt's padding, other prompts' caches and the rows' positions after
    their slots do not change a row's output."""
    args = attend_inputs(2, 2, 3, 3, 64, 40, 16, 5)
    args[7][:] = 5
    args[8] = args[7] + 40
    base = ops.attend(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
    noisy = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    noisy[1][0, ..., : 40 // 3] += 100.0  # prompt 0's padding
    noisy[2][0, :, : 40 // 3] += 100.0
    noisy[5][..., 6:] = 1e4  # positions after slot 5
    noisy[6][:, :, 6:] = 1e4
    torch.testing.assert_close(ops.attend(*noisy), base, rtol=0, atol=0)


def test_rms_norm_adds_the_residual_in_place(ops):
    x = torch.randn(5, 96)
    delta, w = torch.randn(5, 96), torch.randn(96)
    x_ref = x.clone()
    y = ops.rms_norm(x, delta, w, 1e-5)
    y_ref = TorchOps.rms_norm(x_ref, delta, w, 1e-5)
    torch.testing.assert_close(x, x_ref, rtol=0, atol=0)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    by_hand = w * x / (x.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(y, by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.rms_norm(x, None, w, 1e-5), y, rtol=0, atol=0)


def test_silu_mul(ops):
    gu = torch.randn(7, 2 * 40) * 4
    torch.testing.assert_close(ops.silu_mul(gu), TorchOps.silu_mul(gu), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_draw_is_the_inverse_cdf_with_the_trainers_logprob(ops, temperature):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 1000, generator=gen) * 4
    logits[logits < -2] = float("-inf")  # top-k / top-p filtered tokens
    u = torch.rand(64, generator=gen, dtype=torch.float64)
    u[0], u[1] = 0.0, 1 - 2**-53  # the ends of [0, 1)
    picks, logp = ops.draw(logits, u, temperature)
    ref_picks, ref_logp = TorchOps.draw(logits, u, temperature)
    probs = torch.softmax(logits.double() / temperature, -1)
    assert (probs.gather(1, picks[:, None]) > 0).all()  # never a filtered token
    cdf = probs.cumsum(-1)
    lo = torch.where(picks > 0, cdf.gather(1, (picks - 1).clamp(min=0)[:, None]).squeeze(1), 0.0)
    hi = cdf.gather(1, picks[:, None]).squeeze(1)
    # the first token whose cumulative mass exceeds u (up to float64 rounding of the sums)
    assert ((lo <= u + 1e-9) & (u <= hi + 1e-9)).all()
    assert picks[0] == (probs[0] > 0).int().argmax() and picks[1] == 999 - (probs[1] > 0).flip(0).int().argmax()
    assert torch.equal(picks, ref_picks)
    expected = torch.log_softmax(logits / temperature, -1).gather(1, picks[:, None]).squeeze(1)
    torch.testing.assert_close(logp, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(ref_logp, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("impl", ["kernel", "torch"])
def test_sampled_frequencies_follow_the_distribution(ops, impl):
    p = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05])
    n = 40_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    picks, _ = (ops if impl == "kernel" else TorchOps).draw(p.log().expand(n, 5).contiguous(), u, 1.0)
    freq = torch.bincount(picks, minlength=5).double() / n
    assert freq[1] == 0
    # 5 standard errors of a binomial proportion
    tol = 5 * (p.double() * (1 - p.double()) / n).sqrt() + 1e-12
    assert ((freq - p.double()).abs() <= tol).all(), freq


def test_logits_that_overflowed_still_give_a_token(ops):
    """Weights blown up by a huge learning rate give NaN or infinite logits; the draw
    returns argmax's token (a NaN first) and a NaN log-prob, so the step reaches the loss,
    which reports the NaN in one line (tests/reliability)."""
    logits = torch.randn(3, 50)
    logits[0, 7] = float("nan")
    logits[1, 11] = float("inf")
    logits[2] = float("-inf")
    u = torch.full((3,), 0.5, dtype=torch.float64)
    for impl in (ops, TorchOps):
        picks, logp = impl.draw(logits, u, 1.0)
        assert picks.tolist() == [7, 11, 0]
        assert logp.isnan().all()


def test_a_machine_that_cannot_compile_samples_with_torch(monkeypatch, capsys):
    from gym_core.base import native
    from gym_core.base.errors import GymError

    def refuse(*args, **kwargs):
        raise GymError("compiling gym's gym_decode kernel needs g++")

    monkeypatch.setattr(native, "load_ops", refuse)
    fused.kernels.cache_clear()
    try:
        assert fused.kernels() is TorchOps
        assert "without gym's decode kernels" in capsys.readouterr().err
    finally:
        fused.kernels.cache_clear()
