"""Evaluation during training: ``trainer.eval_every=N`` scores ``trainer.eval_tasks``
(default: the run's own task) on the current weights with gym's sampler every N steps,
greedily; the values join the step's metrics (``eval/<task>/<metric>`` in
metrics.jsonl and TensorBoard) and the results store (``<run.root>/results.sqlite``,
with the same keys ``python -m gym_core.eval`` uses for the run's checkpoints, so a
checkpoint scored during training is not scored again). ``trainer.keep_best=<metric>``
keeps the checkpoint of the step with the best value of any logged metric
(``checkpoints/best.json`` names it; pruning spares it)."""

from __future__ import annotations

import json
from pathlib import Path

from gym_core.base.errors import GymError
from gym_core.base.files import write_json
from gym_core.eval import tasks as T
from gym_core.eval.scoring import Settings, score_local, summarise
from gym_core.eval.store import Row, Store, config_digest, now

BEST = "best.json"


class DuringTraining:
    def __init__(self, cfg, plugins, run_dir: Path):
        tcfg = cfg.trainer
        self.every = int(tcfg.eval_every or 0)
        self.run_dir = Path(run_dir)
        self.key = str(self.run_dir.resolve())
        self.store = Store(cfg.run.root)
        self.settings = Settings(max_new_tokens=int(tcfg.eval_max_new_tokens),
                                 batch_size=int(tcfg.eval_batch_size))
        self.limit = tcfg.eval_size
        self.tasks = []
        if self.every:
            for spec in tcfg.eval_tasks or ["data"]:
                task = T.resolve(spec, cfg.data, plugins)
                if task.kind == "lm_eval":
                    raise GymError(f"trainer.eval_tasks entry {spec!r}: harness tasks are "
                                   "scored after training (python -m gym_core.eval on the "
                                   "run's checkpoints); during training name data tasks")
                self.tasks.append(T.load(task, cfg.data, plugins, self.limit))
        self.best_metric = tcfg.keep_best
        self.mode = str(tcfg.keep_best_mode)  # max | min, declared in TrainerConfig
        self.best = self._read_best()

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def __call__(self, step: int, policy, model=None) -> dict[str, float]:
        """Score every task on the policy's current weights (``model``: the policy's
        model with its full weights, as :meth:`Policy.full_model` gives it under FSDP);
        {eval/<task>/<metric>: v}."""
        model = policy.model if model is None else model
        out, rows = {}, []
        for task in self.tasks:
            system_prompt = task.system_prompt
            scores = score_local(model, policy.tokenizer, task.examples,
                                 task.metric_fn, self.settings, system_prompt=system_prompt)
            values = summarise(scores, self.settings, task.metric)
            settings = {"task": task.digest(), "limit": self.limit,
                        **self.settings.digest_fields(), "verifier": task.metric,
                        "system_prompt": system_prompt}
            digest = config_digest(settings)
            for metric, value in values.items():
                out[f"eval/{task.name}/{metric}"] = value
                rows.append(Row(self.key, self.key, step, task.name, metric, value,
                                len(scores), digest, settings, now(), source="train"))
        self.store.write(rows)
        return out

    # --- keep_best ----------------------------------------------------------------------
    def improved(self, step: int, metrics: dict) -> bool:
        """True when ``metrics`` holds a new best value of ``trainer.keep_best`` (then
        recorded as the best step)."""
        if not self.best_metric or self.best_metric not in metrics:
            return False
        value = metrics[self.best_metric]
        if not isinstance(value, (int, float)) or value != value:
            return False
        old = self.best and self.best["value"]
        better = old is None or (value > old if self.mode == "max" else value < old)
        if better:
            self.best = {"step": step, "metric": self.best_metric, "value": float(value)}
        return better

    def write_best(self) -> None:
        if self.best:
            write_json(self.run_dir / "checkpoints" / BEST, self.best)

    @property
    def protected(self) -> set[int]:
        return {self.best["step"]} if self.best else set()

    def _read_best(self):
        path = self.run_dir / "checkpoints" / BEST
        if not self.best_metric or not path.is_file():
            return None
        try:
            best = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            return None
        return best if best.get("metric") == self.best_metric else None


def objective(cfg, run_dir: Path) -> float | None:
    """``trainer.objective``'s last logged value in the run's metrics.jsonl (a sweep's
    objective), or None when it is not set or never logged."""
    name = cfg.trainer.get("objective")
    path = Path(run_dir) / "metrics.jsonl"
    if not name:
        return None
    if not path.is_file():
        raise GymError(f"trainer.objective={name}: the run logged no metrics")
    last = None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get(name), (int, float)):
            last = float(row[name])
    if last is None:
        raise GymError(f"trainer.objective={name} was never logged (metrics.jsonl has no "
                       "such column); name a logged metric, e.g. eval/data/accuracy with "
                       "trainer.eval_every=N")
    return last
