"""What both halves of a benchmark measure the same way: resident memory (the kernel's
high-water mark) and CPU used by other processes while a measurement ran."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path


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
