"""The built-in experience stores: ``experience_store=json`` (one file, replaced
atomically, a snapshot per step) and ``experience_store=sqlite`` (WAL mode, one
transaction per batch, safe for several processes sharing one library).

Cheap to import: config dataclasses and the registration hook only.
"""

from __future__ import annotations

from dataclasses import dataclass

from gym_core import hookimpl
from gym_core.config import ExperienceStoreConfig


@dataclass
class JsonStoreConfig(ExperienceStoreConfig):
    """One JSON file, for one run at a time (use sqlite to share a library)."""

    name: str = "json"
    # None: <run_dir>/experiences/library.json; snapshots beside it in library.json.steps/
    path: str | None = None


@dataclass
class SqliteStoreConfig(ExperienceStoreConfig):
    """One SQLite database that several runs (a multirun sweep) may share."""

    name: str = "sqlite"
    path: str | None = None  # None: <run_dir>/experiences/library.sqlite
    busy_timeout_s: float = 60.0  # how long a writer waits for another's transaction


@hookimpl
def gym_add_experience_stores(registry):
    registry.add("json", JsonStoreConfig, "gym_experience.json_store:JsonStore")
    registry.add("sqlite", SqliteStoreConfig, "gym_experience.sqlite_store:SqliteStore")
