"""The results store: every evaluation gym makes (``python -m gym_core.eval``, and
``trainer.eval_every`` during training) as rows of one SQLite file,
``<runs root>/results.sqlite``, that the UI reads.

A row is (model, run, step, task, metric, value, examples, config digest, config, time,
source). ``model`` names what was scored (a run folder, a checkpoint's run, an exported
folder, ``base:<model>``, ``served:<url>#<name>``), ``step`` its training step (0: the base
model, -1: not known), ``digest`` the settings that decide the value (sampling, examples,
verifier: :func:`config_digest`). The same model, step, task and digest is a cached result.

Writes are transactions in WAL mode with a busy timeout, so several processes (parallel
evaluations, a training run's ``eval_every``, the UI reading) share the file safely: a
writer waits for another's transaction, a reader never sees half of one.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gym_core.base.errors import GymError

FILE = "results.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL,
    run TEXT,
    step INTEGER NOT NULL,
    task TEXT NOT NULL,
    metric TEXT NOT NULL,
    value REAL,
    examples INTEGER,
    digest TEXT NOT NULL,
    config TEXT NOT NULL,
    time REAL NOT NULL,
    source TEXT NOT NULL,
    UNIQUE (model, step, task, metric, digest)
);
CREATE INDEX IF NOT EXISTS results_run ON results (run, task);
"""


@dataclass
class Row:
    model: str
    run: str | None
    step: int
    task: str
    metric: str
    value: float | None
    examples: int
    digest: str
    config: dict[str, Any]
    time: float
    source: str = "eval"

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "run": self.run, "step": self.step, "task": self.task,
                "metric": self.metric, "value": self.value, "examples": self.examples,
                "digest": self.digest, "time": self.time, "source": self.source}


def config_digest(settings: dict[str, Any]) -> str:
    """A short, stable digest of the settings that decide a result."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Store:
    """The results store of one runs folder (``root/results.sqlite``)."""

    def __init__(self, root: str | Path, *, timeout: float = 60.0):
        self.root = Path(root).expanduser()
        self.path = self.root / FILE
        self.timeout = timeout

    def _connect(self, *, write: bool) -> sqlite3.Connection:
        if write:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.path.is_file():
            raise FileNotFoundError(self.path)
        try:
            con = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
            con.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            if write:
                con.execute("PRAGMA journal_mode = WAL")
                con.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise GymError(f"{self.path} is not a readable results store ({exc}); move it "
                           "away and evaluate again (it is rebuilt)") from None
        return con

    def write(self, rows: list[Row]) -> None:
        """Insert ``rows`` in one transaction (a row with the same model, step, task,
        metric and digest is replaced)."""
        if not rows:
            return
        con = self._connect(write=True)
        try:
            con.execute("BEGIN IMMEDIATE")
            con.executemany(
                "INSERT OR REPLACE INTO results (model, run, step, task, metric, value, "
                "examples, digest, config, time, source) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                [(r.model, r.run, r.step, r.task, r.metric, r.value, r.examples, r.digest,
                  json.dumps(r.config, sort_keys=True, default=str), r.time, r.source)
                 for r in rows])
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        finally:
            con.close()

    def cached(self, model: str, step: int, task: str, digest: str) -> list[Row]:
        """The rows of an earlier evaluation with these keys ([] when none)."""
        return self.query(model=model, step=step, task=task, digest=digest)

    def query(self, **where) -> list[Row]:
        """Rows matching every ``column=value`` given, oldest first ([] when the store
        does not exist yet)."""
        try:
            con = self._connect(write=False)
        except FileNotFoundError:
            return []
        cols = ("model", "run", "step", "task", "metric", "digest", "source")
        bad = [k for k in where if k not in cols]
        if bad:
            raise ValueError(f"unknown column(s) {bad}")
        sql = ("SELECT model, run, step, task, metric, value, examples, digest, config, time, "
               "source FROM results")
        if where:
            sql += " WHERE " + " AND ".join(f"{k} = ?" for k in where)
        try:
            rows = con.execute(sql + " ORDER BY time, id", list(where.values())).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise
        finally:
            con.close()
        return [Row(m, r, s, t, me, v, n, d, json.loads(c), ti, so)
                for m, r, s, t, me, v, n, d, c, ti, so in rows]


def now() -> float:
    return time.time()
