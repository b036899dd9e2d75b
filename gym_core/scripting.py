"""gym from Python: notebooks and scripts (``import gym_core``; docs/guide.md, "From Python").

    import gym_core

    cfg = gym_core.compose(["model=tiny", "trainer.max_steps=2", "run.name=nb"])
    result = gym_core.run(cfg)                 # or gym_core.run(["model=tiny", ...])
    result.summary["eval"]["after"]            # summary.json, as a dict
    result.metrics()                           # metrics.jsonl as a pandas DataFrame
    result.paths["final"]                      # the run's folders and files
    result.export(format="hf")                 # = gym export run=runs/nb format=hf
    with result.serve() as server:             # = gym serve --base ... --variants runs/nb
        print(server.url)                      # http://127.0.0.1:<port>/v1

Every call composes its config afresh and leaves no Hydra state behind (Hydra's global
config module and the job's HydraConfig are cleared), so runs can follow each other in
one process. ``gym_core.open_run("runs/nb")`` wraps a run made earlier (by ``gym train``
too). Importing this module imports no torch; :func:`run` loads it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gym_core.base.errors import GymError

Overrides = Sequence[str] | str


def _as_list(overrides: Overrides | None) -> list[str]:
    if overrides is None:
        return []
    if isinstance(overrides, str):
        return overrides.split()
    return [str(o) for o in overrides]


@contextlib.contextmanager
def no_hydra_state() -> Iterator[None]:
    """Run the body with no Hydra global state, and leave none behind: Hydra's
    ``GlobalHydra`` (what ``initialize``/``@hydra.main`` set) and ``HydraConfig`` (the
    running job's config, which would otherwise name another run's folder and overrides)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    def clear():
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None

    clear()
    try:
        yield
    finally:
        clear()


def compose(overrides: Overrides | None = None) -> Any:
    """The config ``gym train OVERRIDES`` would run (an OmegaConf ``DictConfig``).

    ``overrides``: a list of ``key=value`` / ``group=option`` strings, or one string of them
    separated by spaces. A bad override raises :class:`GymError` with gym's one-line message.
    """
    from gym_core.plugin.startup import compose as _compose

    with no_hydra_state():
        return _compose(_as_list(overrides))


def run(config: Any = None, *, run_dir: str | os.PathLike | None = None) -> Result:
    """Run one job as ``gym train`` does (load, evaluate, train, evaluate, save, quantize)
    and return its :class:`Result`; a pipeline recipe (``+recipe=sft_then_grpo``) runs
    every stage and returns the last one's, its ``stages`` holding each.

    ``config``: a config from :func:`compose`, or overrides (a list or a string) composed
    here. ``run_dir``: where the run is written (default ``run.root/run.name``, so the
    same ``run.name`` again resumes the run, as on the command line).
    """
    from omegaconf import DictConfig

    cfg = config if isinstance(config, DictConfig) else compose(config)
    from gym_core.train.pipeline import is_pipeline

    if is_pipeline(cfg) and run_dir is None:  # a recipe of stages: each its own run
        if isinstance(config, DictConfig):
            raise GymError("a pipeline recipe runs from its overrides: gym_core.run([..., "
                           "'+recipe=<name>']) instead of a composed config")
        from gym_core.train.pipeline import run_pipeline

        with no_hydra_state():
            summaries = run_pipeline(cfg, _as_list(config))
        stages = [Result(Path(s["run_dir"]), s) for s in summaries]
        return Result(stages[-1].run_dir, stages[-1].summary, None, stages)
    if "torch" not in sys.modules:  # thread settings before torch's OpenMP runtime loads
        from gym_core.base.threads import prepare_environment

        prepare_environment()
    from gym_core.train.job import run_job

    folder = Path(run_dir) if run_dir is not None else Path(cfg.run.root) / cfg.run.name
    with no_hydra_state():
        summary = run_job(cfg, run_dir=folder)
    _record_config(cfg, folder, None if isinstance(config, DictConfig) else _as_list(config))
    return Result(folder, summary, cfg)


def _record_config(cfg, folder: Path, overrides: list[str] | None) -> None:
    """The ``.hydra/`` record ``gym train`` leaves (the UI, :func:`open_run` and
    ``model.init`` read the config there), for a run made from Python."""
    from omegaconf import OmegaConf

    from gym_core.base.files import write_text

    write_text(folder / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg))
    if overrides is not None:
        write_text(folder / ".hydra" / "overrides.yaml", OmegaConf.to_yaml(overrides))


def open_run(path: str | os.PathLike) -> Result:
    """A finished run's :class:`Result` (made by :func:`run`, ``gym train`` or the UI)."""
    folder = Path(path).expanduser()
    file = folder / "summary.json"
    if not file.is_file():
        hint = ("it has checkpoints but did not finish: run it again with the same run.name"
                if (folder / "checkpoints").is_dir() else "is it a gym run folder?")
        raise GymError(f"{folder} holds no summary.json ({hint})")
    try:
        summary = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise GymError(f"{file} is not valid JSON ({exc})") from None
    cfg = None
    recorded = folder / ".hydra" / "config.yaml"
    if recorded.is_file():
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(recorded)
    return Result(folder, summary, cfg)


@dataclass
class Result:
    """One run: its folder, ``summary.json`` and config; its metrics, export and serving."""

    run_dir: Path
    summary: dict[str, Any]
    config: Any = None  # the DictConfig it ran with (None when not recorded)
    #: a pipeline's stages, in order (this result is the last one's); empty for one run
    stages: list[Result] = field(default_factory=list)

    @property
    def accuracy(self) -> float | None:
        """The held-out score at the end (after quantization when the run quantized)."""
        ev = self.summary.get("eval") or {}
        return ev.get("after_quant") if ev.get("after_quant") is not None else ev.get("after")

    @property
    def paths(self) -> dict[str, Path]:
        """The run's files and folders that exist: ``run_dir``, ``summary``, ``metrics``
        (metrics.jsonl), ``final`` (the trained adapter or model), ``delta`` (the
        quantized delta file), ``checkpoints``, ``tensorboard``, ``config`` (.hydra/)."""
        d = self.run_dir
        out = {"run_dir": d, "summary": d / "summary.json", "metrics": d / "metrics.jsonl",
               "final": d / "final", "checkpoints": d / "checkpoints",
               "tensorboard": d / "tensorboard", "config": d / ".hydra" / "config.yaml"}
        delta = (self.summary.get("quant_stats") or {}).get("delta_file")
        if delta:
            out["delta"] = Path(delta)
        return {k: p for k, p in out.items() if p.exists()}

    def metrics_rows(self) -> list[dict[str, Any]]:
        """metrics.jsonl as a list of dicts, one per step (no pandas needed)."""
        file = self.run_dir / "metrics.jsonl"
        if not file.is_file():
            return []
        rows = []
        for line in file.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):  # a torn last line of a killed run
                rows.append(json.loads(line))
        return rows

    def metrics(self):
        """metrics.jsonl as a pandas DataFrame indexed by step (pandas is optional:
        :meth:`metrics_rows` gives the same rows as dicts)."""
        try:
            import pandas as pd
        except ImportError:
            raise GymError("Result.metrics() returns a pandas DataFrame and pandas is not "
                           "installed: pip install pandas, or use Result.metrics_rows() "
                           "(a list of dicts)") from None
        frame = pd.DataFrame(self.metrics_rows())
        return frame.set_index("step") if "step" in frame else frame

    def export(self, format: str = "hf", **options: Any):
        """Export this run: :func:`export_run` with ``run`` set to it."""
        return export_run(self.run_dir, format=format, **options)

    def serve(self, base: str | None = None, **options: Any) -> Server:
        """Serve this run (its delta, else its LoRA adapter) beside its base model:
        :func:`start_server` with ``variants=[run_dir]``; ``base`` defaults to the run's
        (``smollm2``, ``tiny``, or ``model.path`` of ``model=local``)."""
        if base is None:
            model = self.config.get("model") if self.config is not None else None
            source = model.get("source") if model is not None else "smollm2"
            base = model.get("path") if source == "local" else source
        variants = [*options.pop("variants", []), str(self.run_dir)]
        return start_server(base=base, variants=variants, **options)

    def evaluate(self, *args: str) -> subprocess.CompletedProcess:
        """Evaluate this run with ``gym eval``: :func:`evaluate` with ``run=<run_dir>``."""
        return evaluate(f"run={self.run_dir}", *args)


def export_run(run: str | os.PathLike, format: str = "hf", *, source: str | None = None,
               out: str | os.PathLike | None = None, hf_dtype: str = "float32",
               gguf_outtype: str = "f16"):
    """``gym export run=RUN format=FORMAT``: returns the export's result (``.out``, the
    folder or file written; ``.files``, each with its size)."""
    from omegaconf import OmegaConf

    from gym_core.export import ExportAppConfig, GgufExportConfig, HfExportConfig, export
    from gym_core.plugin.startup import bootstrap

    cfg = OmegaConf.structured(ExportAppConfig(
        run=str(run), format=format, source=source, out=None if out is None else str(out),
        hf=HfExportConfig(dtype=hf_dtype), gguf=GgufExportConfig(outtype=gguf_outtype)))
    return export(cfg, bootstrap())


@dataclass
class Server:
    """A running ``gym serve`` in this process (a background thread); stop it with
    :meth:`stop` or use it as a context manager."""

    url: str  # http://host:port/v1
    host: str
    port: int
    api_key: str | None
    app: Any = field(repr=False)
    _server: Any = field(repr=False)
    _thread: threading.Thread = field(repr=False)
    _engine: Any = field(repr=False)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._engine.stop()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(base: str = "smollm2", variants: Sequence[str] = (), *,
                 host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                 max_num_seqs: int = 64, max_model_len: int | None = None,
                 served_model_name: str | None = None, log_level: str = "warning") -> Server:
    """``gym serve`` in a background thread of this process: the base model and its
    variants over the OpenAI-compatible API; returns once it listens. ``port=0`` picks a
    free port (``Server.port``). Loopback by default; ``api_key`` requires
    ``Authorization: Bearer KEY``."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise GymError(f"start_server needs {' and '.join(missing)}: install gym's serve "
                       "extra (pip install 'gym-core[serve]')")
    import uvicorn

    from gym_core.serve.__main__ import build, parse_args

    argv = ["--base", str(base), "--host", host, "--port", str(port),
            "--max-num-seqs", str(max_num_seqs), "--log-level", log_level]
    if variants:
        argv += ["--variants", *map(str, variants)]
    if max_model_len is not None:
        argv += ["--max-model-len", str(max_model_len)]
    if served_model_name is not None:
        argv += ["--served-model-name", served_model_name]
    if api_key is not None:
        argv += ["--api-key", api_key]
    args = parse_args(argv)
    app, engine = build(args)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    failed: list[BaseException] = []

    def serve():
        try:
            server.run()
        except BaseException as exc:  # reported by the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=serve, name="gym-serve", daemon=True)
    thread.start()
    while not server.started:
        thread.join(timeout=0.05)
        if not thread.is_alive():
            engine.stop()
            why = f": {failed[0]}" if failed else ""
            raise GymError(f"the server did not start on {host}:{port}{why}")
    bound_host, bound_port = server.servers[0].sockets[0].getsockname()[:2]
    url = f"http://{bound_host}:{bound_port}/v1"
    return Server(url, bound_host, bound_port, args.api_key, app, server, thread, engine)


def evaluate(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``gym eval ARGS`` (the ``gym_core.eval`` program) in a child process, its output
    shown as it runs; returns the finished process (``check``: raise :class:`GymError`
    when it fails). The hook for evaluation from Python: it runs whatever arguments that
    program takes, so it follows the program as it grows."""
    import importlib.util

    if importlib.util.find_spec("gym_core.eval.__main__") is None:
        raise GymError("gym_core.evaluate runs `python -m gym_core.eval`, which this "
                       "install of gym-core does not have yet")
    done = subprocess.run([sys.executable, "-m", "gym_core.eval", *args], check=False)
    if check and done.returncode != 0:
        raise GymError(f"gym eval {' '.join(args)} failed with exit status {done.returncode}")
    return done
