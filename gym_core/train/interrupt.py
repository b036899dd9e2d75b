"""SIGINT (Ctrl-C) and SIGTERM (a scheduler's pre-emption) during a job.

While the training loop runs, a signal is a request: the step in progress finishes, a
checkpoint is written, and the job ends with one line saying where it was saved and how
to resume (exit status 130 for SIGINT, 143 for SIGTERM). Outside the loop (loading,
evaluating, quantizing) there is no step to finish, so the job stops at once, with the
same line. A second signal exits at once without a checkpoint (under torchrun, one
within a second of the first is taken for the same one: torchrun forwards the terminal's
Ctrl-C to its workers, which then see it twice);
writes in progress are abandoned whole (gym_core.base.files), so the previous checkpoint
stays the newest.

Under torchrun every rank gets the signal (the terminal signals the whole process group;
torchrun forwards SIGTERM); the ranks agree on the step to stop after through one
all-reduced number per step (:meth:`StopRequest.agreed`), since a rank that stopped alone
would leave the others waiting in the next collective.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

from gym_core.base.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_GRACE_SECONDS = 1.0  # under torchrun, repeats within this are its forwarded copy


def _grace() -> float:
    """Seconds after a first signal in which a second is the same request: only under
    torchrun (its environment), whose forwarding doubles a Ctrl-C; otherwise none, so a
    second Ctrl-C always exits at once."""
    import os

    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ
    return _GRACE_SECONDS if under_torchrun else 0.0


class StopRequest:
    """The signal handlers of one job (installed in the main thread only: a job run in a
    thread, e.g. from a UI, leaves signals to its host). ``describe()`` gives the line
    printed when the job stops outside the loop."""

    def __init__(self, describe, *, show: bool = True) -> None:
        self.describe = describe  # (signum, where) -> the one line
        self.show = show  # rank 0 prints; the other ranks exit with the same status
        self.signum: int | None = None
        self.deferred = False  # inside the training loop: stop at the next step's end
        self._at = 0.0
        self._grace = _grace()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            if time.monotonic() - self._at < self._grace:
                return
            if self.show:
                print(f"\ngym: {signal.Signals(signum).name} again: exiting at once, without a "
                      "checkpoint for the steps since the last one", file=sys.stderr, flush=True)
            raise SystemExit(128 + self.signum)
        self.signum, self._at = signum, time.monotonic()
        if not self.deferred:
            raise Interrupted(signum, self.describe(signum, None), show=self.show)
        if self.show:
            print(f"\ngym: {signal.Signals(signum).name}: stopping after the current step "
                  "with a checkpoint (again to exit at once, without one)",
                  file=sys.stderr, flush=True)

    def agreed(self, dist) -> int | None:
        """The signal to stop on, the same on every rank (one all-reduced number per
        step under torchrun); None to go on."""
        mine = float(self.signum or 0)
        if dist.enabled:
            mine = max(dist.all_reduce_max([mine]))
        return int(mine) or None


def resume_command(cfg, run_dir: Path, dist) -> str:
    """The command that continues this job: the same overrides (and its run.name)."""
    import shlex

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():  # run_job called in-process
        return f"the same job again on {run_dir}"
    launcher = (f"torchrun --nproc_per_node={dist.world} -m gym_core" if dist.enabled
                else "python -m gym_core")
    hc = HydraConfig.get()
    args = list(hc.overrides.task)
    if not any(a.startswith("run.name=") for a in args):
        args.append(f"run.name={cfg.run.name}")
    if hc.mode == RunMode.MULTIRUN:  # one job of a sweep: run it alone, in its folder
        args.append(f"hydra.run.dir={hc.runtime.output_dir}")
    return " ".join([launcher, *(shlex.quote(a) for a in args)])


def interrupted_line(cfg, run_dir: Path, signum: int, step: int | None, dist) -> str:
    """The one line a stopped job prints: what was saved, where, how to resume."""
    from gym_core.train.checkpoint import list_checkpoints

    how = signal.Signals(signum).name
    checkpoints = list_checkpoints(run_dir)
    command = resume_command(cfg, run_dir, dist)
    if step is not None:
        return (f"interrupted by {how} at step {step}; checkpoint saved in "
                f"{checkpoints[-1][1]}; resume with: {command}")
    if checkpoints:
        at, path = checkpoints[-1]
        return (f"interrupted by {how} outside a training step; the newest checkpoint is "
                f"{path} (step {at}); resume with: {command}")
    return (f"interrupted by {how} before the first checkpoint, so there is nothing to "
            f"resume from; start again with: {command}")
