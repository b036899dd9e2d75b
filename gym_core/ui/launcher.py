"""Runs launched from the New run page: each is a ``python -m gym_core ...`` subprocess
(a crash of the run never takes the UI down) in a session of its own, so it outlives the
UI and a Ctrl-C in the UI's terminal does not reach it. Its output goes to a log file in
the UI's own temporary folder, never into the runs folder (a launch the UI refuses
writes nothing anywhere). Stop is SIGTERM: the job finishes its step, writes a
checkpoint and exits; resume is the same command again.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from gym_core.base.errors import GymError
from gym_core.ui.runs import lock_holder

OUTPUT_LINES = 400  # lines of a job's output the page shows (the end of its log)


@dataclass
class Job:
    run_dir: Path
    overrides: list[str]
    proc: subprocess.Popen
    log: Path
    started: float = field(default_factory=time.time)
    stopping: bool = False

    @property
    def output(self) -> list[str]:
        """The last lines of the job's output (a progress bar's redraws: the last one)."""
        try:
            with open(self.log, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 200_000))
                data = fh.read().decode("utf-8", "replace")
        except OSError:
            return []
        lines = [ln.rsplit("\r", 1)[-1] for ln in data.split("\n")]
        return [ln for ln in lines if ln.strip()][-OUTPUT_LINES:]

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    @property
    def state(self) -> str:
        code = self.returncode
        if code is None:
            return "stopping" if self.stopping else "training"
        if code == 0:
            return "finished"
        if self.stopping or code in (-signal.SIGTERM, 128 + signal.SIGTERM):
            return "stopped"
        return f"failed (exit {code})"

    def error_line(self) -> str | None:
        """The job's one-line error (``gym: error: ...``), or its last output line when
        it failed without one."""
        lines = list(self.output)
        for line in reversed(lines):
            if line.startswith("gym: error:"):
                return line.removeprefix("gym: error:").strip()
        code = self.returncode
        if code not in (None, 0) and not self.stopping:
            return lines[-1] if lines else f"exit status {code}"
        return None


class Launcher:
    """The jobs this UI started, by resolved run directory."""

    def __init__(self, cwd: Path | None = None) -> None:
        self.cwd = Path(cwd or Path.cwd())
        self.jobs: dict[Path, Job] = {}
        self._lock = threading.Lock()
        self._logs: Path | None = None

    def _log_path(self, run_dir: Path) -> Path:
        if self._logs is None:
            self._logs = Path(tempfile.mkdtemp(prefix="gym-ui-"))
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return self._logs / f"{run_dir.name}-{stamp}-{len(self.jobs)}.log"

    def job(self, run_dir: Path) -> Job | None:
        return self.jobs.get(self._key(run_dir))

    def _key(self, run_dir: Path) -> Path:
        p = Path(run_dir)
        return (p if p.is_absolute() else self.cwd / p).resolve()

    def busy(self, run_dir: Path) -> str | None:
        """Why a job cannot start in ``run_dir`` now, or None."""
        job = self.job(run_dir)
        if job is not None and job.running:
            return (f"run '{Path(run_dir).name}' is already training (process {job.pid}, "
                    "started from this page): stop it first, or pick another run.name")
        pid = lock_holder(self._key(run_dir))
        if pid is not None:
            return (f"run directory {self._key(run_dir)} is in use by process {pid}: wait for "
                    "it to end, stop it, or pick another run.name")
        return None

    def launch(self, overrides: list[str], run_dir: Path) -> Job:
        with self._lock:
            why = self.busy(run_dir)
            if why:
                raise GymError(why)
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            log = self._log_path(Path(run_dir))
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "gym_core", *overrides], cwd=self.cwd, env=env,
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True)
            job = Job(self._key(run_dir), list(overrides), proc, log)
            self.jobs[job.run_dir] = job
        return job

    def stop(self, run_dir: Path) -> int:
        """SIGTERM to the job training in ``run_dir`` (started here, or any process holding
        the run's lock); returns its process id."""
        job = self.job(run_dir)
        if job is not None and job.running:
            job.stopping = True
            job.proc.send_signal(signal.SIGTERM)  # the job checkpoints and exits
            return job.pid
        pid = lock_holder(self._key(run_dir))
        if pid is None:
            raise GymError(f"run '{Path(run_dir).name}' is not training")
        os.kill(pid, signal.SIGTERM)
        return pid

    def still_running(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.running]

    def close(self) -> None:
        """Remove the logs folder, unless a job still writes to it."""
        if self._logs is not None and not self.still_running():
            shutil.rmtree(self._logs, ignore_errors=True)
