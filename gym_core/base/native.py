"""C++ kernels shipped as source and compiled on first use with
:mod:`torch.utils.cpp_extension` (g++ and ninja), so each environment compiles a kernel
once.

Where: ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) /
``gym-<gym version>-torch-<torch version>-py<X.Y>-<hash of the environment>``: one folder per
gym version, torch build and Python environment (``sys.prefix``), so two virtual
environments never share (and never rebuild over each other's) binaries.

A build holds an OS lock (``flock(2)``, like the run lock of :mod:`gym_core.train.rundir`)
on ``<folder>/<kernel>.lock`` while torch compiles and loads: the kernel releases it when
the process ends, however it ends, so a build killed half-way never blocks the next
start. torch's own lock file (``<kernel>/lock``, which a killed build leaves behind and
every later start would wait on forever) is stale whenever gym holds its lock, and is
removed. A build another live process is running is waited for up to
``GYM_BUILD_TIMEOUT`` seconds (default 900), then refused in one line naming it.

A kernel registers its operators with ``TORCH_LIBRARY(namespace, m)``; after
:func:`load_ops` they are ``torch.ops.<namespace>.<name>``. They run on torch's own
intra-op thread pool (``at::parallel_for``), so they never compete with a second OpenMP
runtime for the cores.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

from gym_core.base.errors import GymError
from gym_core.base.lock import FileLock, holder


def isa_flags() -> tuple[str, list[str]]:
    """The instruction set torch dispatches to on this CPU, and the flags that let the
    compiler use it. The extension's name carries it, so a cache shared between different
    machines never hands one a binary built for the other."""
    import torch

    cap = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    flags = {"AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
             "AVX2": ["-mavx2", "-mfma"]}.get(cap, [])
    return cap.lower(), flags


def build_root() -> Path:
    """This environment's folder of compiled kernels (see the module's docstring)."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    from gym_core import __version__

    env = hashlib.sha256(os.path.realpath(sys.prefix).encode()).hexdigest()[:12]
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    tag = f"gym-{__version__}-torch-{torch.__version__}-py{py}-{env}".replace("+", "_")
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / tag


def _timeout() -> float:
    raw = os.environ.get("GYM_BUILD_TIMEOUT", "900")
    try:
        return max(float(raw), 0.0)
    except ValueError:
        raise GymError(f"GYM_BUILD_TIMEOUT={raw!r} is not a number of seconds") from None


@contextlib.contextmanager
def build_lock(root: Path, name: str):
    """Hold ``<root>/<name>.lock`` (flock) for one build; wait for a live holder up to
    ``GYM_BUILD_TIMEOUT`` seconds (saying so once), then raise :class:`GymError`."""
    path = root / f"{name}.lock"
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(path)
    except OSError as exc:
        raise GymError(f"cannot write gym's compiled kernels in {root} ({exc.strerror}): "
                       "make it writable, or point TORCH_EXTENSIONS_DIR at a writable "
                       "folder") from None
    try:
        deadline, said = time.monotonic() + _timeout(), False
        while not lock.try_lock({"pid": os.getpid()}):
            pid = (holder(path) or {}).get("pid")
            who = f"process {pid}" if pid else "another process"
            if time.monotonic() >= deadline:
                raise GymError(
                    f"gym's {name} kernel is being compiled by {who} and it did not finish "
                    f"within GYM_BUILD_TIMEOUT={_timeout():g} seconds ({path}): wait for it, "
                    "stop it, or raise GYM_BUILD_TIMEOUT")
            if not said:
                print(f"gym: waiting for {who} to finish compiling gym's {name} kernel",
                      file=sys.stderr, flush=True)
                said = True
            time.sleep(0.2)
        yield
    finally:
        lock.close()


@functools.cache
def load_ops(name: str, source: str, extra_flags: tuple[str, ...] = ()) -> None:
    """Compile (once per environment) and load the C++ file ``source``, registering its
    ``TORCH_LIBRARY`` operators in this process."""
    from torch.utils import cpp_extension

    missing = [tool for tool in ("g++", "ninja") if shutil.which(tool) is None
               and not (tool == "g++" and os.environ.get("CXX"))]
    if missing:
        raise GymError(
            f"compiling gym's {name} kernel needs {' and '.join(missing)}, which this machine "
            "lacks: install them (Debian: apt-get install g++ ninja-build; or pip install ninja)"
        )
    isa, flags = isa_flags()
    full = f"{name}_{isa}"
    root = build_root()
    folder = root / full
    with build_lock(root, full):
        # only a holder of gym's lock builds here: torch's lock file is a killed build's
        with contextlib.suppress(FileNotFoundError):
            (folder / "lock").unlink()
        folder.mkdir(parents=True, exist_ok=True)
        built = folder / f"{full}.so"
        if not built.is_file() or built.stat().st_mtime < Path(source).stat().st_mtime:
            # g++ -O3 against torch's headers takes a while: say what the wait is
            print(f"gym: compiling gym's {name} kernel for this environment (once) in {folder}",
                  file=sys.stderr, flush=True)
        try:
            cpp_extension.load(
                name=full, sources=[str(Path(source))], is_python_module=False,
                extra_cflags=["-O3", *flags, *extra_flags], build_directory=str(folder),
                verbose=False,
            )
        except (RuntimeError, OSError) as exc:
            raise GymError(f"could not compile gym's {name} kernel ({source}): {exc}") from exc
