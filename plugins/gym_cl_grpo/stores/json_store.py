"""``experience_store=json``: the library in one JSON file, replaced atomically, with a
snapshot per step.

Layout (``path`` = ``library.json``)::

    library.json                  {"format", "step", "next_key", "experiences": [{"key", "text"}]}
    library.json.steps/step-3.json  the same document as it stood after step 3

Every write goes to a temporary file in the same directory, is flushed to disk and
renamed over the target (``os.replace`` is atomic), so a crash leaves either the old or
the new library, never a truncated one. The step's snapshot is written before the
library itself: the library never names a step that has no snapshot. One writer at a
time: runs that share a library use ``experience_store=sqlite``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from gym_cl_grpo import JsonStoreConfig
from gym_cl_grpo.experience import (
    FORMAT,
    ApplyResult,
    Experience,
    ExperienceStore,
    Operation,
    apply_operations,
    clean_text,
)
from gym_core.api import GymError, write_json

_SNAPSHOT = re.compile(r"^step-(\d+)\.json$")


def read_document(path: Path) -> dict[str, Any]:
    """A library document, checked; any problem is a GymError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GymError(f"cannot read the experience library {path}: {exc}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GymError(
            f"the experience library {path} is not valid JSON (line {exc.lineno}: {exc.msg}). "
            "gym leaves it untouched: repair it, or move it away to start a new library"
        ) from None
    problem = _shape_problem(doc)
    if problem:
        raise GymError(
            f"{path} is not a gym experience library ({problem}); gym leaves it untouched. "
            f'A library holds {{"format": "{FORMAT}", "step", "next_key", "experiences"}}; '
            "point experience_store.path at another file to start a new one"
        )
    return doc


def _shape_problem(doc: Any) -> str | None:
    if not isinstance(doc, dict):
        return f"it holds a JSON {type(doc).__name__}, not an object"
    if doc.get("format") != FORMAT:
        return f"its format is {doc.get('format')!r}, not {FORMAT!r}"
    if not isinstance(doc.get("step"), int) or not isinstance(doc.get("next_key"), int):
        return "'step' and 'next_key' must be integers"
    entries = doc.get("experiences")
    if not isinstance(entries, list):
        return "'experiences' must be a list"
    keys = set()
    for e in entries:
        if not (isinstance(e, dict) and isinstance(e.get("key"), int)
                and isinstance(e.get("text"), str) and e["text"] == clean_text(e["text"])
                and e["text"]):
            return f"bad entry {e!r:.80}: each needs an integer 'key' and one line of 'text'"
        if e["key"] in keys or e["key"] >= doc["next_key"]:
            return f"key {e['key']} is repeated or not below next_key"
        keys.add(e["key"])
    return None


def _document(step: int, next_key: int, experiences: list[Experience]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "step": step,
        "next_key": next_key,
        "experiences": [{"key": e.key, "text": e.text} for e in experiences],
    }


def _experiences(doc: dict[str, Any]) -> list[Experience]:
    return sorted((Experience(e["key"], e["text"]) for e in doc["experiences"]),
                  key=lambda e: e.key)


class JsonStore(ExperienceStore):
    Config = JsonStoreConfig
    default_filename = "library.json"

    def __init__(self, cfg, path: Path, writer: str = "default") -> None:
        super().__init__(cfg, path, writer)
        self.steps_dir = self.path.with_name(self.path.name + ".steps")
        # Read (and check) once when opened: a bad file fails before any work is done.
        if self.path.exists():
            doc = read_document(self.path)
        else:
            doc = _document(0, 0, [])
        self._step, self._next_key = doc["step"], doc["next_key"]
        self._items = _experiences(doc)

    @classmethod
    def recognizes(cls, path: Path) -> bool:
        try:
            with open(path, encoding="utf-8") as fh:
                head = fh.read(4096)
        except (OSError, UnicodeDecodeError):
            return False
        return head.lstrip().startswith("{") and FORMAT in head

    def _snapshot_path(self, step: int) -> Path:
        return self.steps_dir / f"step-{step}.json"

    def list(self) -> list[Experience]:
        return list(self._items)

    def last_step(self) -> int:
        return self._step

    def at_step(self, step: int) -> list[Experience]:
        if step == self._step:
            return self.list()
        snap = self._snapshot_path(step)
        if not snap.is_file():
            raise GymError(f"{self.path} has no snapshot of step {step} (looked for {snap})")
        return _experiences(read_document(snap))

    def recorded_steps(self) -> list[int]:
        if not self.steps_dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.steps_dir.iterdir()
                      if (m := _SNAPSHOT.match(p.name)))

    def apply(self, ops: list[Operation], step: int) -> ApplyResult:
        if step <= self._step:
            raise ValueError(f"step {step} is not after the library's step {self._step}")
        if not self._snapshot_path(self._step).is_file():  # the version this step starts from
            write_json(self._snapshot_path(self._step),
                             _document(self._step, self._next_key, self._items))
        items, next_key, counts = apply_operations(self._items, ops, self._next_key)
        doc = _document(step, next_key, items)
        write_json(self._snapshot_path(step), doc)
        write_json(self.path, doc)
        self._step, self._next_key, self._items = step, next_key, items
        return ApplyResult(step=step, size=len(items), **counts)

    def rewind(self, step: int) -> None:
        if step == self._step:
            return
        snap = self._snapshot_path(step)
        if not snap.is_file():
            raise GymError(
                f"cannot resume the experience library {self.path} at step {step}: no snapshot "
                f"{snap}. Move the library away to start again"
            )
        doc = read_document(snap)
        # keys are never reused, even those added in the steps being forgotten
        doc["next_key"] = max(doc["next_key"], self._next_key)
        write_json(self.path, doc)
        for later in self.recorded_steps():
            if later > step:
                self._snapshot_path(later).unlink(missing_ok=True)
        self._step, self._next_key, self._items = step, doc["next_key"], _experiences(doc)
