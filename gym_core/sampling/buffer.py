"""The rollout buffer: every training step's rollouts kept in the run folder as Parquet.

``<run dir>/rollouts/step-000001.parquet``, one file a step, one row a completion: the
step, the policy version that sampled it and its staleness (step - version), the prompt,
the completion, its token ids, the reward (and each reward function's value), the
sampler's (behaviour) log-prob of each token, truncation, and the example's answer when it
has one. Each file is written whole or not at all (:func:`gym_core.base.files.atomic_path`):
a run killed mid-write leaves the steps before it readable, and a resumed run writes the
steps it redoes again. The folder is one dataset for pandas (``pd.read_parquet(folder)``),
``datasets`` (``load_dataset("parquet", data_dir=folder)``) and the UI's run page.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from gym_core.base.errors import GymError
from gym_core.base.files import atomic_path

FOLDER = "rollouts"


def step_file(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / FOLDER / f"step-{step:06d}.parquet"


def rollout_rows(rollout, step: int, version: int | None = None) -> list[dict[str, Any]]:
    """One row per completion of ``rollout`` (a :class:`gym_core.sampling.rollout.Rollout`)
    sampled by the policy of step ``version`` (the step's own policy: ``step - 1``)."""
    version = step - 1 if version is None else int(version)
    mask = rollout.completion_mask.bool()
    ids = rollout.completion_ids
    logp = rollout.sampler_logp
    rows = []
    for i in range(len(rollout)):
        keep = mask[i]
        ex = rollout.examples[i]
        answer = ex.get("answer")
        rows.append({
            "step": int(step),
            "policy_version": version,
            "staleness": int(step - 1 - version),
            "group": i // rollout.group_size,
            "prompt": _text(ex.get("prompt")),
            "completion": rollout.completions[i],
            "completion_ids": [int(t) for t in ids[i][keep].tolist()],
            "behaviour_logprobs": (None if logp is None
                                   else [float(x) for x in logp[i][keep].tolist()]),
            "reward": _finite(float(rollout.rewards[i])),
            "truncated": bool(rollout.truncated[i]),
            "answer": None if answer is None else str(answer),
        })
    return rows


def _text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    import json

    return json.dumps(prompt, ensure_ascii=False)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


class RolloutBuffer:
    """Appends each step's rows to the run folder's buffer (rank 0 writes)."""

    def __init__(self, run_dir: Path) -> None:
        try:
            import pyarrow  # noqa: F401
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise GymError("trainer.rollout_buffer=true needs pyarrow: pip install pyarrow, or "
                           "set trainer.rollout_buffer=false") from None
        self.run_dir = Path(run_dir)

    def write(self, step: int, rows: list[dict[str, Any]]) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(rows, schema=SCHEMA())
        path = step_file(self.run_dir, step)
        with atomic_path(path) as tmp:
            pq.write_table(table, str(tmp))
        return path


def SCHEMA():  # noqa: N802  (a constant built on first use: pyarrow loads lazily)
    import pyarrow as pa

    return pa.schema([
        ("step", pa.int64()), ("policy_version", pa.int64()), ("staleness", pa.int64()),
        ("group", pa.int64()), ("prompt", pa.string()), ("completion", pa.string()),
        ("completion_ids", pa.list_(pa.int64())),
        ("behaviour_logprobs", pa.list_(pa.float32())),
        ("reward", pa.float64()), ("truncated", pa.bool_()), ("answer", pa.string()),
    ])


def read_buffer(run_dir: Path, steps: list[int] | None = None) -> list[dict[str, Any]]:
    """The buffer's rows (all steps, or ``steps``), in step order; [] when there is none."""
    import pyarrow.parquet as pq

    folder = Path(run_dir) / FOLDER
    if not folder.is_dir():
        return []
    files = sorted(folder.glob("step-*.parquet"))
    if steps is not None:
        wanted = {step_file(run_dir, s).name for s in steps}
        files = [f for f in files if f.name in wanted]
    rows: list[dict[str, Any]] = []
    for f in files:
        try:
            rows.extend(pq.read_table(str(f)).to_pylist())
        except Exception as exc:  # pyarrow's errors have no common base
            raise GymError(f"{f} is not a readable Parquet file ({exc}); delete it, the rest "
                           "of the buffer stays readable") from None
    return rows
