"""Weight sync codecs (trainer -> rollout workers), without Ray: a worker's plain model
follows the trainer's LoRA policy exactly (full, lora) or within one sync's quantisation
error that never accumulates (int8, deltaquant, bitdelta); the packed codecs move fewer
bytes."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from gym_core.base.errors import GymError
from gym_core.config.schema import ModelConfig
from gym_core.deltas.merge import plain_state
from gym_core.model.policy import load_base
from gym_core.plugin.startup import bootstrap
from gym_core.sampling.weight_sync import Receiver, Sender, message_bytes
from tests.conftest import tiny_lora_policy


def worker_model():
    cfg = ModelConfig(source="tiny")
    model, _ = load_base(OmegaConf.structured(cfg))
    return model


def train_a_little(policy, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)


def gap(policy, model) -> float:
    want = plain_state(policy.model)
    have = dict(model.named_parameters())
    return max((want[k] - have[k].detach()).abs().max().item() for k in want)


@pytest.mark.parametrize("codec", ["full", "lora", "int8", "deltaquant", "bitdelta"])
def test_a_worker_follows_the_trainer(codec):
    plugins = bootstrap()
    policy = tiny_lora_policy()
    sender = Sender(codec, policy, plugins)
    model = worker_model()
    receiver = Receiver(model, plugins)
    receiver.apply(sender.initial())
    assert gap(policy, model) == 0.0
    gaps, sizes = [], []
    for step in range(6):
        train_a_little(policy, step)
        message = sender.update()
        sizes.append(message_bytes(message))
        receiver.apply(message)
        gaps.append(gap(policy, model))
        # the trainer's mirror is exactly what the worker rebuilt
        if sender.mirror is not None:
            have = dict(model.named_parameters())
            assert max((sender.mirror[k] - have[k].detach()).abs().max().item()
                       for k in sender.mirror) <= 1e-6
    if codec in ("full", "lora"):
        assert max(gaps) <= 1e-6
    else:
        # error feedback: the gap after six syncs is one sync's error, not six
        step_change = 0.02 * 4 * 3  # a generous bound on one step's largest change
        assert gaps[-1] <= step_change
        assert gaps[-1] <= 3 * gaps[0] + 1e-6
    full_bytes = sum(p.numel() * 4 for p in model.parameters())
    if codec == "full":
        assert sizes[0] == full_bytes
    else:
        assert 0 < max(sizes) < full_bytes  # the point of the codec


def test_packed_codecs_are_smaller_in_order():
    plugins = bootstrap()
    sizes = {}
    for codec in ("full", "int8", "bitdelta"):
        policy = tiny_lora_policy()
        sender = Sender(codec, policy, plugins)
        sender.initial()
        train_a_little(policy, 0)
        sizes[codec] = message_bytes(sender.update())
    assert sizes["bitdelta"] < sizes["int8"] < sizes["full"]


def test_bad_codecs_are_one_line():
    plugins = bootstrap()
    policy = tiny_lora_policy()
    with pytest.raises(GymError, match="rollout.weight_sync='zip' is not one of"):
        Sender("zip", policy, plugins)
