"""What the halves of the benchmarks measure and run the same way: resident memory (the
kernel's high-water mark), CPU used by other processes while a measurement ran, gym's
training run under those measurements, and TRL's per-step timer and settings."""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path
from typing import Any


def _proc_status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (Linux), or None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mib() -> float:
    """The process's current resident set size in MiB."""
    kib = _proc_status_kib("VmRSS")
    if kib is None:  # not Linux: fall back to psutil
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    return kib / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS; False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """The process's peak resident set size in MiB since start (or since reset_peak_rss).

    VmHWM is kept by the kernel, so it catches short spikes a sampling thread would miss.
    """
    kib = _proc_status_kib("VmHWM")
    if kib is None:  # ru_maxrss is KiB on Linux, bytes on macOS
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024
    return kib / 1024


def _system_busy_sec() -> float | None:
    """CPU seconds all processes on the machine have spent busy (Linux /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal ...: count all but idle and iowait
    busy = sum(fields[:3]) + sum(fields[5:8])
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_sec() -> float:
    """CPU seconds this process (all its threads) has used."""
    t = os.times()
    return t.user + t.system



class OtherCpu:
    """CPU seconds other processes used between ``start()`` and ``stop()``. On a shared
    machine anything beyond a few seconds means contention, and OpenMP thread pools then
    slow down far more than proportionally (25x seen on 2 cores): discard such runs."""

    def start(self) -> None:
        self._busy, self._own = _system_busy_sec(), _own_cpu_sec()

    def stop(self) -> float | None:
        busy = _system_busy_sec()
        if busy is None or self._busy is None:
            return None
        return round(busy - self._busy - (_own_cpu_sec() - self._own), 1)


def train_gym(cfg, algorithm: str, rewards: list[str], seed: int) -> dict:
    """Load ``cfg.model`` and train it with gym's one loop in a temporary run folder,
    measured from after the model load. Returns the per-step ``rows`` of metrics.jsonl,
    ``peak_rss_mib``, ``baseline_rss_mib`` (after loading) and ``other_processes_cpu_sec``."""
    import json
    import tempfile

    import torch

    from gym_core.base import threads
    from gym_core.model.policy import load_policy
    from gym_core.plugin.startup import bootstrap
    from gym_core.train.loop import seed_everything, train

    plan = threads.configure(cfg.trainer.threads)  # as run_job does
    plugins = bootstrap()
    algo_cls = plugins.component("algorithm", algorithm).load()
    task = plugins.component("data", cfg.data.name).load()(cfg.data)
    reward_fns = [(name, plugins.component("reward", name).load(), 1.0) for name in rewards]
    seed_everything(seed)
    policy = load_policy(cfg.model, torch.device("cpu"))
    baseline = rss_mib()
    reset_peak_rss()
    other = OtherCpu()
    other.start()
    with tempfile.TemporaryDirectory(prefix=f"gym-{algorithm}-bench-") as run_dir:
        train(cfg, policy, algo_cls(cfg.algorithm, policy), task, reward_fns, plugins,
              Path(run_dir))
        rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().split("\n")
                if x.strip()]
    threads.release()
    return {"rows": rows, "peak_rss_mib": peak_rss_mib(), "baseline_rss_mib": baseline,
            "other_processes_cpu_sec": other.stop(), "threads": plan.current}


def trl_step_timer(steps: list[dict[str, Any]], log_key: str, describe):
    """A TrainerCallback that times each optimizer step: ``on_step_begin`` fires before
    ``training_step`` (where GRPOTrainer generates its rollouts), ``on_step_end`` after
    the optimizer step. It keeps the step's logged metrics, those that carry ``log_key``
    (the end-of-training summary shares the last step's global_step, without it), and
    prints ``describe(logs)`` to stderr."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            steps.append({"step": state.global_step, "sec": time.perf_counter() - self._start})

        def on_log(self, args, state, control, logs=None, **kwargs):
            # With logging_steps=1 the log for step N arrives right after its on_step_end.
            if logs and log_key in logs and steps and steps[-1]["step"] == state.global_step:
                steps[-1]["logs"] = dict(logs)
                print(f"[trl] step {state.global_step}: {steps[-1]['sec']:.2f}s "
                      f"{describe(logs)}", file=sys.stderr, flush=True)

    return StepTimer()


def trl_checkpointing(config_cls, on: bool) -> dict:
    """The gradient checkpointing setting for a TRL config class (TRL defaults it to
    True): transformers 5 renamed the argument to activation_checkpointing (the old name
    still works but warns)."""
    if "activation_checkpointing" in config_cls.__dataclass_fields__:
        return {"activation_checkpointing": on}
    return {"gradient_checkpointing": on}


def run_half(script: Path, args: list[str]) -> dict:
    """Run one benchmark half in a fresh process (peak memory is per process) and return
    the JSON it prints."""
    import json
    import subprocess

    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{script.name} {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


def ratio_table(results: list[tuple[dict, dict]], label: tuple[str, str], rate_key: str) -> str:
    """TRL, then gym, for each (gym, trl) pair: seconds per step, ``rate_key`` tokens per
    second and peak memory, with gym's ratios to TRL. ``label``: (column title, the key
    that names each pair's setting)."""
    title, key = label
    width = max(len(title), *(len(str(r[key])) for pair in results for r in pair))
    impl_w = max(len("impl"), *(len(r["impl"]) for pair in results for r in pair))
    head = (f"{title:>{width}} | {'impl':<{impl_w}} | {'s/step':>7} | {'tok/s':>7} | "
            f"{'peak MiB':>8} | {'tok/s ratio':>11} | {'memory ratio':>12} | {'other CPU s':>11}")
    lines = [head, "-" * len(head)]
    for gym, trl in results:
        for r in (trl, gym):
            ratio = r[rate_key] / trl[rate_key]
            mem = r["peak_rss_mib"] / trl["peak_rss_mib"]
            lines.append(
                f"{r[key]!s:>{width}} | {r['impl']:<{impl_w}} | {r['sec_per_step']:>7.2f} | "
                f"{r[rate_key]:>7.1f} | {r['peak_rss_mib']:>8.0f} | {ratio:>10.2f}x | "
                f"{mem:>11.2f}x | {r.get('other_processes_cpu_sec')!s:>11}"
            )
    return "\n".join(lines)
