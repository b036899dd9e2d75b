"""Weight sync codecs (trainer -> rollout workers) on SmolLM2-135M with its LoRA adapter:
bytes a sync moves, seconds to encode (trainer) and apply (worker), and how far the
worker's weights end from the trainer's, over a few "steps" of adapter change the size of
a GRPO step's (Adam at lr 1e-5 moves each weight by about lr).

    python benchmarks/weight_sync.py [--model tiny] [--steps 5]

Run on an idle machine: the seconds are wall time.
"""

from __future__ import annotations

import argparse
import time

import torch
from omegaconf import OmegaConf

from gym_core.config.schema import ModelConfig
from gym_core.deltas.merge import plain_state
from gym_core.model.policy import load_base, load_policy
from gym_core.plugin.startup import bootstrap
from gym_core.sampling.weight_sync import CODECS, Receiver, Sender, message_bytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-5)
    args = ap.parse_args()
    plugins = bootstrap()
    mcfg = OmegaConf.structured(ModelConfig(source=args.model))
    rows = []
    for codec in CODECS:
        torch.manual_seed(0)
        policy = load_policy(mcfg, torch.device("cpu"))
        worker, _ = load_base(mcfg)
        sender, receiver = Sender(codec, policy, plugins), Receiver(worker, plugins)
        first = sender.initial()
        receiver.apply(first)
        sizes, enc, dec = [], [], []
        g = torch.Generator().manual_seed(1)
        for _ in range(args.steps):
            with torch.no_grad():  # an Adam-sized step on every adapter weight
                for n, p in policy.model.named_parameters():
                    if "lora_" in n:
                        p.add_(torch.sign(torch.randn(p.shape, generator=g)) * args.lr * 50)
            t0 = time.perf_counter()
            message = sender.update()
            enc.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            receiver.apply(message)
            dec.append(time.perf_counter() - t0)
            sizes.append(message_bytes(message))
        want, have = plain_state(policy.model), dict(worker.named_parameters())
        gap = max((want[k] - have[k].detach()).abs().max().item() for k in want)
        rows.append((codec, message_bytes(first), sum(sizes) / len(sizes),
                     sum(enc) / len(enc), sum(dec) / len(dec), gap))
    full = rows[0][2]
    print(f"model {args.model}, {args.steps} syncs after the first")
    print("| codec | first sync MB | MB per sync | vs full | encode s | apply s | max |w - w_trainer| |")
    print("|---|---|---|---|---|---|---|")
    for codec, first, size, e, d, gap in rows:
        print(f"| {codec} | {first / 1e6:.1f} | {size / 1e6:.2f} | {full / size:.1f}x | {e:.3f} | "
              f"{d:.3f} | {gap:.2e} |")


if __name__ == "__main__":
    main()
