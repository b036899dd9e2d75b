"""Quantize + pack throughput of BitDelta and DeltaQuant int4 on a delta of SmolLM2-135M's
shapes, beside a plain tensor copy of the same bytes (the memory-bandwidth ceiling).

    python benchmarks/quant_throughput.py [--repeats 3] [--threads N]

The delta is random (N(0, 1e-3), the size of a fine-tune's delta) with the shapes of
every attention and MLP projection of SmolLM2-135M (the matrices both quantizers
compress: 30 layers x 7, 106M weights), read from the converted model's safetensors
header. Throughput is MB/s of fp32 delta in; each number is the best of --repeats runs.
"1st call s" is the first quantize call of the process, which also loads the quantizer's
numba kernels from their on-disk cache, or compiles them (about a second each) when the
cache is cold.
"""

from __future__ import annotations

import argparse
import time

import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from gym_bitdelta import BitDeltaConfig
from gym_bitdelta.bitdelta import BitDeltaQuantizer
from gym_core.model.policy import smollm2_folder
from gym_deltaquant import DeltaQuantConfig
from gym_deltaquant.deltaquant import DeltaQuantizer


def smollm2_projection_shapes() -> dict[str, list[int]]:
    with safe_open(str(smollm2_folder() / "model.safetensors"), "pt") as fh:
        return {k: fh.get_slice(k).get_shape() for k in fh.keys()  # noqa: SIM118 (a safe_open handle is not iterable)
                if k.endswith("_proj.weight")}


def best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    delta = {k: torch.randn(s, generator=g) * 1e-3 for k, s in smollm2_projection_shapes().items()}
    nbytes = sum(d.numel() * 4 for d in delta.values())
    params = sum(d.numel() for d in delta.values())
    dst = {k: torch.empty_like(d) for k, d in delta.items()}

    def copy():
        for k, d in delta.items():
            dst[k].copy_(d)

    def deltaquant(**kw):
        return DeltaQuantizer(OmegaConf.structured(DeltaQuantConfig(**kw)))

    methods = {  # the first two are the target rows
        "bitdelta (1 bit + fp32 scale/matrix)":
            BitDeltaQuantizer(OmegaConf.structured(BitDeltaConfig())),
        "deltaquant int4 (sym, fp32 scale/128)": deltaquant(bits=4),
        "deltaquant int4 asym (scale+zero/128)": deltaquant(bits=4, symmetric=False),
        "deltaquant int3 (sym, scale/128)": deltaquant(bits=3),
        "deltaquant int8 (sym, scale/channel)": deltaquant(bits=8, granularity="channel"),
        "deltaquant ternary (scale/128)": deltaquant(mode="ternary"),
    }
    copy()  # warm up: page in the destination
    rows = [("tensor copy (ceiling)", best_seconds(copy, args.repeats), None, None)]
    for name, q in methods.items():
        t0 = time.perf_counter()
        packed = q.quantize(delta)  # the first call loads (or compiles) the numba kernels
        first = time.perf_counter() - t0
        rows.append((name, best_seconds(lambda q=q: q.quantize(delta), args.repeats), packed,
                     first))

    print(f"SmolLM2-135M projections: {len(delta)} matrices, {params / 1e6:.1f}M weights, "
          f"{nbytes / 1e6:.0f} MB fp32; torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, best of {args.repeats}")
    head = (f"{'method':<40} | {'seconds':>7} | {'MB/s':>7} | {'vs copy':>7} | "
            f"{'bits/weight':>11} | {'vs bf16':>7} | {'1st call s':>10}")
    print(head)
    print("-" * len(head))
    copy_rate = nbytes / rows[0][1] / 1e6
    for name, seconds, packed, first in rows:
        rate = nbytes / seconds / 1e6
        bits = f"{packed.bits_per_weight:.4f}" if packed else "32"
        ratio = f"{packed.compression_ratio:.2f}x" if packed else "0.50x"
        first = f"{first:10.3f}" if first is not None else f"{'':>10}"
        print(f"{name:<40} | {seconds:7.3f} | {rate:7.0f} | {rate / copy_rate:6.1%} | "
              f"{bits:>11} | {ratio:>7} | {first}")


if __name__ == "__main__":
    main()
