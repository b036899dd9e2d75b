"""Big data: a large JSONL (2 GB by default) against a small one (2 MB), each trained
for 2 SFT steps through ``data=hf``; the time from launch to the first step's start and
the peak resident memory of each run (the child process's ``ru_maxrss``).

The rows are read lazily from datasets' Arrow cache and tokenised per batch, so the
large file should cost only its one conversion from JSON to Arrow (the cold run; a warm
run finds the Arrow table by its fingerprint) and no more memory than the small one.

    python benchmarks/data.py                          # 2 GB vs 2 MB, cold then warm
    python benchmarks/data.py --big-mb 20 --small-mb 2 --model tiny   # a quick check
    python benchmarks/data.py --json out.json

Figures from a shared machine say nothing about time: measure on an idle one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def make_jsonl(path: Path, megabytes: float, seed: int = 0) -> int:
    """Prompt-completion rows (about 200 bytes each) until the file holds ``megabytes``."""
    import random

    rng = random.Random(seed)
    target = int(megabytes * 2**20)
    rows = 0
    with path.open("w", encoding="utf-8") as fh:
        size = 0
        chunk = []
        while size < target:
            a, b = rng.randint(0, 10**6), rng.randint(0, 10**6)
            line = json.dumps({
                "prompt": f"Row {rows}: what is {a} + {b}? Show the sum and nothing else.",
                "completion": f"{a} + {b} = {a + b}. The sum is {a + b}, as asked."}) + "\n"
            chunk.append(line)
            size += len(line.encode())
            rows += 1
            if len(chunk) >= 10000:
                fh.write("".join(chunk))
                chunk = []
        fh.write("".join(chunk))
    return rows


def run(path: Path, cache: Path, work: Path, model: str, name: str) -> dict:
    """Train 2 steps; seconds from launch to the first step's start, and peak RSS."""
    cmd = [sys.executable, "-m", "gym_core", f"model={model}", "algorithm=sft", "data=hf",
           f"data.path={path}", f"data.cache_dir={cache}", "data.test_size=64",
           "trainer.max_steps=2", "trainer.batch_size=4", "trainer.eval_before=false",
           "trainer.eval_size=8", "trainer.progress=false", "trainer.tensorboard=false",
           f"run.root={work}", f"run.name={name}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    peaks = {"RssAnon": 0, "RssFile": 0}
    sampler = threading.Thread(target=_sample, args=(proc, peaks), daemon=True)
    sampler.start()
    first = None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        # printed right after the starting policy's score, just before step 1
        if first is None and "before training" in line:
            first = time.perf_counter() - t0
    _, status, usage = os.wait4(proc.pid, 0)
    total = time.perf_counter() - t0
    sampler.join()
    if status != 0:
        raise SystemExit(f"{name} failed:\n{''.join(lines[-30:])}")
    metrics = (work / name / "metrics.jsonl").read_text().splitlines()
    return {"run": name, "seconds_to_first_step": first, "seconds_total": total,
            "peak_rss_mb": usage.ru_maxrss / 1024, "peak_anon_mb": peaks["RssAnon"] / 1024,
            "peak_file_mb": peaks["RssFile"] / 1024, "steps": len(metrics)}


def _sample(proc, peaks: dict) -> None:
    """The child's private (anonymous) and file-backed resident memory, every 50 ms, kept
    at their peaks: ``ru_maxrss`` counts the pages of the memory-mapped Arrow file that
    were read, which are clean page cache the kernel takes back, not memory the run owns."""
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                key, _, value = line.partition(":")
                if key in peaks:
                    peaks[key] = max(peaks[key], int(value.split()[0]))
        except (OSError, ValueError, IndexError):
            return
        time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--big-mb", type=float, default=2048)
    ap.add_argument("--small-mb", type=float, default=2)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dir", default=None, help="where the files go (default: a temp dir)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        results = []
        for label, mb in (("small", args.small_mb), ("big", args.big_mb)):
            path = tmp / f"{label}.jsonl"
            rows = make_jsonl(path, mb)
            size = path.stat().st_size / 2**20
            for phase in ("cold", "warm"):  # warm: the Arrow table is found in the cache
                r = run(path, tmp / "cache", tmp / "runs", args.model, f"{label}-{phase}")
                r.update(file_mb=round(size, 1), rows=rows)
                results.append(r)
                print(json.dumps(r), flush=True)
    by = {r["run"]: r for r in results}
    extra = by["big-warm"]["peak_rss_mb"] - by["small-warm"]["peak_rss_mb"]
    anon = by["big-warm"]["peak_anon_mb"] - by["small-warm"]["peak_anon_mb"]
    print(f"peak memory, big minus small (warm): {extra:.0f} MB resident, {anon:.0f} MB "
          "private (the rest: the Arrow file's mapped pages) (target: within 300 MB); "
          f"first step of the big file: cold {by['big-cold']['seconds_to_first_step']:.1f} s, "
          f"warm {by['big-warm']['seconds_to_first_step']:.1f} s (target: within 30 s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
