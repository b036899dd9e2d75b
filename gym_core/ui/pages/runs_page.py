"""The Runs page (every run of a runs folder), a run's page (live curves, summary, resume) and a sweep's page."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlencode

from nicegui import ui

from gym_core.base.errors import GymError
from gym_core.ui.layout import (
    COLORS,
    _root_arg,
    error_line,
    frame,
    run_href,
    settings,
    tid,
)
from gym_core.ui.runs import (
    MetricsTail,
    check_root,
    fmt_bytes,
    fmt_score,
    metric_names,
    read_samples,
    resume_overrides,
    rollout_steps,
    run_path,
)
from gym_core.ui.runs import read_run as _read_run
from gym_core.ui.runs import scan as _scan

RUN_COLUMNS = [
    ("name", "run"), ("status", "status"), ("algorithm", "method"), ("quant", "quantizer"),
    ("model", "model"), ("steps", "steps"), ("before", "held-out before"),
    ("after", "after"), ("after_quant", "after quant"), ("delta", "delta size"),
    ("bits", "bits/weight"),
]
LINK_CELL = ('<q-td :props="props"><a :href="props.row.href" class="text-primary">'
             '{{ props.value }}</a></q-td>')


@ui.page("/")
def runs_page(root: str | None = None) -> None:
    frame("Runs")
    with ui.row().classes("items-end w-full"):
        folder = tid(ui.input("Runs folder", value=_root_arg(root)).classes("w-96"), "runs-folder")
        tid(ui.button("Open", on_click=lambda: refresh()), "runs-open")
    message = error_line("runs-error")
    ui.label("Runs").classes("text-h6 q-mt-md")
    columns = [{"name": k, "label": lbl, "field": k, "align": "left", "sortable": True}
               for k, lbl in RUN_COLUMNS]
    table = tid(ui.table(columns=columns, rows=[], row_key="name",
                         pagination={"rowsPerPage": 50}).classes("w-full"), "runs-table")
    table.add_slot("body-cell-name", LINK_CELL)
    problems = ui.column().classes("w-full")
    ui.label("Sweeps").classes("text-h6 q-mt-md")
    sweep_columns = [{"name": k, "label": lbl, "field": k, "align": "left"} for k, lbl in
                     [("name", "sweep"), ("jobs", "jobs"), ("best", "best objective"),
                      ("best_job", "best job"), ("finished", "finished")]]
    sweeps = tid(ui.table(columns=sweep_columns, rows=[], row_key="name").classes("w-full"),
                 "sweeps-table")
    sweeps.add_slot("body-cell-name", LINK_CELL)

    def refresh() -> None:
        path = folder.value.strip()
        try:
            runs, sweep_list = _scan(path)
        except GymError as exc:
            message.text = str(exc)
            table.rows, sweeps.rows = [], []
            table.update(), sweeps.update()
            problems.clear()
            return
        message.text = ""
        rows = []
        for r in runs:
            row = r.row()
            job = settings.launcher.job(r.path)
            if job is not None and job.running:  # before it takes the run's lock, too
                row["status"] = f"{job.state} (pid {job.pid})"
            row["href"] = run_href(path, r.name)
            rows.append(row)
        table.rows = rows
        table.update()
        problems.clear()
        with problems:
            for r in runs:
                if r.error:
                    tid(ui.label(f"{r.name}: {r.error}").classes("text-negative"),
                        f"run-problem-{r.name}")
        srows = []
        for s in sweep_list:
            ranked = s.ranked()
            from gym_core.train.sweep import objective

            best = ranked[0] if ranked and ranked[0].summary else None
            srows.append({"name": s.name, "jobs": len(s.jobs),
                          "best": fmt_score(objective(best.summary)) if best else "",
                          "best_job": best.path.name if best else "",
                          "finished": sum(1 for j in s.jobs if j.summary is not None),
                          "href": "/sweep?" + urlencode({"root": path, "name": s.name})})
        sweeps.rows = srows
        sweeps.update()

    refresh()
    ui.timer(3.0, refresh)


def _summary_items(run) -> list[tuple[str, str]]:
    s = run.summary or {}
    ev = run.eval
    q = s.get("quant_stats") or {}
    pref = ev.get("preference_accuracy") or {}
    items = [("status", run.status), ("method", run.algorithm or ""),
             ("quantizer", run.quant or ""), ("model", run.model),
             ("steps", str(s.get("steps", run.metrics_rows))),
             (f"held-out {ev.get('metric') or 'score'} before",
              fmt_score(ev.get("before", run.before))),
             ("after training", fmt_score(ev.get("after"))),
             ("after quant", fmt_score(ev.get("after_quant")))]
    if pref.get("after") is not None:
        items.append(("preference accuracy", f"{fmt_score(pref.get('before'))} -> "
                                             f"{fmt_score(pref.get('after'))}"))
    if q:
        items += [("delta size", fmt_bytes(q.get("delta_bytes"))),
                  ("bits / weight", str(q.get("bits_per_weight", ""))),
                  ("vs bf16", f"{q['compression_ratio']}x" if q.get('compression_ratio') else "-")]
    if s:
        items += [("train seconds", str(s.get("train_seconds", ""))),
                  ("tokens / second", str(s.get("tokens_per_second", "")))]
    if run.checkpoints:
        items.append(("checkpoints", ", ".join(f"step {c}" for c in run.checkpoints)))
    return [(k, v) for k, v in items if v not in ("", "None")]


def _line_chart(title: str):
    return ui.echart({
        "animation": False, "grid": {"left": 60, "right": 20, "top": 30, "bottom": 30},
        "tooltip": {"trigger": "axis"}, "legend": {"top": 0, "type": "scroll"},
        "xAxis": {"type": "value", "name": "step", "minInterval": 1},
        "yAxis": {"type": "value", "scale": True, "name": title},
        "series": [],
    }).classes("w-full h-64")


def _evaluation_curves(root: Path, run_dir: Path) -> None:
    """The run's evaluation curves per task (value by step) from the results store:
    training's eval_every and python -m gym_core.eval on its checkpoints."""
    from gym_core.eval.store import Store
    from gym_core.ui.pages.compare import latest

    rows = Store(root).query(run=str(run_dir.resolve())) if run_dir.is_dir() else []
    tasks = sorted({r.task for r in rows})
    if not tasks:
        return
    with ui.grid(columns=2).classes("w-full gap-4"):
        for task in tasks:
            with ui.card().classes("w-full"):
                tid(ui.label(f"evaluation: {task}").classes("text-subtitle2"), f"eval-{task}")
                chart = _line_chart(task)
                series = []
                for metric in sorted({r.metric for r in rows if r.task == task}):
                    values = latest([r for r in rows if r.task == task and r.metric == metric])
                    points = sorted([s, v] for (_, s), v in values.items() if s >= 0)
                    series.append({"type": "line", "name": metric, "data": points})
                chart.options["series"] = series
                chart.update()
                ui.link("compare on this task", "/compare?" + urlencode(
                    {"root": str(root), "task": task})).classes("text-primary")


SAMPLE_COLUMNS = [("prompt", "prompt"), ("completion", "completion"), ("reward", "reward"),
                  ("tokens", "tokens"), ("logp_sum", "behaviour log-prob (sum)"),
                  ("logp_mean", "log-prob / token"), ("staleness", "staleness")]


class SamplesSection:
    """Sample completions of a step from the run's rollout buffer (``rollouts/``): a step
    picker that follows the newest step until another is picked, and a few rows."""

    def __init__(self, run_dir: Path, step: str | None) -> None:
        self.run_dir = run_dir
        ui.label("Samples").classes("text-h6 q-mt-md")
        with ui.row().classes("items-end"):
            self.picker = tid(ui.select([], label="step").classes("w-32"), "samples-step")
            self.caption = tid(ui.label("").classes("text-caption"), "samples-caption")
        self.message = error_line("samples-error")
        columns = [{"name": k, "label": lbl, "field": k, "align": "left"}
                   for k, lbl in SAMPLE_COLUMNS]
        self.table = tid(ui.table(columns=columns, rows=[], row_key="i").props("wrap-cells")
                         .classes("w-full"), "samples-table")
        self.steps: list[int] = []
        self.follow = step is None  # show each new step as it is written
        self.picker.on_value_change(lambda e: self.pick(e.value))
        self.refresh()
        if step is not None:
            try:
                wanted = int(step)
            except ValueError:
                self.message.text = f"step {step!r} is not a step number"
                return
            if wanted in self.steps:
                self.picker.value = wanted  # on_value_change shows it
            else:
                self.show(wanted)  # the message naming the steps there are

    def refresh(self) -> None:
        steps = rollout_steps(self.run_dir)
        if steps == self.steps:
            return
        self.steps = steps
        self.picker.options = steps
        self.picker.update()
        if not steps:
            self.caption.text = ("no rollouts recorded in this run (online methods keep them "
                                 "with trainer.rollout_buffer=true)")
        elif self.follow:
            self.picker.value = steps[-1]  # on_value_change shows it

    def pick(self, step: int | None) -> None:
        self.follow = bool(self.steps) and step == self.steps[-1]  # the newest: keep up
        if step is not None:
            self.show(step)

    def show(self, step: int | None) -> None:
        try:
            got = read_samples(self.run_dir, step)
        except GymError as exc:
            self.message.text, self.caption.text, self.table.rows = str(exc), "", []
            self.table.update()
            return
        self.message.text = ""
        self.caption.text = (f"step {got.step}: {len(got.rows)} of {got.total} completions")
        self.table.rows = [{"i": i, **{k: _cell(r[k]) for k, _ in SAMPLE_COLUMNS}}
                           for i, r in enumerate(got.rows)]
        self.table.update()


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@ui.page("/run")
def run_page(root: str | None = None, name: str = "", step: str | None = None) -> None:
    frame("Runs")
    root = _root_arg(root)
    ui.link("← all runs", "/?" + urlencode({"root": root})).classes("text-primary")
    title = tid(ui.label(name).classes("text-h5 q-my-sm"), "run-title")
    message = error_line("run-error")
    path = Path(root) / name
    if settings.launcher.job(path) is None:  # a job started here may not have made it yet
        try:
            path = run_path(root, name)
        except GymError as exc:
            message.text = str(exc)
            return
    summary_box = tid(ui.grid(columns=4).classes("w-full gap-2"), "run-summary")
    with ui.row().classes("items-center q-my-sm"):
        stop_btn = tid(ui.button("Stop", color="negative"), "run-stop")
        resume_btn = tid(ui.button("Resume"), "run-resume")
        job_state = tid(ui.label(""), "run-job")
    picker = tid(ui.select([], multiple=True, label="metrics").classes("w-full"), "run-metrics")
    charts_box = ui.grid(columns=2).classes("w-full gap-4")
    _evaluation_curves(Path(root), path)
    samples = SamplesSection(path, step)
    log_box = ui.expansion("output of the job started here", value=False).classes("w-full")
    with log_box:
        log = ui.log(max_lines=400).classes("w-full h-64 text-caption")
    state = {"tail": MetricsTail(path / "metrics.jsonl"), "rows": [], "charts": {},
             "shown_lines": 0, "summary_key": None}

    def draw_charts() -> None:
        charts_box.clear()
        state["charts"] = {}
        with charts_box:
            for metric in picker.value or []:
                with ui.card().classes("w-full"):
                    caption = tid(ui.label(metric).classes("text-subtitle2"), f"curve-{metric}")
                    chart = _line_chart(metric)
                    state["charts"][metric] = (chart, caption)
        fill_charts()

    def fill_charts() -> None:
        rows = state["rows"]
        for metric, (chart, caption) in state["charts"].items():
            points = [[r["step"], r[metric]] for r in rows
                      if isinstance(r.get(metric), (int, float))]
            chart.options["series"] = [{"type": "line", "name": metric, "data": points,
                                        "showSymbol": len(points) < 60}]
            chart.update()
            last = f", last {points[-1][1]:.4g}" if points else ""
            caption.text = f"{metric}: {len(points)} points{last}"

    def on_pick(_=None) -> None:
        draw_charts()

    picker.on_value_change(on_pick)

    def refresh() -> None:
        samples.refresh()
        new, reset = state["tail"].read()
        if reset:
            state["rows"] = []
        if new or reset:
            state["rows"].extend(new)
            names = metric_names(state["rows"])
            if names != picker.options:
                picker.options = names
                picker.update()
                if not picker.value:
                    picker.value = names[:4]  # metric_names puts loss, reward, kl first
                    return  # on_pick draws
            fill_charts()
        if not path.is_dir():
            run = None
        else:
            run = _read_run(path, Path(root))
        key = None if run is None else (run.summary is not None, run.error, tuple(run.checkpoints), run.metrics_rows)
        job = settings.launcher.job(path)
        if run is not None and job is not None and job.running and run.pid is None:
            run.pid = job.pid  # started here, not yet holding the run's lock
        if run is not None:
            key = (*key, run.pid)
        if run is not None and key != state["summary_key"]:
            state["summary_key"] = key
            summary_box.clear()
            with summary_box:
                for k, v in _summary_items(run):
                    with ui.card().classes("q-pa-sm"):
                        ui.label(k).classes("text-caption text-grey-8")
                        tid(ui.label(v).classes("text-body1 text-weight-medium"),
                            "summary-" + re.sub(r"[^a-z0-9]+", "-", k.lower()).strip("-"))
            if run.error:
                message.text = run.error
        mine = job is not None and job.running
        running = mine or (run is not None and run.pid is not None)  # here or elsewhere
        stop_btn.set_visibility(running and not (mine and job.stopping))
        resume_btn.set_visibility(run is not None and not running and run.summary is None
                                  and bool(run.checkpoints) and run.config is not None)
        if job is not None:
            err = job.error_line()
            job_state.text = f"job: {job.state} (pid {job.pid})" + (f": {err}" if err else "")
            log_box.set_visibility(True)
            lines = list(job.output)
            if len(lines) != state["shown_lines"]:
                log.clear()
                for line in lines:
                    log.push(line)
                state["shown_lines"] = len(lines)
        else:
            job_state.text = ""
            log_box.set_visibility(False)

    def stop() -> None:
        try:
            settings.launcher.stop(path)
            ui.notify("stopping: the job finishes its step and writes a checkpoint")
        except GymError as exc:
            message.text = str(exc)
        refresh()

    def resume() -> None:
        run = _read_run(path, Path(root))
        overrides = resume_overrides(run)
        if overrides is None:
            message.text = f"{path}/.hydra/overrides.yaml cannot be read: resume it from the " \
                           "command line (the same run.name)"
            return
        try:
            settings.launcher.launch(overrides, path)
            message.text = ""
        except GymError as exc:
            message.text = str(exc)
        refresh()

    stop_btn.on_click(stop)
    resume_btn.on_click(resume)
    title.text = name
    refresh()
    ui.timer(1.0, refresh)


@ui.page("/sweep")
def sweep_page(root: str | None = None, name: str = "") -> None:
    from gym_core.train.sweep import objective

    frame("Runs")
    root = _root_arg(root)
    ui.link("← all runs", "/?" + urlencode({"root": root})).classes("text-primary")
    ui.label(f"sweep {name}").classes("text-h5 q-my-sm")
    message = error_line("sweep-error")
    try:
        folder = check_root(root) / name
        if not name or not folder.is_dir():
            raise GymError(f"there is no sweep {name!r} in {root}")
    except GymError as exc:
        message.text = str(exc)
        return
    columns = [{"name": k, "label": lbl, "field": k, "align": "left"} for k, lbl in
               [("rank", "#"), ("name", "job"), ("objective", "objective"), ("status", "status"),
                ("algorithm", "method"), ("quant", "quantizer"), ("steps", "steps"),
                ("before", "before"), ("after", "after"), ("after_quant", "after quant"),
                ("overrides", "overrides (what differs)")]]
    table = tid(ui.table(columns=columns, rows=[], row_key="name").classes("w-full"),
                "sweep-table")
    table.add_slot("body-cell-name", LINK_CELL)
    metric = tid(ui.select(["loss"], value="loss", label="metric").classes("w-64"),
                 "sweep-metric")
    caption = tid(ui.label("").classes("text-subtitle2"), "sweep-curves")
    chart = tid(_line_chart("loss"), "sweep-chart")
    tails: dict[str, MetricsTail] = {}
    rows_of: dict[str, list] = {}

    def refresh() -> None:
        from gym_core.ui.runs import is_run_dir

        jobs = [_read_run(c, Path(root)) for c in sorted(folder.iterdir())
                if c.is_dir() and is_run_dir(c)]
        from gym_core.ui.runs import Sweep

        ranked = Sweep(folder, name, jobs).ranked()
        overrides = [set((j.summary or {}).get("overrides") or []) for j in ranked]
        common = set.intersection(*overrides) if overrides else set()
        rows = []
        for i, j in enumerate(ranked, 1):
            row = j.row()
            score = objective(j.summary) if j.summary else None
            row.update(rank=i, name=j.path.name, objective=fmt_score(score),
                       href=run_href(root, j.name),
                       overrides=" ".join(o for o in (j.summary or {}).get("overrides") or []
                                          if o not in common))
            rows.append(row)
        table.rows = rows
        table.update()
        for j in ranked:
            tail = tails.setdefault(j.path.name, MetricsTail(j.path / "metrics.jsonl"))
            new, reset = tail.read()
            if reset:
                rows_of[j.path.name] = []
            rows_of.setdefault(j.path.name, []).extend(new)
        names = metric_names([r for rs in rows_of.values() for r in rs])
        if names and names != metric.options:
            metric.options = names
            metric.update()
        key = metric.value
        chart.options["yAxis"]["name"] = key
        chart.options["series"] = [
            {"type": "line", "name": f"job {j.path.name}", "showSymbol": False,
             "color": COLORS[i % len(COLORS)],
             "data": [[r["step"], r[key]] for r in rows_of.get(j.path.name, [])
                      if isinstance(r.get(key), (int, float))]}
            for i, j in enumerate(ranked)]
        chart.update()
        caption.text = f"{key}, one curve per job: " + ", ".join(
            f"{s['name']} ({len(s['data'])} points)" for s in chart.options["series"])

    metric.on_value_change(lambda _: refresh())
    refresh()
    ui.timer(3.0, refresh)
