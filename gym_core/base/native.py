"""C++ kernels shipped as source and compiled on first use with
:mod:`torch.utils.cpp_extension` (g++ and ninja; cached under ``$TORCH_EXTENSIONS_DIR``,
default ``~/.cache/torch_extensions``, so each machine compiles a kernel once).

A kernel registers its operators with ``TORCH_LIBRARY(namespace, m)``; after
:func:`load_ops` they are ``torch.ops.<namespace>.<name>``. They run on torch's own
intra-op thread pool (``at::parallel_for``), so they never compete with a second OpenMP
runtime for the cores.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

from gym_core.base.errors import GymError


def isa_flags() -> tuple[str, list[str]]:
    """The instruction set torch dispatches to on this CPU, and the flags that let the
    compiler use it. The extension's name carries it, so a cache shared between different
    machines never hands one a binary built for the other."""
    import torch

    cap = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    flags = {"AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
             "AVX2": ["-mavx2", "-mfma"]}.get(cap, [])
    return cap.lower(), flags


@functools.cache
def load_ops(name: str, source: str, extra_flags: tuple[str, ...] = ()) -> None:
    """Compile (once per machine) and load the C++ file ``source``, registering its
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
    try:
        cpp_extension.load(
            name=f"{name}_{isa}", sources=[str(Path(source))], is_python_module=False,
            extra_cflags=["-O3", *flags, *extra_flags], verbose=False,
        )
    except (RuntimeError, OSError) as exc:
        raise GymError(f"could not compile gym's {name} kernel ({source}): {exc}") from exc
