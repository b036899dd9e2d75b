"""How many threads gym computes with: the CPUs it is given, shared with the other gym
processes on them.

OpenMP thread pools that share cores slow down far beyond their share of the CPU: a
parallel region ends only when every one of its threads has run, and a thread that waits
for a descheduled partner spins on a core the partner needs (two gym processes with two
threads each on two cores: a GRPO step 12 s -> 56 s). So gym

- counts the CPUs it may use: its affinity mask, the cgroup's CPU quota, torchrun's ranks
  on this machine (``LOCAL_WORLD_SIZE``);
- registers itself (a file named by its pid in a per-user folder) and, before each
  training step and each evaluation batch, divides those CPUs among the live gym
  processes that share them, so that each pool has cores of its own;
- keeps OpenMP's idle threads from spinning for long (``GOMP_SPINCOUNT``, set before
  torch loads its OpenMP runtime: :func:`prepare_environment`, called by gym's entry
  point).

``trainer.threads`` (or ``OMP_NUM_THREADS``, which joblib's workers get from their
launcher) fixes the number instead.

A training run keeps one number from start to end, and across resumes: results differ
in the last bits (about 1e-8) between thread counts, so a run whose count followed its
neighbours would not repeat itself. :func:`configure` with ``keep=True`` (the job) fixes
the count the CPUs give at the run's first start (or the one its ``run.json`` recorded,
``recorded``), still registered so that neighbours count it. This module imports no torch
at import time.
"""

from __future__ import annotations

import atexit
import math
import os
import tempfile
from pathlib import Path

#: libgomp's idle threads spin this many times before sleeping (its default, 300000,
#: is several milliseconds of a core another process may need); enough to bridge the
#: gap between two operations of a decode step
SPIN_COUNT = "10000"


def prepare_environment(environ=os.environ) -> None:
    """Set OpenMP's wait policy before torch is imported (libgomp reads it once)."""
    if "OMP_WAIT_POLICY" not in environ and "GOMP_SPINCOUNT" not in environ:
        environ["GOMP_SPINCOUNT"] = SPIN_COUNT


def affinity() -> set[int]:
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def cgroup_cpus(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (v2 ``cpu.max`` or v1
    ``cpu.cfs_quota_us / cpu.cfs_period_us``); None when unlimited or unknown."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def cpu_budget(environ=os.environ) -> int:
    """CPUs this process may use: affinity, cgroup quota, and its share of torchrun's
    ranks on this machine."""
    cpus = len(affinity())
    quota = cgroup_cpus()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    ranks = int(environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cpus // max(1, ranks))


def registry_folder() -> Path:
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return base / f"gym-threads-{uid}"


class ThreadPlan:
    """The number of threads torch uses in this process, kept up to date."""

    def __init__(self, requested: int | None = None, environ=os.environ,
                 folder: Path | None = None):
        self.fixed = requested
        self.source = "trainer.threads"
        if requested is None and environ.get("OMP_NUM_THREADS", "").isdigit():
            self.fixed, self.source = int(environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
        self.budget = cpu_budget(environ)
        self.cpus = affinity()
        self.folder = folder or registry_folder()
        self.entry: Path | None = None
        self.current = 0
        if self.fixed is None:
            self.source = "auto"
            self._register()

    def _register(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.entry = self.folder / str(os.getpid())
            self.entry.write_text(",".join(map(str, sorted(self.cpus))))
            atexit.register(self.close)
        except OSError:  # no writable temp folder: count this process alone
            self.entry = None

    def close(self) -> None:
        if self.entry is not None:
            self.entry.unlink(missing_ok=True)
            self.entry = None

    def neighbours(self) -> int:
        """Live gym processes (this one included) whose CPUs overlap this one's."""
        if self.entry is None:
            return 1
        count = 1
        me = os.getpid()
        for path in self.folder.iterdir():
            if not path.name.isdigit() or int(path.name) == me:
                continue
            pid = int(path.name)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                path.unlink(missing_ok=True)  # a process that died without cleaning up
                continue
            except PermissionError:
                pass
            try:
                cpus = {int(c) for c in path.read_text().split(",") if c}
            except (OSError, ValueError):
                continue
            if cpus & self.cpus:
                count += 1
        return count

    def threads(self) -> int:
        if self.fixed is not None:
            return self.fixed
        return max(1, self.budget // self.neighbours())

    def keep(self, recorded: int | None = None) -> None:
        """Fix the count for the rest of the job: ``recorded`` (a resumed run's), or the
        count the CPUs give now. A count set by trainer.threads or OMP_NUM_THREADS wins.
        The process stays registered, so its neighbours count it."""
        if self.source != "auto":
            return
        self.fixed = recorded if recorded else self.threads()
        self.source = "run.json" if recorded else "auto, kept for the run"

    def apply(self) -> int:
        """Set torch's intra-op threads to :meth:`threads` (when it changed)."""
        n = self.threads()
        if n != self.current:
            import torch

            torch.set_num_threads(n)
            self.current = n
        return n


_plan: ThreadPlan | None = None


def configure(requested: int | None = None, *, keep: bool = False,
              recorded: int | None = None) -> ThreadPlan:
    """Start (or restart) this process's thread plan and apply it; ``keep``: one count
    for the whole job (:meth:`ThreadPlan.keep`, ``recorded`` a resumed run's)."""
    global _plan
    if _plan is not None:
        _plan.close()
    _plan = ThreadPlan(requested)
    if keep:
        _plan.keep(recorded)
    _plan.apply()
    return _plan


def in_use() -> int | None:
    """The threads torch computes with in this job (None outside one)."""
    return _plan.current if _plan is not None else None


def release() -> None:
    """Leave the registry (the end of a job): other gym processes may use the CPUs."""
    global _plan
    if _plan is not None:
        _plan.close()
        _plan = None


def rebalance() -> int | None:
    """Re-divide the CPUs among the gym processes now running (a no-op before
    :func:`configure` or when the number is fixed); returns the threads in use."""
    return _plan.apply() if _plan is not None else None
