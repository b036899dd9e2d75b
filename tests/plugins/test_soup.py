"""DeltaSoup: robust rules against a poisoned contributor, merging rules by hand, DP noise
and clipping, the Hydra app, and a soup of three runs' deltas applied to the base."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from gym_core.base.errors import GymError
from gym_core.deltas.aggregate import dp_epsilon, make_soup
from gym_core.deltas.delta import FullPrecision, apply_delta, read_delta, save_packed
from gym_core.plugin.startup import bootstrap
from gym_soup import RULES

KEYS = {"model.layers.0.self_attn.q_proj.weight": (16, 32), "model.norm.weight": (32,)}


def soup_cfg(name, inputs, **kw):
    return OmegaConf.structured(RULES[name](inputs=[str(p) for p in inputs], seed=0, **kw))


def write_delta(path, flat):
    delta, offset = {}, 0
    for key in sorted(KEYS):
        n = math.prod(KEYS[key])
        delta[key] = flat[offset: offset + n].view(KEYS[key]).clone()
        offset += n
    save_packed(FullPrecision(None).quantize(delta), path)
    return path


def flat_of(path):
    d = read_delta(path, bootstrap())
    return torch.cat([d[k].reshape(-1) for k in sorted(KEYS)])


D = sum(math.prod(s) for s in KEYS.values())


@pytest.fixture
def honest(tmp_path):
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(D, generator=g) * 1e-3
    flats = [mu + 0.1 * torch.randn(D, generator=g) * 1e-3 for _ in range(5)]
    paths = [write_delta(tmp_path / f"h{i}.safetensors", f) for i, f in enumerate(flats)]
    return paths, torch.stack(flats).mean(dim=0)


@pytest.mark.parametrize("poison", [100.0, -10.0], ids=["scaled_x100", "sign_flipped_x10"])
def test_robust_rules_resist_one_poisoned_delta_and_the_mean_does_not(tmp_path, honest, poison):
    paths, honest_mean = honest
    bad = write_delta(tmp_path / "bad.safetensors", poison * flat_of(paths[0]))
    inputs = [*paths, bad]
    scale = float(honest_mean.norm())
    errors = {}
    for rule in ("mean", "median", "trimmed_mean", "krum", "multi_krum", "geometric_median"):
        report = make_soup(soup_cfg(rule, inputs), tmp_path / rule, bootstrap())
        errors[rule] = float((flat_of(tmp_path / rule / "soup.safetensors") - honest_mean).norm())
        if rule in ("krum", "multi_krum"):
            assert report["contributors"][-1]["excluded"], rule
            assert not any(c["excluded"] for c in report["contributors"][:5]) or rule == "krum"
    # The bound: honest deltas spread 10% around their mean; the robust rules land within
    # 25% of the honest mean's norm, the plain mean is off by more than its whole norm
    # ((5 mu + 100 mu) / 6 or (5 mu - 10 mu) / 6).
    assert errors["mean"] > 1.0 * scale, errors
    for rule in ("median", "trimmed_mean", "krum", "multi_krum", "geometric_median"):
        assert errors[rule] < 0.25 * scale, (rule, errors[rule] / scale)


def test_weighted_mean_and_task_arithmetic_by_hand(tmp_path):
    a = write_delta(tmp_path / "a.safetensors", torch.full((D,), 1.0))
    b = write_delta(tmp_path / "b.safetensors", torch.full((D,), 3.0))
    make_soup(soup_cfg("mean", [a, b], weights=[1.0, 3.0], lam=2.0), tmp_path / "m", bootstrap())
    assert torch.allclose(flat_of(tmp_path / "m/soup.safetensors"), torch.full((D,), 2 * 2.5))
    make_soup(soup_cfg("mean", [a, b], lam=0.5, normalize=False), tmp_path / "ta", bootstrap())
    assert torch.allclose(flat_of(tmp_path / "ta/soup.safetensors"), torch.full((D,), 2.0))


def test_ties_by_hand(tmp_path):
    x = torch.zeros(D)
    rows = [x.clone(), x.clone(), x.clone()]
    rows[0][:4] = torch.tensor([4.0, -1.0, 0.1, 2.0])
    rows[1][:4] = torch.tensor([2.0, 3.0, 0.2, -5.0])
    rows[2][:4] = torch.tensor([-1.0, 1.0, 0.3, -1.0])
    paths = [write_delta(tmp_path / f"{i}.safetensors", r) for i, r in enumerate(rows)]
    # density: keep the top 3 entries of each: row0 {4, -1, 2}, row1 {2, 3, -5}, row2 {-1, 1, -1}
    make_soup(soup_cfg("ties", paths, density=3 / D), tmp_path / "t", bootstrap())
    out = flat_of(tmp_path / "t/soup.safetensors")
    # coord 0: sum 4+2-1 > 0 -> mean(4, 2) = 3; coord 1: -1+3+1 > 0 -> mean(3, 1) = 2;
    # coord 2: trimmed everywhere -> 0; coord 3: 2-5-1 < 0 -> mean(-5, -1) = -3
    assert torch.allclose(out[:4], torch.tensor([3.0, 2.0, 0.0, -3.0]))
    assert torch.count_nonzero(out[4:]) == 0


def test_dare_drops_p_and_rescales(tmp_path):
    ones = [write_delta(tmp_path / f"{i}.safetensors", torch.ones(D)) for i in range(2)]
    make_soup(soup_cfg("dare", ones, p=0.75), tmp_path / "d", bootstrap())
    out = flat_of(tmp_path / "d/soup.safetensors")
    # each entry is (k1 + k2) * 4 / 2 with k_i ~ Bernoulli(0.25): values 0, 2 or 4
    assert set(out.unique().tolist()) <= {0.0, 2.0, 4.0}
    assert out.mean().item() == pytest.approx(1.0, abs=0.15)  # unbiased
    assert (out == 0).float().mean().item() == pytest.approx(0.75**2, abs=0.08)


def test_clipping_bounds_each_contribution_and_noise_std_matches(tmp_path):
    g = torch.Generator().manual_seed(1)
    norms = [0.5, 2.0, 8.0, 1.0]
    flats = []
    for n in norms:
        v = torch.randn(D, generator=g)
        flats.append(v / v.norm() * n)
    paths = [write_delta(tmp_path / f"{i}.safetensors", f) for i, f in enumerate(flats)]
    clip = 1.0
    quiet = make_soup(soup_cfg("mean", paths, clip_norm=clip), tmp_path / "quiet", bootstrap())
    assert [c["clipped"] for c in quiet["contributors"]] == [False, True, True, False]
    assert [c["norm"] for c in quiet["contributors"]] == pytest.approx(norms, rel=1e-5)
    clipped = [f * min(1.0, clip / n) for f, n in zip(flats, norms)]
    expected = torch.stack(clipped).mean(dim=0)
    quiet_out = flat_of(tmp_path / "quiet/soup.safetensors")
    assert torch.allclose(quiet_out, expected, atol=1e-7)
    # each clipped contribution's share of the mean is at most C / m
    for c in clipped:
        assert float((c / 4).norm()) <= clip / 4 + 1e-6

    sigma = 2.0
    noisy = make_soup(soup_cfg("mean", paths, clip_norm=clip, noise_multiplier=sigma),
                      tmp_path / "noisy", bootstrap())
    noise = flat_of(tmp_path / "noisy/soup.safetensors") - quiet_out
    std = sigma * clip / 4  # sigma C / m on the mean (§11.4)
    assert noisy["privacy"]["noise_std"] == pytest.approx(std)
    # D = 544 draws: the sample std is within ~3 standard errors (std / sqrt(2D)) of it
    assert noise.std().item() == pytest.approx(std, rel=3 / math.sqrt(2 * D))
    assert abs(noise.mean().item()) < 4 * std / math.sqrt(D)
    assert noisy["privacy"]["epsilon"] == pytest.approx(dp_epsilon(sigma, 1.0, 1, 1e-5))


def test_epsilon_from_the_accountant_is_below_the_plain_rdp_bound():
    # No sampling, T rounds: eps <= min_alpha T alpha / (2 sigma^2) + log(1/delta)/(alpha-1)
    # (§11.4); opacus's RDP->DP conversion is a little tighter than this one.
    for sigma, rounds in ((1.0, 1), (2.0, 10), (5.0, 100)):
        bound = min(rounds * a / (2 * sigma**2) + math.log(1e5) / (a - 1)
                    for a in [1 + x / 100 for x in range(1, 20000)])
        eps = dp_epsilon(sigma, 1.0, rounds, 1e-5)
        assert 0.8 * bound < eps <= bound, (sigma, rounds, eps, bound)
    # sampling amplifies: q = 0.01 is far cheaper than everyone every round
    assert dp_epsilon(1.0, 0.01, 100, 1e-5) < dp_epsilon(1.0, 1.0, 100, 1e-5) / 5


def test_noise_is_refused_without_clipping_or_for_unbounded_rules(tmp_path, honest):
    paths, _ = honest
    with pytest.raises(GymError, match="clip_norm"):
        make_soup(soup_cfg("mean", paths, noise_multiplier=1.0), tmp_path / "a", bootstrap())
    with pytest.raises(GymError, match="soup=median has no bounded"):
        make_soup(soup_cfg("median", paths, noise_multiplier=1.0, clip_norm=1.0), tmp_path / "b", bootstrap())


def test_mismatched_inputs_and_bad_weights_are_named(tmp_path, honest):
    paths, _ = honest
    other = tmp_path / "other.safetensors"
    save_packed(FullPrecision(None).quantize({"x.weight": torch.ones(3)}), other)
    with pytest.raises(GymError, match="other.safetensors does not match"):
        make_soup(soup_cfg("mean", [paths[0], other]), tmp_path / "c", bootstrap())
    with pytest.raises(GymError, match="soup.weights"):
        make_soup(soup_cfg("mean", paths[:2], weights=[1.0]), tmp_path / "d", bootstrap())
    with pytest.raises(GymError, match="soup=median .* cannot use soup.weights"):
        make_soup(soup_cfg("median", paths[:3], weights=[1.0, 2.0, 1.0]), tmp_path / "e", bootstrap())
    with pytest.raises(GymError, match="needs at least 5"):
        make_soup(soup_cfg("krum", paths[:3]), tmp_path / "f", bootstrap())


def soup_cli(args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "gym_core.soup", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_soup_app_runs_and_sweeps_rules(tmp_path, honest):
    paths, honest_mean = honest
    inputs = "soup.inputs=[" + ",".join(str(p) for p in paths) + "]"
    one = soup_cli(["soup=median", inputs, "out=one"], cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    report = json.loads((tmp_path / "one/report.json").read_text())
    assert report["rule"] == "median" and len(report["contributors"]) == 5
    sweep = soup_cli(["-m", "soup=mean,trimmed_mean", inputs, "out=sweep"], cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    assert json.loads((tmp_path / "sweep/0/report.json").read_text())["rule"] == "mean"
    assert json.loads((tmp_path / "sweep/1/report.json").read_text())["rule"] == "trimmed_mean"
    mean = flat_of(tmp_path / "sweep/0/soup.safetensors")
    assert torch.allclose(mean, honest_mean, atol=1e-8)
    bad = soup_cli(["soup=median", "soup.inputs=[nowhere.safetensors,b]", "out=x"], cwd=tmp_path)
    assert bad.returncode != 0 and "nowhere.safetensors, which does not exist" in bad.stderr


def test_soup_of_a_three_run_multirun_applied_to_the_base(tmp_path, tiny_overrides,
                                                          digits_plugin_path):
    env = {**os.environ, "PYTHONPATH": digits_plugin_path, "OMP_NUM_THREADS": "1"}
    args = [*tiny_overrides, "trainer.max_steps=2", "algorithm.rewards=[digit_share]",
            "algorithm.lr=1e-2", "trainer.eval_before=false", "quant=deltaquant",
            "quant.bits=8", "quant.granularity=channel", "run.name=src", "trainer.seed=0,1,2"]
    runs = subprocess.run([sys.executable, "-m", "gym_core", "-m", *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert runs.returncode == 0, runs.stderr[-3000:]
    run_dirs = [tmp_path / "runs/src" / str(i) for i in range(3)]
    for d in run_dirs:
        assert (d / "delta/deltaquant.safetensors").is_file()
    soup = soup_cli(["soup=mean", "soup.inputs=[" + ",".join(map(str, run_dirs)) + "]",
                     "out=soup"], cwd=tmp_path, env={"PYTHONPATH": digits_plugin_path})
    assert soup.returncode == 0, soup.stderr[-2000:]

    deltas = [read_delta(d / "delta/deltaquant.safetensors", bootstrap()) for d in run_dirs]
    merged = read_delta(tmp_path / "soup/soup.safetensors", bootstrap())
    assert set(merged) == set(deltas[0]) and merged
    norms = [sum(float(d[k].norm() ** 2) for k in d) ** 0.5 for d in deltas]
    assert min(norms) > 0  # the runs really trained
    from gym_core.config.schema import TinyModelConfig
    from gym_core.model.policy import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    base = tiny_model(TinyModelConfig(), len(tok), tok.pad_token_id, tok.eos_token_id)
    before = {k: v.detach().clone() for k, v in base.named_parameters()}
    apply_delta(base, merged)
    params = dict(base.named_parameters())
    for key in merged:
        expected = before[key] + sum(d[key] for d in deltas) / 3
        assert torch.allclose(params[key], expected, atol=1e-6), key
    bootstrap(reload=True)
