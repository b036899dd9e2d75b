"""What the Runs page shows, read from a runs folder without changing it: every run
(``summary.json``, ``metrics.jsonl``, ``checkpoints/``, ``.hydra/``) and every sweep
(a folder of job folders, ranked by :func:`gym_core.train.sweep.objective`).

Nothing here writes; a file that cannot be read (a half-written or damaged summary, a
metrics line still being written) becomes a message on the run's row, never an
exception that would take the page down. No torch: the page loads in a second.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gym_core.base.errors import GymError
from gym_core.base.lock import held_by
from gym_core.train.sweep import objective

#: the run directory's lock file (gym_core.train.rundir): held (flock) while a job runs in it
LOCK_NAME = ".gym.lock"


@dataclass
class Run:
    """One run directory as the page shows it."""

    path: Path
    name: str  # relative to the runs folder: "a", or "sweep/0" for a sweep's job
    summary: dict[str, Any] | None = None
    error: str | None = None  # why summary.json (or another file) could not be read
    config: dict[str, Any] | None = None  # .hydra/config.yaml, when readable
    checkpoints: list[int] = field(default_factory=list)  # steps with a checkpoint
    metrics_rows: int = 0
    modified: float = 0.0
    before: float | None = None  # eval_before.json: the starting score, before a summary
    pid: int | None = None  # the process training in it now (holding its lock), if any

    @property
    def model(self) -> str:
        if self.summary:
            return str(self.summary.get("model", ""))
        m = (self.config or {}).get("model") or {}
        return str(m.get("path") or m.get("source") or "")

    @property
    def status(self) -> str:
        if self.pid is not None:
            return f"training (pid {self.pid})"
        if self.summary is not None:
            return "finished"
        if self.error:
            return "unreadable"
        if self.checkpoints:
            return f"stopped at step {self.checkpoints[-1]}"
        return "started" if self.metrics_rows or self.config else "empty"

    @property
    def eval(self) -> dict[str, Any]:
        return (self.summary or {}).get("eval") or {}

    @property
    def algorithm(self) -> str | None:
        if self.summary:
            return self.summary.get("algorithm")
        return ((self.config or {}).get("algorithm") or {}).get("name")

    @property
    def quant(self) -> str | None:
        if self.summary:
            return self.summary.get("quant")
        return ((self.config or {}).get("quant") or {}).get("name")

    def row(self) -> dict[str, Any]:
        """The Runs table's row (plain values, formatted for display)."""
        s = self.summary or {}
        q = s.get("quant_stats") or {}
        ev = self.eval
        return {
            "name": self.name, "status": self.status, "algorithm": self.algorithm or "",
            "quant": self.quant or "", "model": self.model,
            "steps": s.get("steps", self.metrics_rows or ""),
            "before": fmt_score(ev.get("before", self.before)), "after": fmt_score(ev.get("after")),
            "after_quant": fmt_score(ev.get("after_quant")),
            "delta": fmt_bytes(q.get("delta_bytes")) if q else "",
            "bits": q.get("bits_per_weight", "") if q else "",
            "error": self.error or "",
        }


@dataclass
class Sweep:
    """A multirun folder: its jobs, best first (sweep_summary.json's order and rule)."""

    path: Path
    name: str
    jobs: list[Run]

    def ranked(self) -> list[Run]:
        def key(run: Run):
            score = objective(run.summary) if run.summary else None
            return (score is None, -(score or 0.0), _job_order(run.path.name))
        return sorted(self.jobs, key=key)


def fmt_score(x) -> str:
    return "" if x is None else f"{x:.3f}"


def fmt_bytes(n) -> str:
    if n is None:
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _job_order(name: str):
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def check_root(root: str | Path) -> Path:
    """The runs folder, or a :class:`GymError` saying why it cannot be listed."""
    p = Path(root).expanduser()
    if not p.exists():
        raise GymError(f"runs folder {str(root)!r} does not exist (looked in {p.resolve()}); "
                       "give the folder your runs are in (run.root, 'runs' by default)")
    if not p.is_dir():
        raise GymError(f"runs folder {str(root)!r} is a file, not a folder")
    return p


def is_run_dir(p: Path) -> bool:
    return any((p / f).exists() for f in ("summary.json", "metrics.jsonl", ".hydra",
                                          "checkpoints", LOCK_NAME))


def is_sweep_dir(p: Path) -> bool:
    if (p / "sweep_summary.json").is_file() or (p / "multirun.yaml").is_file():
        return True
    return (not (p / "summary.json").exists()
            and any(c.is_dir() and c.name.isdigit() and is_run_dir(c) for c in _children(p)))


def _children(p: Path) -> list[Path]:
    try:
        return sorted(c for c in p.iterdir() if not c.name.startswith("."))
    except OSError:
        return []


def scan(root: str | Path) -> tuple[list[Run], list[Sweep]]:
    """Every run and sweep under ``root`` (newest first)."""
    root = check_root(root)
    runs, sweeps = [], []
    for p in _children(root):
        if not p.is_dir():
            continue
        if is_sweep_dir(p):
            jobs = [read_run(c, root) for c in _children(p) if c.is_dir() and is_run_dir(c)]
            sweeps.append(Sweep(p, p.name, jobs))
        elif is_run_dir(p):
            runs.append(read_run(p, root))
    runs.sort(key=lambda r: -r.modified)
    sweeps.sort(key=lambda s: -max([j.modified for j in s.jobs] or [0.0]))
    return runs, sweeps


def read_run(path: Path, root: Path | None = None) -> Run:
    name = str(path.relative_to(root)) if root is not None else path.name
    run = Run(path=path, name=name)
    stamps = []
    summary = path / "summary.json"
    if summary.exists():
        try:
            run.summary = read_json_object(summary)
            stamps.append(summary.stat().st_mtime)
        except GymError as exc:
            run.error = str(exc)
    config = path / ".hydra" / "config.yaml"
    if config.is_file():
        try:
            import yaml

            loaded = yaml.safe_load(config.read_text(encoding="utf-8"))
            run.config = loaded if isinstance(loaded, dict) else None
        except (OSError, ValueError, yaml.YAMLError):
            run.config = None  # the summary's fields are enough to list the run
        stamps.append(config.stat().st_mtime)
    before = path / "eval_before.json"
    if run.summary is None and before.is_file():
        try:
            run.before = read_json_object(before).get("accuracy")
        except GymError:
            run.before = None  # written atomically by the job; unreadable means damaged
    ckpt = path / "checkpoints"
    if ckpt.is_dir():
        run.checkpoints = sorted(int(c.name[5:]) for c in ckpt.iterdir()
                                 if c.name.startswith("step-") and c.name[5:].isdigit())
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        run.metrics_rows = len(MetricsTail(metrics).read()[0])
        stamps.append(metrics.stat().st_mtime)
    run.modified = max(stamps or [path.stat().st_mtime])
    run.pid = lock_holder(path)
    return run


def read_json_object(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise GymError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GymError(f"{path}: not valid JSON at line {exc.lineno} column {exc.colno} "
                       f"({exc.msg}): half-written or damaged; the run's other files are "
                       "listed as they are") from None
    if not isinstance(data, dict):
        raise GymError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


class MetricsTail:
    """Reads ``metrics.jsonl`` as it grows: each :meth:`read` returns the rows appended
    since the last call. A line still being written (no newline yet) waits for the next
    call; a file replaced underneath (a resumed run drops rows past its checkpoint,
    rewriting the file atomically) is read again from the start (``reset`` is then True).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.offset = 0
        self.inode: int | None = None

    def read(self) -> tuple[list[dict[str, Any]], bool]:
        try:
            st = os.stat(self.path)
        except OSError:
            return [], False
        reset = False
        if st.st_ino != self.inode or st.st_size < self.offset:
            reset = self.inode is not None
            self.offset, self.inode = 0, st.st_ino
        if st.st_size == self.offset:
            return [], reset
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read(st.st_size - self.offset)
        end = data.rfind(b"\n") + 1  # whole lines only
        self.offset += end
        rows = []
        for line in data[:end].splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a damaged line: the curve skips it
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
        return rows, reset


#: metrics shown first, when a run has them (the rest follow alphabetically)
PREFERRED = ["loss", "reward", "reward_mean", "rewards/margins", "kl", "tokens_per_second",
             "completion_length",
             "grad_norm", "lr"]


def metric_names(rows: list[dict[str, Any]]) -> list[str]:
    keys = {k for r in rows for k, v in r.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    first = [k for k in PREFERRED if k in keys]
    return first + sorted(keys - set(first))


def lock_holder(run_dir: Path) -> int | None:
    """The process id holding ``run_dir``'s lock (:mod:`gym_core.train.rundir`) while a job
    runs in it, else None, without touching the lock (:func:`gym_core.base.lock.held_by`)."""
    return held_by(Path(run_dir) / LOCK_NAME)


def resume_overrides(run: Run) -> list[str] | None:
    """The overrides the run was started with (``.hydra/overrides.yaml``), with its name
    and root pinned: launching them again resumes it from its newest checkpoint."""
    import yaml

    from gym_core.ui.configs import quote

    path = run.path / ".hydra" / "overrides.yaml"
    try:
        recorded = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(recorded, list):
        return None
    keep = [str(o) for o in recorded
            if str(o).split("=")[0].lstrip("+~") not in ("run.name", "run.root")]
    return [*keep, f"run.root={quote(str(run.path.parent))}", f"run.name={quote(run.path.name)}"]


def run_path(root: str | Path, name: str) -> Path:
    """The run ``name`` of the runs folder ``root``; a :class:`GymError` when there is none
    or when ``name`` (``..``, an absolute path, a symlink) leads outside the folder."""
    folder = check_root(root)
    base = folder.resolve()
    path = (base / name).resolve() if name else base
    if path == base or base not in path.parents:
        raise GymError(f"there is no run {name!r} in {root} (a run is a folder inside the "
                       "runs folder)")
    if not path.is_dir():
        raise GymError(f"there is no run {name!r} in {root}")
    return folder / name


@dataclass
class Samples:
    """Completions of one step of a run's rollout buffer, as the run page shows them."""

    step: int
    total: int  # completions the step recorded
    rows: list[dict[str, Any]]  # the first few: prompt, completion, reward, log-probs, staleness


def rollout_steps(run_dir: Path) -> list[int]:
    """The steps with a file in the run's rollout buffer (``rollouts/step-N.parquet``)."""
    from gym_core.sampling.buffer import FOLDER

    names = [p.name for p in _children(run_dir / FOLDER)]
    return sorted(int(n[5:-8]) for n in names
                  if n.startswith("step-") and n.endswith(".parquet") and n[5:-8].isdigit())


def read_samples(run_dir: Path, step: int | None = None, limit: int = 8) -> Samples:
    """The first ``limit`` completions of ``step`` (the last recorded step by default) from
    ``run_dir``'s rollout buffer; a :class:`GymError` naming the step or the file when it
    is not there, leads outside the run folder or cannot be read. Reads, never writes."""
    from gym_core.sampling.buffer import FOLDER, step_file

    steps = rollout_steps(run_dir)
    if not steps:
        raise GymError(f"{run_dir / FOLDER} has no rollouts: online methods record them "
                       "with trainer.rollout_buffer=true")
    step = steps[-1] if step is None else int(step)
    if step not in steps:
        raise GymError(f"step {step} has no rollouts in {run_dir / FOLDER}; recorded steps: "
                       f"{_ranges(steps)}")
    path = step_file(run_dir, step)
    if Path(run_dir).resolve() not in path.resolve().parents:
        raise GymError(f"{path} leads outside the run folder {run_dir}; it is not read")
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(str(path), columns=[
            "prompt", "completion", "reward", "behaviour_logprobs", "completion_ids",
            "staleness", "policy_version"])
        rows = table.to_pylist()
    except ImportError:
        raise GymError("the rollout samples need pyarrow: pip install pyarrow") from None
    except Exception as exc:  # pyarrow's errors have no common base
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GymError(f"{path} is not a readable Parquet file ({first}); delete it, the "
                       "other steps stay readable") from None
    shown = []
    for r in rows[:max(0, limit)]:
        logp = [x for x in (r.get("behaviour_logprobs") or []) if x is not None]
        shown.append({
            "prompt": r.get("prompt") or "", "completion": r.get("completion") or "",
            "reward": r.get("reward"), "tokens": len(r.get("completion_ids") or []),
            "logp_sum": sum(logp) if logp else None,
            "logp_mean": sum(logp) / len(logp) if logp else None,
            "staleness": r.get("staleness"), "policy_version": r.get("policy_version")})
    return Samples(step=step, total=len(rows), rows=shown)


def _ranges(steps: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    spans: list[list[int]] = []
    for s in steps:
        if spans and s == spans[-1][1] + 1:
            spans[-1][1] = s
        else:
            spans.append([s, s])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
