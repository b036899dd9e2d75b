"""The Python tool's sandbox: model-written code runs in a separate process that the
kernel confines (docs/agents.md, "The Python sandbox").

- no network: a new network namespace (``unshare --net``) with no interface up;
- one writable place: the run's temporary folder, mounted at ``/mnt/work`` (the current
  directory); the code runs as user ``nobody``, and the world-writable folders (``/tmp``,
  ``/var/tmp``, ``/dev/shm``, ``/run/lock``) are covered by empty read-only mounts in a
  new mount namespace;
- limits (``resource.setrlimit``): CPU time, address space, file size, processes;
- a new PID namespace whose init is killed with the tool: a timeout (wall clock) or an
  output flood kills every process the code started;
- output cut at ``max_output_chars``.

It needs what these take: root (to mount and to drop to ``nobody``) and a kernel that
grants namespaces. Without them the tool refuses to start and says why, in one line:
running model-written code unconfined is not an option.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import shutil
import subprocess
import tempfile
import threading
import time

from gym_core.base.errors import GymError

NOBODY = 65534
COVERED = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")

# inside the new namespaces, as root: the work folder at /mnt/work, the world-writable
# folders covered read-only, then the code as nobody (sh stays the namespace's init and
# exits with the code's status: 128 + the signal that killed it)
SCRIPT = r"""
set -e
mount -t tmpfs -o size=1m,mode=755 tmpfs /mnt
mkdir /mnt/work
mount --bind "$1" /mnt/work
for d in {dirs}; do if [ -d "$d" ]; then mount -t tmpfs -o ro,size=4k,mode=755 tmpfs "$d"; fi; done
cd /mnt/work
setpriv --reuid={uid} --regid={uid} --clear-groups --no-new-privs -- "$2" -I -B main.py
""".format(dirs=" ".join(COVERED), uid=NOBODY)


@functools.cache
def confinement_problem() -> str | None:
    """None when this machine can confine the tool, else why it cannot (one line)."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "the Python sandbox needs Linux namespaces"
    for tool in ("unshare", "setpriv", "mount"):
        if shutil.which(tool) is None:
            return f"the Python sandbox needs the '{tool}' command (util-linux), not found"
    if os.geteuid() != 0:
        return ("the Python sandbox must run as root to mount its folder and drop to user "
                "'nobody' (without it the code could write wherever this user can)")
    probe = subprocess.run(["unshare", "--net", "--mount", "--pid", "--fork", "true"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return ("this machine refuses new network/mount/PID namespaces (unshare --net "
                f"--mount --pid: {probe.stderr.strip() or probe.returncode}), so the Python "
                "tool cannot run code without network access")
    return None


class PythonSandbox:
    """``run(code) -> text``: the code's output (stdout and stderr), or a line starting
    with ``error:`` (limit hit, killed, refused). Never raises for what the code does."""

    def __init__(self, cpu_seconds: int = 5, memory_mb: int = 512, wall_seconds: float = 10.0,
                 max_output_chars: int = 2000, python: str | None = None):
        problem = confinement_problem()
        if problem is not None:
            raise GymError(f"env=python: {problem}")
        self.cpu_seconds, self.memory_mb = int(cpu_seconds), int(memory_mb)
        self.wall_seconds, self.max_output = float(wall_seconds), int(max_output_chars)
        # the system interpreter: the code needs no package of gym's, and nobody can read it
        self.python = python or shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
        if self.python is None:
            raise GymError("env=python: no python3 in /usr/local/bin, /usr/bin or /bin for the "
                           "sandbox")

    def _limits(self) -> None:
        mem = self.memory_mb * 2 ** 20
        resource.setrlimit(resource.RLIMIT_CPU, (self.cpu_seconds, self.cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 2 ** 20, 16 * 2 ** 20))
        resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    def run(self, code: str) -> str:
        work = tempfile.mkdtemp(prefix="gym-sandbox-")
        try:
            os.chown(work, NOBODY, NOBODY)
            os.chmod(work, 0o700)
            with open(os.path.join(work, "main.py"), "w") as fh:
                fh.write(code)
            return self._run(work)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _run(self, work: str) -> str:
        cmd = ["unshare", "--net", "--mount", "--pid", "--fork", "--kill-child",
               "--mount-proc", "--propagation", "private", "--",
               "sh", "-c", SCRIPT, "sh", work, self.python]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, preexec_fn=self._limits,
                                start_new_session=True, env={"PATH": "/usr/bin:/bin",
                                                             "LANG": "C.UTF-8"})
        chunks: list[bytes] = []
        size = [0]
        flooded = threading.Event()
        cap = self.max_output * 4 + 4  # bytes: enough for max_output characters

        def read():
            while True:
                block = proc.stdout.read1(65536)
                if not block:
                    return
                if size[0] < cap:
                    chunks.append(block[: cap - size[0]])
                size[0] += len(block)
                if size[0] > cap and not flooded.is_set():
                    flooded.set()
                    self._kill(proc)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        start = time.monotonic()
        try:
            code = proc.wait(timeout=self.wall_seconds)
            timed_out = False
        except subprocess.TimeoutExpired:
            self._kill(proc)
            code, timed_out = proc.wait(), True
        reader.join(timeout=5)
        proc.stdout.close()
        text = b"".join(chunks).decode("utf-8", "replace")
        cut = len(text) > self.max_output or flooded.is_set()
        text = text[: self.max_output]
        if cut:
            text += f"\n[output cut at {self.max_output} characters]"
        if timed_out:
            return (f"{text}\nerror: killed after {time.monotonic() - start:.0f} s (wall-clock "
                    f"limit {self.wall_seconds:g} s)").lstrip("\n")
        if flooded.is_set():
            return f"{text}\nerror: killed: the output passed {self.max_output} characters"
        if code < 0 or code >= 128:
            sig = -code if code < 0 else code - 128
            why = {9: "killed (CPU-time limit or out of memory)",
                   24: f"CPU-time limit of {self.cpu_seconds} s"}.get(sig, f"signal {sig}")
            return f"{text}\nerror: {why}".lstrip("\n")
        if code != 0:
            return f"{text}\nerror: exit code {code}".lstrip("\n")
        return text

    @staticmethod
    def _kill(proc) -> None:
        # unshare --kill-child takes the namespace's init, and so every process, along
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
