"""Serving many variants of SmolLM2-135M-Instruct from one base: memory per variant and
decode throughput against one merged model (the ceiling).

    python benchmarks/serve.py [--requests 32] [--tokens 64] [--ks 1 8 64] [--workdir DIR]

The variants are synthetic and say so: random deltas (N(0, 1e-3) on every attention and
MLP projection, the size of a fine-tune's delta) quantized and written by the real
BitDelta quantizer (made once, in a subprocess, into --workdir), and random LoRA adapters
(r 16 on all seven projections, gym's default). Quality does not enter here: the compute
and memory of a variant do not depend on its values.

Memory: the process's resident size with the base alone, then with 1, 8 and 64 BitDelta
variants loaded through the server's own loader (gym_core.serve.variants), after freeing
what loading left behind (gc, malloc_trim): MiB per added variant against the variant's
packed size on disk. Throughput: the server's engine (gym_core.serve.engine, in-process:
no HTTP) decodes --requests concurrent greedy requests of --tokens tokens each (EOS
ignored), spread round-robin over K variants; the ceiling is the same engine serving one
merged model (base + a dequantized delta) to all of them. tok/s counts generated tokens
over the time spent in decode steps (the prefill of the 32 prompts is reported apart, in
the end-to-end rate: generated tokens over the wall time from submitting to the last
token); latency is per request, from submitting to its last token.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import queue
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import OtherCpu, rss_mib  # noqa: E402

ANCHORS = """\
Anchors (their papers' own setups, GPUs, not this machine):
  S-LoRA (Sheng et al. 2023): up to 4x the throughput of vLLM-packed merged copies, thousands of adapters
  Punica (Chen et al. 2023): 12x the throughput of state-of-the-art systems serving merged LoRA models
  BitDelta (Liu et al. 2024): a multi-tenant kernel serving many 1-bit deltas over one base,
      >10x lower memory and latency than one full model per tenant"""


def trimmed_rss() -> float:
    """Resident MiB after returning freed heap memory to the system."""
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_mib()


def make_variants(folder: Path, count: int) -> None:
    """``count`` BitDelta delta files of SmolLM2's projection shapes (skips existing)."""
    from omegaconf import OmegaConf
    from safetensors import safe_open

    from gym_bitdelta import BitDeltaConfig
    from gym_bitdelta.bitdelta import BitDeltaQuantizer
    from gym_core.deltas.delta import save_packed
    from gym_core.model.policy import smollm2_folder

    with safe_open(str(smollm2_folder() / "model.safetensors"), "pt") as fh:
        shapes = {k: fh.get_slice(k).get_shape() for k in fh.keys()  # noqa: SIM118
                  if k.endswith("_proj.weight")}
    q = BitDeltaQuantizer(OmegaConf.structured(BitDeltaConfig()))
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        path = folder / f"bd{i:03d}.safetensors"
        if path.is_file():
            continue
        g = torch.Generator().manual_seed(1000 + i)
        delta = {k: torch.randn(s, generator=g) * 1e-3 for k, s in shapes.items()}
        save_packed(q.quantize(delta), path)


def lora_variants(model, count: int, rank: int = 16):
    from gym_core.serve.variants import LoraOperator, Variant

    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    out = []
    for i in range(count):
        g = torch.Generator().manual_seed(5000 + i)
        ops = {}
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name.endswith(targets):
                a = torch.randn(rank, m.in_features, generator=g) / m.in_features ** 0.5
                b = torch.randn(m.out_features, rank, generator=g) * 1e-2
                ops[name] = LoraOperator(a, b, scaling=2.0)
        out.append(Variant(f"lora{i}", "lora", "synthetic", ops))
    return out


def run_round(engine, prompts, variants, tokens: int) -> dict:
    """All requests at once; tokens/s over the round and per-request latencies."""
    from gym_core.serve.engine import Params, Request

    done: queue.Queue = queue.Queue()
    reqs = []
    for i, ids in enumerate(prompts):
        variant = variants[i % len(variants)] if variants else None
        t0 = time.perf_counter()
        req = Request(ids, variant, Params(max_tokens=tokens, temperature=0, ignore_eos=True),
                      lambda ev, t0=t0: done.put((ev, time.perf_counter() - t0))
                      if ev.kind != "text" else None)
        reqs.append(req)
    before = engine.load()
    start = time.perf_counter()
    for r in reqs:
        engine.submit(r)
    lat, generated = [], 0
    for _ in reqs:
        ev, seconds = done.get(timeout=3600)
        if ev.kind != "done":
            raise RuntimeError(ev.text)
        lat.append(seconds)
        generated += ev.completion_tokens
    wall = time.perf_counter() - start
    after = engine.load()
    lat.sort()
    decode = {k: after[k] - before[k] for k in ("decode_tokens", "decode_seconds")}
    return {"tok_s": decode["decode_tokens"] / decode["decode_seconds"],
            "e2e_tok_s": generated / wall, "p50": statistics.median(lat),
            "p95": lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))], "tokens": generated}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64, help="generated per request")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "gym-serve-bench"))
    ap.add_argument("--make-variants", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.workdir)
    n_var = max(max(args.ks), 64)
    if args.make_variants is not None:
        make_variants(work, args.make_variants)
        return
    # made in another process, so quantizing leaves nothing in this one's memory
    subprocess.run([sys.executable, __file__, "--workdir", str(work), "--make-variants",
                    str(n_var)], check=True)

    from omegaconf import OmegaConf

    from gym_core.config.schema import MODEL_OPTIONS
    from gym_core.deltas.delta import apply_delta, load_packed, read_delta
    from gym_core.model.policy import load_base
    from gym_core.plugin.startup import bootstrap
    from gym_core.serve.engine import Engine
    from gym_core.serve.variants import Base, load_variant

    torch.set_grad_enabled(False)
    plugins = bootstrap()
    cfg = OmegaConf.structured(MODEL_OPTIONS["smollm2"])
    files = sorted(work.glob("bd*.safetensors"))[:n_var]
    packed_mib = load_packed(files[0]).nbytes / 2**20
    base_model, tok = load_base(cfg)
    base = Base.of(base_model, cfg, "SmolLM2-135M-Instruct")
    # warm the kernels (compiled on first use) before measuring memory
    load_variant("warm", files[0], base, plugins)
    rss0 = trimmed_rss()
    mem_rows = [("base alone", 0, rss0)]
    variants = []
    for k in sorted({1, 8, 64, *args.ks}):
        while len(variants) < k:
            variants.append(load_variant(f"bd{len(variants)}", files[len(variants)], base, plugins))
        mem_rows.append((f"+ {k} BitDelta", k, trimmed_rss()))

    prompts = []
    for i in range(args.requests):
        text = tok.apply_chat_template([{"role": "user", "content": f"What is {i} + {i * 7 % 19}? "
                                         "Explain your steps."}],
                                       tokenize=False, add_generation_prompt=True)
        prompts.append(tok(text, add_special_tokens=False).input_ids)
    loras = lora_variants(base_model, max(args.ks))

    rows = []

    def measure(label, model, vs):
        engine = Engine(model, tok, max_rows=args.requests)
        try:
            run_round(engine, prompts, vs, 4)  # warm-up
            other = OtherCpu()
            other.start()
            r = run_round(engine, prompts, vs, args.tokens)
            r["other_cpu"] = other.stop()
        finally:
            engine.stop()
        rows.append((label, r))
        print(f"  measured {label}: {r['tok_s']:.1f} tok/s", flush=True)

    merged, _ = load_base(cfg)
    apply_delta(merged, read_delta(files[0], plugins))
    measure("merged model (ceiling)", merged, [])
    del merged
    gc.collect()
    for k in args.ks:
        measure(f"BitDelta K={k}", base_model, variants[:k])
    for k in args.ks:
        measure(f"LoRA r16 K={k}", base_model, loras[:k])

    print()
    print(f"SmolLM2-135M-Instruct, fp32, {torch.get_num_threads()} threads; synthetic variants "
          "(random deltas through the real BitDelta quantizer; random LoRA r16 adapters)")
    print(f"\nMemory (resident, after malloc_trim); packed BitDelta delta: {packed_mib:.1f} MiB, "
          f"one more fp32 copy of the model: "
          f"{sum(p.numel() for p in base_model.parameters()) * 4 / 2**20:.0f} MiB")
    print(f"{'model set':<22} | {'RSS MiB':>8} | {'MiB / variant':>13} | {'vs packed':>9}")
    print("-" * 62)
    for label, k, rss in mem_rows:
        per = f"{(rss - rss0) / k:13.2f}" if k else ""
        vs = f"{(rss - rss0) / k / packed_mib:8.2f}x" if k else ""
        print(f"{label:<22} | {rss:8.0f} | {per:>13} | {vs:>9}")
    print("target: at most 1.25x the packed size per added variant")
    ceiling = rows[0][1]["tok_s"]
    print(f"\nThroughput: {args.requests} concurrent greedy requests x {args.tokens} tokens, "
          "round-robin over K variants")
    print(f"{'served':<24} | {'decode tok/s':>12} | {'vs ceiling':>10} | {'e2e tok/s':>9} | "
          f"{'p50 s':>6} | {'p95 s':>6} | {'other CPU s':>11}")
    print("-" * 96)
    for label, r in rows:
        print(f"{label:<24} | {r['tok_s']:12.1f} | {r['tok_s'] / ceiling:9.0%}  | "
              f"{r['e2e_tok_s']:9.1f} | {r['p50']:6.2f} | {r['p95']:6.2f} | "
              f"{r['other_cpu'] if r['other_cpu'] is not None else '':>11}")
    print("target: BitDelta at K=64 at least 50% of the ceiling\n")
    print(ANCHORS)
    print(json.dumps({"memory": mem_rows, "throughput": rows}), file=sys.stderr)


if __name__ == "__main__":
    main()
