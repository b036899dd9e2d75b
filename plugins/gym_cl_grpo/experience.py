"""Experience stores: the text library a training-free method learns instead of weights
(Training-Free GRPO, docs/algorithms.md §8), and the contract every store implements.

A library is an ordered list of :class:`Experience` entries. Each has a ``key`` that the
store never reuses, so an operation written against one version of the library cannot
hit a different entry after another writer changed it; the ids a model sees, ``G0..Gn``,
are positions in key order and are renumbered after every change (§8, "renumber").

Changes arrive as batches of :class:`Operation` (ADD / UPDATE / DELETE / NONE, the
main-branch op names of §8). :func:`apply_operations` gives their meaning once, for every
store; a store makes each batch atomic and durable and records the library as it stood
after the batch, per writer and step, so a run can be inspected or resumed at any step.

Print or export a library from the command line::

    python -m gym_cl_grpo.experience show runs/NAME/experiences/library.json
    python -m gym_cl_grpo.experience show runs/NAME/experiences/library.sqlite --step 2 --json
    python -m gym_cl_grpo.experience show runs/NAME/experiences/library.json --out lib.json

``--out`` writes the paper's ``{"G0": "...", ...}`` file, which a run imports with
``algorithm.library_init=lib.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import OmegaConf

from gym_core.api import GymError

OPERATIONS = ("ADD", "UPDATE", "DELETE", "NONE")
#: the format tag written into every library file, checked when one is opened
FORMAT = "gym.experiences/1"

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


@dataclass(frozen=True)
class Experience:
    key: int  # stable for the entry's lifetime, never reused by the store
    text: str


@dataclass(frozen=True)
class Operation:
    """One change to the library. ``key`` names the target of UPDATE / DELETE (an
    :attr:`Experience.key`); ``text`` is the new content of ADD / UPDATE."""

    kind: str
    key: int | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in OPERATIONS:
            raise ValueError(f"operation {self.kind!r} is not one of {OPERATIONS}")
        if self.kind in ("UPDATE", "DELETE") and not isinstance(self.key, int):
            raise ValueError(f"{self.kind} needs the key of an existing experience")
        if self.kind in ("ADD", "UPDATE") and not (isinstance(self.text, str) and self.text):
            raise ValueError(f"{self.kind} needs non-empty text")
        if self.text is not None and clean_text(self.text) != self.text:
            raise ValueError("experience text must be one line without control characters "
                             "(pass it through clean_text first)")


@dataclass(frozen=True)
class ApplyResult:
    step: int  # the step the batch was recorded under
    added: int
    updated: int
    deleted: int
    skipped: int  # NONE, duplicate ADDs, UPDATE / DELETE of keys that no longer exist
    size: int  # experiences after the batch


def clean_text(text: str) -> str:
    """One line of plain text: control characters and line breaks become spaces and runs
    of whitespace one space, so each experience stays one ``[Gi]. ...`` line in a prompt."""
    return " ".join(_CONTROL.sub(" ", text).split())


def labels(experiences: list[Experience]) -> dict[str, Experience]:
    """``{"G0": ..., "G1": ...}`` in key order: the ids a model sees (renumbered, §8)."""
    ordered = sorted(experiences, key=lambda e: e.key)
    return {f"G{i}": e for i, e in enumerate(ordered)}


def as_library(experiences: list[Experience]) -> dict[str, str]:
    """The paper's library JSON: ``{"G0": "text", ...}`` (docs/algorithms.md §8)."""
    return {label: e.text for label, e in labels(experiences).items()}


def apply_operations(
    experiences: list[Experience], ops: list[Operation], next_key: int
) -> tuple[list[Experience], int, dict[str, int]]:
    """The meaning of a batch of operations, the same for every store.

    Reconciled as the main-branch batch step does (§8): a DELETE beats an UPDATE of the
    same key; of several UPDATEs of one key the last wins; an ADD whose text equals an
    existing or earlier-added experience (ignoring case and spacing) is merged into it.
    UPDATE / DELETE of a key that is gone (another writer deleted it) is skipped.
    Returns the new library (key order), the next unused key and the counts.
    """
    current = {e.key: e.text for e in experiences}
    deleted = {op.key for op in ops if op.kind == "DELETE" and op.key in current}
    updates: dict[int, str] = {}
    counts = {"added": 0, "updated": 0, "deleted": len(deleted), "skipped": 0}
    for op in ops:
        if op.kind == "UPDATE" and op.key in current and op.key not in deleted:
            updates[op.key] = op.text
        elif op.kind != "ADD" and not (op.kind == "DELETE" and op.key in current):
            counts["skipped"] += 1
    counts["updated"] = sum(1 for k, t in updates.items() if current[k] != t)
    counts["skipped"] += sum(1 for k, t in updates.items() if current[k] == t)
    result = {k: updates.get(k, t) for k, t in current.items() if k not in deleted}
    seen = {_norm(t) for t in result.values()}
    for op in ops:
        if op.kind != "ADD":
            continue
        if _norm(op.text) in seen:
            counts["skipped"] += 1
            continue
        seen.add(_norm(op.text))
        result[next_key] = op.text
        next_key += 1
        counts["added"] += 1
    return [Experience(k, t) for k, t in sorted(result.items())], next_key, counts


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


class ExperienceStore:
    """The contract of an ``experience_store=<name>`` implementation.

    ``Store(cfg, path, writer)``: ``path`` is where the library lives (a file or a
    database; created on the first write, never truncated by a failed run), ``writer``
    names the process's run so that several runs can share one library and each keeps
    its own per-step versions. Opening an existing library that is not one (bad JSON,
    a foreign database) raises :class:`~gym_core.base.errors.GymError` naming the path.
    """

    Config: ClassVar[type]
    #: the library's file name inside ``<run_dir>/experiences/`` when ``cfg.path`` is unset
    default_filename: ClassVar[str]

    def __init__(self, cfg: Any, path: Path, writer: str = "default") -> None:
        self.cfg, self.path, self.writer = cfg, Path(path), writer

    @classmethod
    def recognizes(cls, path: Path) -> bool:
        """Whether the file at ``path`` looks like this store's library (for ``show``)."""
        raise NotImplementedError

    # -- reading ------------------------------------------------------------------------
    def list(self) -> list[Experience]:
        """The current library, in key order."""
        raise NotImplementedError

    def retrieve(self, prompt: str) -> list[Experience]:
        """The experiences to show with ``prompt``. Training-Free GRPO injects the whole
        library (§8), which is the default; a retrieval store may select a subset."""
        return self.list()

    def last_step(self) -> int:
        """The newest step this writer recorded (0: none yet)."""
        raise NotImplementedError

    def at_step(self, step: int) -> list[Experience]:
        """The library as it stood after this writer's ``step`` (0: before its first).
        A step never recorded raises :class:`GymError`."""
        raise NotImplementedError

    # -- writing ------------------------------------------------------------------------
    def apply(self, ops: list[Operation], step: int) -> ApplyResult:
        """Apply one batch atomically (:func:`apply_operations`) and record the library
        after it as this writer's version at ``step``."""
        raise NotImplementedError

    def rewind(self, step: int) -> None:
        """Make the version recorded at ``step`` current again and forget this writer's
        later steps (a run resuming from an older checkpoint)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release files and connections; the library stays on disk."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- export -------------------------------------------------------------------------
    def export(self, step: int | None = None) -> dict[str, str]:
        """``{"G0": text, ...}``: the current library, or this writer's at ``step``."""
        return as_library(self.list() if step is None else self.at_step(step))


def store_path(cfg: Any, store_cls: type[ExperienceStore], run_dir: Path) -> Path:
    """``experience_store.path`` when set (a library shared by several runs), otherwise
    ``<run_dir>/experiences/<default file name>``."""
    path = getattr(cfg, "path", None)
    return Path(path).expanduser() if path else Path(run_dir) / "experiences" / (
        store_cls.default_filename)


def open_store(cfg: Any, plugins, run_dir: Path) -> ExperienceStore:
    """The store that ``cfg.experience_store`` selects, opened for the run in ``run_dir``;
    the run directory's resolved path names this writer."""
    name = cfg.experience_store.name
    cls = plugins.component("experience_store", name).load()
    return cls(cfg.experience_store, store_path(cfg.experience_store, cls, run_dir),
               writer=str(Path(run_dir).resolve()))


# ----------------------------------------------------------------------------------------
# python -m gym_cl_grpo.experience show PATH
# ----------------------------------------------------------------------------------------


def store_for(path: Path, plugins) -> ExperienceStore:
    """The installed store that recognises the library file at ``path``, opened to read."""
    if not path.is_file():
        raise GymError(f"{path} does not exist: give the path of a library file")
    for comp in plugins.registry("experience_store"):
        cls = comp.load()
        if cls.recognizes(path):
            return cls(OmegaConf.structured(comp.config), path, writer="")
    raise GymError(f"{path} is not a library any installed experience store can read")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gym_cl_grpo.experience", description="Print or export an experience library."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="print a library (G0..Gn), or export it as JSON")
    show.add_argument("path", type=Path)
    show.add_argument("--json", action="store_true", help='print {"G0": "...", ...}')
    show.add_argument("--step", type=int, default=None,
                      help="the version after this step (of the run named by --writer)")
    show.add_argument("--out", type=Path, default=None,
                      help='write {"G0": "...", ...} to this file (atomically): the paper\'s '
                           "format, read back by algorithm.library_init=FILE")
    show.add_argument("--writer", default=None,
                      help="the run directory whose steps --step counts (shared libraries)")
    args = parser.parse_args(argv)
    try:
        from gym_core.api import bootstrap

        store = store_for(args.path, bootstrap())
        if args.writer is not None:
            store.writer = str(Path(args.writer).resolve())
        with store:
            library = store.export(args.step)
    except GymError as exc:
        print(f"gym: error: {exc}", file=sys.stderr)
        return 2
    if args.out is not None:
        from gym_core.api import write_json

        try:
            write_json(args.out, library)
        except GymError as exc:
            print(f"gym: error: {exc}", file=sys.stderr)
            return 2
        print(f"{len(library)} experiences written to {args.out}", file=sys.stderr)
    elif args.json:
        print(json.dumps(library, indent=2, ensure_ascii=False))
    else:
        for label, text in library.items():
            print(f"[{label}]. {text}")
        print(f"({len(library)} experiences)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
