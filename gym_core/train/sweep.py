"""The sweep summary: a Hydra callback that, when a multirun ends, collects every job's
summary.json into one table, sorted by the objective (the held-out score after
quantization where there is one, else after training), writes it to
``<sweep dir>/sweep_summary.json`` and ``.csv`` and prints it.

Works with any launcher (basic, joblib, submitit, ray) and sweeper (basic, optuna): it
reads only what the jobs wrote into their own directories.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from gym_core.base.files import atomic_path, write_json

COLUMNS = ["job", "objective", "algorithm", "quant", "steps", "before", "after",
           "after_quant", "train_seconds", "tokens_per_second", "overrides"]


def objective(summary: dict[str, Any]) -> float | None:
    """What a sweep maximises (also what ``python -m gym_core`` returns to sweepers)."""
    if summary.get("objective") is not None:  # trainer.objective
        return summary["objective"]
    ev = summary.get("eval") or {}
    return ev.get("after_quant") if ev.get("after_quant") is not None else ev.get("after")


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(sweep_dir.glob("*/summary.json")):
        s = json.loads(path.read_text())
        ev = s.get("eval") or {}
        rows.append({
            "job": path.parent.name, "objective": objective(s),
            "algorithm": s.get("algorithm"), "quant": s.get("quant"), "steps": s.get("steps"),
            "before": ev.get("before"), "after": ev.get("after"),
            "after_quant": ev.get("after_quant"), "train_seconds": s.get("train_seconds"),
            "tokens_per_second": s.get("tokens_per_second"),
            "overrides": " ".join(s.get("overrides") or []),
        })
    # best first; jobs without a score last
    rows.sort(key=lambda r: (r["objective"] is None, -(r["objective"] or 0.0), r["job"]))
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as text; the overrides column shows only what differs between jobs."""
    common = set.intersection(*(set(r["overrides"].split()) for r in rows)) if rows else set()
    rows = [{**r, "overrides": " ".join(o for o in r["overrides"].split() if o not in common)}
            for r in rows]
    cols = [c for c in COLUMNS if any(r[c] not in (None, "") for r in rows)]

    def cell(v):
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    widths = {c: max(len(c), *(len(cell(r[c])) for r in rows)) for c in cols}
    lines = [" | ".join(c.ljust(widths[c]) for c in cols)]
    lines.append("-+-".join("-" * widths[c] for c in cols))
    lines += [" | ".join(cell(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = collect(sweep_dir)
    write_json(sweep_dir / "sweep_summary.json", rows)
    with atomic_path(sweep_dir / "sweep_summary.csv") as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


class SweepSummary(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_summary(sweep_dir)
        if rows:
            print(f"\ngym sweep summary ({len(rows)} jobs, best first): "
                  f"{sweep_dir / 'sweep_summary.json'}\n{table(rows)}")
