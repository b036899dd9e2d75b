"""Compare: runs, variants and checkpoints side by side on one task, from the results
store (``<runs folder>/results.sqlite``, written by ``python -m gym_core.eval`` and by
training's ``eval_every``): a table and a bar chart of one metric, and each run's
evaluation curve (value by step) on that task."""

from __future__ import annotations

from pathlib import Path

from nicegui import ui

from gym_core.eval.store import Store
from gym_core.ui.layout import COLORS, _root_arg, error_line, frame, tid


def latest(rows) -> dict[tuple[str, int], float]:
    """The newest value of each (model, step) among ``rows`` (one task and metric)."""
    out: dict[tuple[str, int], float] = {}
    for r in sorted(rows, key=lambda r: r.time):
        if r.value is not None:
            out[(r.model, r.step)] = r.value
    return out


def label(model: str, step: int, root: Path) -> str:
    try:
        name = str(Path(model).relative_to(root.resolve()))
    except ValueError:
        name = model
    return name if step < 0 else f"{name} @ {step}"


@ui.page("/compare")
def compare_page(root: str | None = None, task: str = "", metric: str = "") -> None:
    frame("Compare")
    root_path = Path(_root_arg(root))
    message = error_line("compare-error")
    rows = Store(root_path).query()
    if not rows:
        message.text = (f"{root_path / 'results.sqlite'} holds no evaluations yet: run "
                        "python -m gym_core.eval, or train with trainer.eval_every=N")
        return
    tasks = sorted({r.task for r in rows})
    with ui.row().classes("w-full items-center"):
        task_pick = tid(ui.select(tasks, value=task if task in tasks else tasks[0],
                                  label="task").classes("w-64"), "compare-task")
        metric_pick = tid(ui.select([], label="metric").classes("w-64"), "compare-metric")
    table = tid(ui.table(columns=[{"name": c, "label": c, "field": c, "align": "left"}
                                  for c in ("model", "step", "value", "examples", "source")],
                         rows=[]).classes("w-full"), "compare-table")
    bars = tid(ui.echart({"animation": False, "tooltip": {}, "grid": {"left": 60, "bottom": 120},
                          "xAxis": {"type": "category", "data": [],
                                    "axisLabel": {"rotate": 30}},
                          "yAxis": {"type": "value"}, "series": []}).classes("w-full h-96"),
               "compare-bars")
    curves = tid(ui.echart({"animation": False, "tooltip": {"trigger": "axis"},
                            "legend": {"top": 0, "type": "scroll"},
                            "xAxis": {"type": "value", "name": "step", "minInterval": 1},
                            "yAxis": {"type": "value", "scale": True}, "series": []}
                           ).classes("w-full h-72"), "compare-curves")

    def metrics_of(t: str) -> list[str]:
        return sorted({r.metric for r in rows if r.task == t})

    def show(_=None) -> None:
        names = metrics_of(task_pick.value)
        if metric_pick.options != names:
            metric_pick.options = names
            metric_pick.value = metric if metric in names else names[0]
            metric_pick.update()
            return  # the metric's change handler draws
        chosen = [r for r in rows if r.task == task_pick.value and r.metric == metric_pick.value]
        values = latest(chosen)
        meta = {(r.model, r.step): r for r in chosen}
        order = sorted(values, key=lambda k: (k[0], k[1]))
        table.rows = [{"model": label(m, s, root_path), "step": s if s >= 0 else "-",
                       "value": round(values[(m, s)], 4), "examples": meta[(m, s)].examples,
                       "source": meta[(m, s)].source} for m, s in order]
        table.update()
        bars.options["xAxis"]["data"] = [label(m, s, root_path) for m, s in order]
        bars.options["series"] = [{"type": "bar", "name": metric_pick.value,
                                   "data": [values[k] for k in order]}]
        bars.update()
        by_run: dict[str, list] = {}
        for (m, s), v in values.items():
            if s >= 0:
                by_run.setdefault(m, []).append([s, v])
        curves.options["series"] = [
            {"type": "line", "name": label(m, -1, root_path), "data": sorted(points),
             "color": COLORS[i % len(COLORS)]}
            for i, (m, points) in enumerate(sorted(by_run.items())) if len(points) > 1]
        curves.update()

    task_pick.on_value_change(show)
    metric_pick.on_value_change(show)
    show()
