"""``experience_store=sqlite``: the library in a SQLite database that several processes
(the jobs of a multirun sweep) can share.

WAL mode lets readers work while one process writes. Each batch of operations is one
``BEGIN IMMEDIATE`` transaction: the writer takes the write lock *before* reading the
library, so two processes can never both read version n and overwrite each other's
version n+1 (no lost updates); others wait up to ``busy_timeout_s``. A crash mid-batch
rolls the transaction back. Every batch also records the library as it stood after it,
per writer (the run directory) and step, so each run can be inspected or resumed at
any of its steps.

Schema::

    meta(key PRIMARY KEY, value)             format = gym.experiences/1, next_key
    experiences(key INTEGER PRIMARY KEY, text)
    versions(writer, step, library JSON, PRIMARY KEY (writer, step))
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from gym_cl_grpo import SqliteStoreConfig
from gym_cl_grpo.experience import (
    FORMAT,
    ApplyResult,
    Experience,
    ExperienceStore,
    Operation,
    apply_operations,
)
from gym_core.api import GymError

_HEADER = b"SQLite format 3\x00"
_SCHEMA = {
    "meta": {"key", "value"},
    "experiences": {"key", "text"},
    "versions": {"writer", "step", "library"},
}
_CREATE = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS experiences (key INTEGER PRIMARY KEY, text TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    writer TEXT NOT NULL, step INTEGER NOT NULL, library TEXT NOT NULL,
    PRIMARY KEY (writer, step)
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('format', '{format}'), ('next_key', '0');
"""


class SqliteStore(ExperienceStore):
    Config = SqliteStoreConfig
    default_filename = "library.sqlite"

    def __init__(self, cfg, path: Path, writer: str = "default") -> None:
        super().__init__(cfg, path, writer)
        if self.path.exists() and self.path.stat().st_size and not self.recognizes(self.path):
            raise GymError(
                f"{self.path} is not a SQLite database; gym leaves it untouched. Point "
                "experience_store.path at another file to start a new library"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        timeout = float(getattr(cfg, "busy_timeout_s", 60.0))
        try:
            # isolation_level=None: no implicit transactions; each batch opens its own
            self.db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
            self._check_or_create()  # before any PRAGMA, which would rewrite a foreign file
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")  # a committed batch survives a crash
        except sqlite3.DatabaseError as exc:
            raise GymError(f"cannot open the experience library {self.path}: {exc}") from None

    def _check_or_create(self) -> None:
        tables = {r[0] for r in self.db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            with self._transaction():  # IF NOT EXISTS: another process may win the race
                for stmt in _CREATE.format(format=FORMAT).split(";"):
                    if stmt.strip():
                        self.db.execute(stmt)
            tables = set(_SCHEMA)
        wrong = []
        for table, columns in _SCHEMA.items():
            have = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
            if not columns <= have:
                wrong.append(f"{table} has columns {sorted(have)}, expected {sorted(columns)}")
        fmt = None
        if not wrong:
            row = self.db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
            fmt = row[0] if row else None
            if fmt != FORMAT:
                wrong.append(f"its format is {fmt!r}, not {FORMAT!r}")
        if wrong:
            self.db.close()
            raise GymError(
                f"{self.path} is a SQLite database but not a gym experience library of the "
                f"expected schema ({'; '.join(wrong)}; tables: {', '.join(sorted(tables))}). "
                "gym leaves it untouched: point experience_store.path at another file"
            )

    class _Tx:
        def __init__(self, db):
            self.db = db

        def __enter__(self):
            self.db.execute("BEGIN IMMEDIATE")  # the write lock first: no lost updates

        def __exit__(self, exc_type, *_):
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")

    def _transaction(self):
        return self._Tx(self.db)

    @classmethod
    def recognizes(cls, path: Path) -> bool:
        try:
            with open(path, "rb") as fh:
                return fh.read(len(_HEADER)) == _HEADER
        except OSError:
            return False

    def list(self) -> list[Experience]:
        return [Experience(k, t) for k, t in
                self.db.execute("SELECT key, text FROM experiences ORDER BY key")]

    def _writer(self) -> str:
        """``show`` opens with no writer: then the library's only writer, if it has one."""
        if self.writer:
            return self.writer
        writers = [r[0] for r in self.db.execute("SELECT DISTINCT writer FROM versions")]
        return writers[0] if len(writers) == 1 else ""

    def last_step(self) -> int:
        row = self.db.execute("SELECT MAX(step) FROM versions WHERE writer = ?",
                              (self._writer(),)).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def at_step(self, step: int) -> list[Experience]:
        row = self.db.execute("SELECT library FROM versions WHERE writer = ? AND step = ?",
                              (self._writer(), step)).fetchone()
        if row is None:
            if step == 0 and self.last_step() == 0:
                return self.list()
            raise GymError(f"{self.path} holds no version of step {step} for run "
                           f"{self._writer() or '(several writers: pass --writer)'}")
        return [Experience(int(k), t) for k, t in json.loads(row[0])]

    def _record(self, step: int, items: list[Experience]) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO versions (writer, step, library) VALUES (?, ?, ?)",
            (self.writer, step, json.dumps([[e.key, e.text] for e in items])),
        )

    def apply(self, ops: list[Operation], step: int) -> ApplyResult:
        with self._transaction():
            last = self.last_step()
            if step <= last:
                raise ValueError(f"step {step} is not after this run's step {last}")
            current = self.list()
            has_versions = self.db.execute(
                "SELECT 1 FROM versions WHERE writer = ? LIMIT 1", (self.writer,)).fetchone()
            if not has_versions:  # the library as this run found it: where rewind(0) goes
                self._record(last, current)
            next_key = int(self.db.execute(
                "SELECT value FROM meta WHERE key = 'next_key'").fetchone()[0])
            items, next_key, counts = apply_operations(current, ops, next_key)
            self._replace_rows(current, items)
            self.db.execute("UPDATE meta SET value = ? WHERE key = 'next_key'", (str(next_key),))
            self._record(step, items)
        return ApplyResult(step=step, size=len(items), **counts)

    def _replace_rows(self, old: list[Experience], new: list[Experience]) -> None:
        before = {e.key: e.text for e in old}
        after = {e.key: e.text for e in new}
        self.db.executemany("DELETE FROM experiences WHERE key = ?",
                            [(k,) for k in before if k not in after])
        self.db.executemany("INSERT OR REPLACE INTO experiences (key, text) VALUES (?, ?)",
                            [(k, t) for k, t in after.items() if before.get(k) != t])

    def rewind(self, step: int) -> None:
        with self._transaction():
            if step == self.last_step():
                return
            target = self.at_step(step)
            self._replace_rows(self.list(), target)
            self.db.execute("DELETE FROM versions WHERE writer = ? AND step > ?",
                            (self.writer, step))

    def close(self) -> None:
        db = getattr(self, "db", None)
        if db is not None:
            db.close()
            self.db = None
