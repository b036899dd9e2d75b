"""The pages of ``python -m gym_core.ui`` (NiceGUI: FastAPI on the server, Vue/Quasar
and ECharts in the browser, every asset served by the package itself).

Runs, a run's live curves, sweeps, New run, Data, Playground and Variants. The pages only
lay things out: what they show comes from :mod:`gym_core.ui.runs`, :mod:`.configs`,
:mod:`.data_view`, :mod:`.launcher` and :mod:`.client`. Every user error is shown in the
page (a red line naming the problem) and the server carries on.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlencode

from nicegui import app, background_tasks, run, ui

from gym_core.errors import GymError
from gym_core.ui import configs
from gym_core.ui.client import ServeClient, ServeError
from gym_core.ui.launcher import Launcher
from gym_core.ui.runs import (
    MetricsTail,
    check_root,
    fmt_bytes,
    fmt_score,
    metric_names,
    resume_overrides,
)
from gym_core.ui.runs import read_run as _read_run
from gym_core.ui.runs import scan as _scan


@dataclass
class Settings:
    runs: Path = Path("runs")  # the runs folder the pages open first
    serve_url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    launcher: Launcher = field(default_factory=Launcher)


settings = Settings()

PAGES = [("/", "Runs"), ("/new", "New run"), ("/data", "Data"), ("/playground", "Playground"),
         ("/variants", "Variants")]
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf"]


def tid(element, name: str):
    """A stable handle for browser tests (``data-testid``)."""
    return element.props(f'data-testid="{name}"')


def frame(title: str) -> None:
    ui.page_title(f"gym · {title}")
    ui.query("body").classes("bg-grey-1")
    with ui.header().classes("items-center bg-white text-black shadow-1 q-py-xs"):
        ui.label("gym").classes("text-h6 text-weight-bold q-mr-md")
        for path, label in PAGES:
            link = ui.link(label, path).classes("q-mx-sm text-body1 no-underline")
            link.classes("text-weight-bold text-primary" if label == title else "text-grey-9")


def error_line(name: str):
    """A red line for a page's messages (hidden while empty)."""
    label = tid(ui.label("").classes("text-negative text-body1 q-my-sm"), name)
    label.bind_visibility_from(label, "text", backward=bool)
    return label


def run_href(root: Path | str, name: str) -> str:
    return "/run?" + urlencode({"root": str(root), "name": name})


def _root_arg(root: str | None) -> str:
    return root if root else str(settings.runs)


# ----------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------

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
            from gym_core.sweep import objective

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


@ui.page("/run")
def run_page(root: str | None = None, name: str = "") -> None:
    frame("Runs")
    root = _root_arg(root)
    ui.link("← all runs", "/?" + urlencode({"root": root})).classes("text-primary")
    title = tid(ui.label(name).classes("text-h5 q-my-sm"), "run-title")
    message = error_line("run-error")
    path = Path(root) / name
    if settings.launcher.job(path) is None:  # a job started here may not have made it yet
        try:
            path = check_root(root) / name
            if not name or not path.is_dir():
                raise GymError(f"there is no run {name!r} in {root}")
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
    from gym_core.sweep import objective

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


# ----------------------------------------------------------------------------------------
# New run
# ----------------------------------------------------------------------------------------


@ui.page("/new")
def new_run_page() -> None:
    frame("New run")
    try:
        options = configs.groups()
        base = configs.compose([])
    except GymError as exc:
        error_line("new-error").text = str(exc)
        return
    state = {"defaults": dict(base.choices), "selected": dict(base.choices), "values": {},
             "fields": {}, "composed": base, "dirty": True}
    if str(settings.runs) != "runs":
        state["values"]["run.root"] = configs.quote(str(settings.runs))

    with ui.row().classes("w-full no-wrap items-start gap-4"):
        form = ui.column().classes("w-1/2")
        with ui.column().classes("w-1/2"):
            message = error_line("new-error")
            ui.label("Command").classes("text-subtitle1")
            cmd = tid(ui.code("", language="bash").classes("w-full"), "new-command")
            with ui.row():
                tid(ui.button("Launch", on_click=lambda: launch()), "new-launch")
            ui.label("Composed config").classes("text-subtitle1 q-mt-md")
            yaml_box = tid(ui.code("", language="yaml").classes("w-full"), "new-yaml")

    def overrides() -> list[str]:
        return configs.build_overrides(state["selected"], state["defaults"], state["values"],
                                       state["fields"])

    busy = asyncio.Lock()  # one composition at a time per page

    async def compose(ovr: list[str]):
        """Compose off the event loop (Hydra takes a moment); the page stays live."""
        return await run.io_bound(configs.checked, ovr)

    async def update_preview() -> bool:
        """Check every field, compose, show the YAML and command; False on an error."""
        async with busy:
            state["dirty"] = False
            flds = list(state["fields"].values())
            err = configs.first_error(flds, state["values"])
            ovr = overrides()
            cmd.content = configs.command(ovr)
            if err:
                message.text = err
                return False
            try:
                composed = await compose(ovr)
            except GymError as exc:
                message.text = str(exc)
                return False
            if composed is None:  # the app is shutting down
                return False
            state["composed"] = composed
            message.text = ""
            yaml_box.content = composed.yaml()
            return True

    async def pick(group: str, option: str) -> None:
        async with busy:
            state["selected"][group] = option
            # a new option has its own fields: forget the values typed for the old one
            state["values"] = {k: v for k, v in state["values"].items()
                               if not k.startswith(f"{group}.")}
            try:
                composed = await compose(overrides())
            except GymError as exc:
                message.text = str(exc)
                return
            if composed is None:
                return
            # groups a plugin's option pulls in (or drops) follow Hydra's choices
            state["selected"] = {g: state["selected"].get(g, o)
                                 for g, o in composed.choices.items()}
            state["defaults"].update({g: o for g, o in composed.choices.items()
                                      if g not in state["defaults"]})
            state["composed"] = composed
            build_form.refresh()
        await update_preview()

    def set_value(key: str, value) -> None:
        f = state["fields"][key]
        state["values"][key] = value if isinstance(value, str) else configs.to_text(value)
        del f
        state["dirty"] = True

    @ui.refreshable
    def build_form() -> None:
        cfg = state["composed"].cfg
        state["fields"] = {}
        for group, is_group in configs.sections(state["composed"]):
            option = state["selected"].get(group) if is_group else None
            with ui.card().classes("w-full"):
                with ui.row().classes("items-center w-full"):
                    ui.label(group).classes("text-subtitle1 text-weight-bold")
                    if is_group:
                        sel = tid(ui.select(options.get(group, [option]), value=option)
                                  .classes("w-48"), f"group-{group}")
                        sel.on_value_change(lambda e, g=group: pick(g, e.value))
                with ui.grid(columns=2).classes("w-full gap-x-4 gap-y-0"):
                    for f in configs.fields(cfg, group, option):
                        state["fields"][f.key] = f
                        _field_input(f, state, set_value)

    with form:
        build_form()

    async def tick() -> None:
        if state["dirty"] and not busy.locked():
            await update_preview()

    ui.timer(0.5, tick)

    async def launch() -> None:
        if not await update_preview():
            ui.notify("not launched: " + message.text, type="negative")
            return
        ovr = overrides()
        cfg = state["composed"].cfg
        if not any(o.startswith("run.name=") for o in ovr):
            name = f"{state['selected'].get('algorithm', 'run')}-{time.strftime('%Y%m%d-%H%M%S')}"
            ovr.append(f"run.name={name}")
        else:
            name = str(cfg.run.name)
        run_dir = Path(str(cfg.run.root)) / name
        try:
            settings.launcher.launch(ovr, run_dir)
        except GymError as exc:
            message.text = str(exc)
            ui.notify(str(exc), type="negative")
            return
        ui.navigate.to(run_href(str(cfg.run.root), name))


def _field_input(f: configs.Field, state: dict, set_value) -> None:
    """One input for one field: a switch for booleans, a select for enums, text for the
    rest (checked as typed: the page says which field is wrong and why)."""
    short = f.key.split(".", 1)[1]
    hint = f.kind + (" or null" if f.optional else "") + (", required" if f.required else "")
    current = state["values"].get(f.key, f.default_text)
    if f.kind == "bool" and not f.optional:
        sw = ui.switch(short, value=current == "true")
        tid(sw, f"field-{f.key}")
        sw.on_value_change(lambda e, k=f.key: set_value(k, "true" if e.value else "false"))
        return
    if f.kind == "enum" and f.choices:
        sel = ui.select(f.choices, value=current or None, label=short)
        tid(sel, f"field-{f.key}")
        sel.on_value_change(lambda e, k=f.key: set_value(k, e.value or ""))
        return
    placeholder = "required" if f.required else f"default: {f.computed}" if f.computed else None
    box = ui.input(short, value=current, placeholder=placeholder,
                   validation=lambda v, fld=f: configs.check_value(fld, v or ""))
    box.props(f'hint="{hint}" dense')
    tid(box, f"field-{f.key}")
    box.on_value_change(lambda e, k=f.key: set_value(k, e.value or ""))


# ----------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------


@ui.page("/data")
def data_page() -> None:
    from gym_core.ui.data_view import view

    frame("Data")
    try:
        options = configs.groups()
        base = configs.compose([])
    except GymError as exc:
        error_line("data-error").text = str(exc)
        return
    with ui.row().classes("items-end w-full"):
        data = tid(ui.select(options["data"], value=base.choices["data"], label="data")
                   .classes("w-40"), "data-option")
        algo = tid(ui.select(options["algorithm"], value=base.choices["algorithm"],
                             label="algorithm").classes("w-40"), "data-algorithm")
        model = tid(ui.select(options["model"], value=base.choices["model"], label="model")
                    .classes("w-40"), "data-model")
        split = tid(ui.toggle(["train", "test"], value="train"), "data-split")
        start = tid(ui.number("first row", value=0, min=0, precision=0).classes("w-24"),
                    "data-start")
        count = tid(ui.select([4, 8, 16, 32], value=8, label="rows").classes("w-20"),
                    "data-count")
    extra = tid(ui.input("more overrides (e.g. data.train_file=my.jsonl "
                         "data.system_prompt='Answer briefly.')").classes("w-full"),
                "data-overrides")
    tid(ui.button("Show", on_click=lambda: show()), "data-show")
    message = error_line("data-error")
    info = tid(ui.label("Pick a dataset, a method and a model, then Show (the model's "
                        "tokenizer is loaded, not its weights).").classes("text-body2 q-my-sm"),
               "data-info")
    problem = tid(ui.label("").classes("text-warning text-body1"), "data-problem")
    problem.bind_visibility_from(problem, "text", backward=bool)
    rows_box = ui.column().classes("w-full")

    async def show() -> None:
        try:
            ovr = [f"data={data.value}", f"algorithm={algo.value}", f"model={model.value}",
                   *shlex.split(extra.value or "")]
        except ValueError as exc:
            message.text = f"more overrides: {exc}"
            return
        message.text = ""
        info.text = "loading the data and the tokenizer ..."
        try:
            result = await run.io_bound(view, ovr, split.value, int(start.value or 0),
                                        int(count.value))
        except GymError as exc:
            message.text, info.text = str(exc), ""
            rows_box.clear()
            return
        if result is None:
            return
        info.text = (f"data={result.data}: {result.total} {result.split} rows; showing "
                     f"{result.start}..{result.start + len(result.rows) - 1}, rendered for "
                     f"algorithm={result.algorithm} with {result.model}'s chat template. "
                     f"The method reads {result.reads}.")
        problem.text = result.problem or ""
        rows_box.clear()
        with rows_box:
            for k, row in enumerate(result.rows):
                with tid(ui.card().classes("w-full"), f"data-row-{k}"):
                    ui.label(f"row {row.index}").classes("text-subtitle2")
                    for seq in row.sequences:
                        cut = " (cut by the length limit)" if seq.cut else ""
                        ui.label(f"{seq.label}: {seq.tokens} tokens{cut}").classes(
                            "text-caption text-grey-8")
                        tid(ui.html("").classes("w-full"), f"data-seq-{k}-{seq.label.split()[0]}"
                            ).content = _pre(seq.text)
                    if row.target is not None:
                        tid(ui.label(f"answer (what the reward checks): {row.target}"),
                            f"data-answer-{k}")
                    with ui.expansion("the row as the data plugin gives it").classes("w-full"):
                        ui.code(row.source_json(), language="json").classes("w-full")



def _pre(text: str) -> str:
    import html

    return ('<pre style="white-space: pre-wrap; margin: 0; padding: 6px; background: #f4f4f4; '
            f'border-radius: 4px; font-size: 13px">{html.escape(text)}</pre>')


# ----------------------------------------------------------------------------------------
# Playground
# ----------------------------------------------------------------------------------------


@ui.page("/playground")
def playground_page(models: str | None = None) -> None:
    """``?models=a,b`` opens with those models side by side."""
    frame("Playground")
    with ui.row().classes("items-end w-full"):
        url = tid(ui.input("server", value=settings.serve_url).classes("w-80"), "play-url")
        tid(ui.button("Connect", on_click=lambda: connect()), "play-connect")
        chosen = tid(ui.select([], multiple=True, label="models side by side").classes(
            "min-w-[300px]"), "play-models")
    with ui.row().classes("items-end w-full"):
        system = tid(ui.input("system prompt (empty: the chat template's default)").classes(
            "w-96"), "play-system")
        temperature = tid(ui.number("temperature", value=0.0, min=0, max=2, step=0.1).classes(
            "w-28"), "play-temperature")
        max_tokens = tid(ui.number("max tokens", value=64, min=1, precision=0).classes("w-28"),
                         "play-max-tokens")
        seed = tid(ui.input("seed").classes("w-20"), "play-seed")
        tid(ui.button("Clear", on_click=lambda: clear()).props("flat"), "play-clear")
    message = error_line("play-error")
    columns_box = ui.row().classes("w-full no-wrap items-start gap-4")
    with ui.row().classes("w-full items-end"):
        prompt = tid(ui.textarea("message").props("autogrow").classes("flex-grow"), "play-prompt")
        send_btn = tid(ui.button("Send", on_click=lambda: send()), "play-send")
    histories: dict[str, list[dict[str, str]]] = {}
    boxes: dict[str, ui.column] = {}
    turn = {"n": 0}

    def client() -> ServeClient:
        return ServeClient(url.value.strip(), settings.api_key)

    async def connect() -> None:
        try:
            served = await client().models()
        except ServeError as exc:
            message.text = str(exc)
            return
        message.text = ""
        chosen.options = served
        asked = [m for m in (models or "").split(",") if m]
        missing = [m for m in asked if m not in served]
        if missing:
            message.text = f"not served by {url.value}: {', '.join(missing)}"
        chosen.value = [m for m in (asked or chosen.value or []) if m in served] or served[:2]
        chosen.update()

    def layout() -> None:
        for m in list(boxes):
            if m not in (chosen.value or []):
                del boxes[m]
        columns_box.clear()
        with columns_box:
            for m in chosen.value or []:
                with ui.card().classes("flex-1 min-w-0"):
                    ui.label(m).classes("text-subtitle1 text-weight-bold")
                    box = ui.column().classes("w-full")
                    boxes[m] = box
                    with box:
                        for i, msg in enumerate(histories.get(m, [])):
                            _bubble(m, msg["role"], msg["content"], i // 2 + 1)

    chosen.on_value_change(lambda _: layout())

    def clear() -> None:
        histories.clear()
        turn["n"] = 0
        layout()

    async def answer(model: str, text: str, n: int) -> None:
        history = histories.setdefault(model, [])
        history.append({"role": "user", "content": text})
        with boxes[model]:
            _bubble(model, "user", text, n)
            label = _bubble(model, "assistant", "", n)
        messages = ([{"role": "system", "content": system.value}] if system.value else []) \
            + history
        params = {"temperature": float(temperature.value or 0.0),
                  "max_tokens": int(max_tokens.value or 64)}
        if (seed.value or "").strip():
            params["seed"] = int(seed.value)
        pieces = []
        try:
            async for piece in client().stream_chat(model, messages, **params):
                pieces.append(piece)
                label.text = "".join(pieces)
        except ServeError as exc:
            history.pop()  # the turn did not happen: it is not sent again
            label.text = f"error: {exc}"
            label.classes("text-negative")
            message.text = f"{model}: {exc}"
            return
        history.append({"role": "assistant", "content": "".join(pieces)})
        tid(label, f"answer-{model}-{n}-done")

    async def send() -> None:
        text = prompt.value or ""
        if not text.strip():
            message.text = "type a message first"
            return
        models = list(chosen.value or [])
        if not models:
            message.text = "connect to a server and pick at least one model"
            return
        if seed.value and not seed.value.strip().lstrip("-").isdigit():
            message.text = f"seed: {seed.value!r} is not an integer"
            return
        message.text = ""
        if set(models) != set(boxes):
            layout()
        turn["n"] += 1
        prompt.value = ""
        send_btn.disable()
        try:
            await asyncio.gather(*(answer(m, text, turn["n"]) for m in models))
        finally:
            send_btn.enable()

    ui.timer(0.1, connect, once=True)


def _bubble(model: str, role: str, text: str, n: int):
    """A chat message; returns the label holding its text (updated while streaming)."""
    with ui.chat_message(name="you" if role == "user" else model, sent=role == "user"):
        label = ui.label(text).style("white-space: pre-wrap")
    return tid(label, f"{'question' if role == 'user' else 'answer'}-{model}-{n}")


# ----------------------------------------------------------------------------------------
# Variants
# ----------------------------------------------------------------------------------------

EXPORT_FORMATS = ["hf", "gguf", "lora", "delta"]


@ui.page("/variants")
def variants_page(root: str | None = None) -> None:
    frame("Variants")
    with ui.row().classes("items-end w-full"):
        url = tid(ui.input("server", value=settings.serve_url).classes("w-80"), "var-url")
        folder = tid(ui.input("Runs folder", value=_root_arg(root)).classes("w-96"),
                     "var-folder")
        tid(ui.button("Refresh", on_click=lambda: refresh()), "var-refresh")
    message = error_line("var-error")
    ui.label("Served by the server").classes("text-h6 q-mt-md")
    served_box = tid(ui.column().classes("w-full"), "var-served")
    ui.label("Runs").classes("text-h6 q-mt-md")
    runs_box = tid(ui.column().classes("w-full"), "var-runs")
    out = tid(ui.code("", language="text").classes("w-full"), "var-output")
    out.set_visibility(False)

    def client() -> ServeClient:
        return ServeClient(url.value.strip(), settings.api_key)

    async def refresh() -> None:
        message.text = ""
        try:
            served = await client().variants()
        except ServeError as exc:
            message.text = str(exc)
            served = None
        served_box.clear()  # after the answer: the list is never empty in between
        with served_box:
            if served is not None and not served:
                ui.label("no variants (the base model only)").classes("text-grey-8")
            for v in served or []:
                with tid(ui.row().classes("items-center"), f"served-{v['id']}"):
                    ui.label(v["id"]).classes("text-weight-bold w-40")
                    ui.label(f"{v.get('kind', '')}, {fmt_bytes(v.get('bytes'))}, from "
                             f"{v.get('source', '')}").classes("text-body2")
                    tid(ui.button("Remove", color="negative",
                                  on_click=lambda _, n=v["id"]: remove(n)).props("flat dense"),
                        f"remove-{v['id']}")
        runs_box.clear()
        try:
            runs, sweeps = _scan(folder.value.strip())
        except GymError as exc:
            message.text = str(exc)
            return
        served_names = {v["id"] for v in served or []}
        candidates = [r for r in runs if r.summary is not None] + \
            [j for s in sweeps for j in s.jobs if j.summary is not None]
        with runs_box:
            if not candidates:
                ui.label("no finished runs in this folder").classes("text-grey-8")
            for r in candidates:
                _variant_row(r, served_names, serve, export)

    async def remove(name: str) -> None:
        try:
            await client().remove_variant(name)
            ui.notify(f"variant {name} removed")
        except ServeError as exc:
            message.text = str(exc)
        await refresh()

    async def serve(name: str, path: Path) -> None:
        if not name.strip():
            message.text = "give the variant a name"
            return
        try:
            v = await client().add_variant(name.strip(), str(path.resolve()))
            ui.notify(f"variant {v['id']} added ({v.get('kind')})")
        except ServeError as exc:
            message.text = str(exc)
            return
        await refresh()

    async def export(path: Path, fmt: str) -> None:
        message.text = ""
        out.set_visibility(True)
        out.content = f"$ python -m gym_core.export run={path} format={fmt}\n(running ...)"
        code, text = await run.io_bound(_export, path, fmt)
        out.content = f"$ python -m gym_core.export run={path} format={fmt}\n{text}"
        if code != 0:
            message.text = _last_error(text) or f"the export failed (exit status {code})"

    ui.timer(0.1, refresh, once=True)


def _variant_row(run, served_names: set[str], serve, export) -> None:
    default = run.name.replace("/", "-")
    with tid(ui.row().classes("items-center w-full"), f"var-run-{default}"):
        ui.label(run.name).classes("text-weight-bold w-48")
        has = [p for p in ("delta", "final") if (run.path / p).exists()]
        ui.label(f"{run.algorithm or ''} {run.quant or ''} · {', '.join(has) or 'no weights'}"
                 ).classes("text-body2 w-64")
        fmt = tid(ui.select(EXPORT_FORMATS, value="hf").classes("w-24"), f"export-format-{default}")
        tid(ui.button("Export", on_click=lambda: export(run.path, fmt.value)).props("outline"),
            f"export-{default}")
        name = tid(ui.input("variant name", value=default).classes("w-40"),
                   f"serve-name-{default}")
        btn = tid(ui.button("Serve", on_click=lambda: serve(name.value, run.path)),
                  f"serve-{default}")
        if default in served_names:
            btn.props("color=grey")
            ui.label("served").classes("text-positive")


def _export(path: Path, fmt: str) -> tuple[int, str]:
    """``python -m gym_core.export run=PATH format=FMT`` in a subprocess: (status, output)."""
    cmd = [sys.executable, "-m", "gym_core.export", f"run={configs.quote(str(path))}",
           f"format={fmt}"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600,
                              cwd=settings.launcher.cwd)
    except subprocess.TimeoutExpired:
        return 1, "the export took more than an hour and was stopped"
    return done.returncode, (done.stdout + done.stderr).strip()


def _last_error(text: str) -> str | None:
    for line in reversed(text.splitlines()):
        if line.startswith("gym: error:"):
            return line.removeprefix("gym: error:").strip()
        if "No module named gym_core.export" in line:
            return "exporting needs gym_core.export, which this installation of gym lacks"
    return None


def start(host: str, port: int, runs: Path, serve_url: str, api_key: str | None) -> None:
    """Serve the pages (blocks until Ctrl-C / SIGTERM)."""
    settings.runs = runs
    settings.serve_url = serve_url
    settings.api_key = api_key

    async def announce() -> None:
        # startup hooks run before uvicorn binds its socket: say the address once a
        # connection to it succeeds, so whoever waits for the line can open the page
        for _ in range(600):
            try:
                _, writer = await asyncio.open_connection(host, port)
                writer.close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        print(f"gym ui: http://{host}:{port}  (runs folder {runs}, server {serve_url})",
              flush=True)

    def farewell() -> None:
        for job in settings.launcher.still_running():
            print(f"gym ui: run {job.run_dir} (pid {job.pid}) is still training; stop it with "
                  f"kill -TERM {job.pid} (it checkpoints)", flush=True)
        settings.launcher.close()
        print("gym ui: stopped", flush=True)
        # uvicorn re-raises SIGINT / SIGTERM once it has shut down; they are the normal way
        # to stop the UI, so it ends with status 0 instead
        from nicegui.server import Server

        captured = getattr(Server.instance, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()

    app.on_startup(lambda: background_tasks.create(announce(), name="announce"))
    app.on_shutdown(farewell)
    ui.run(host=host, port=port, title="gym", reload=False, show=False, dark=False,
           favicon=str(Path(__file__).with_name("favicon.svg")),
           show_welcome_message=False, uvicorn_logging_level="warning",
           reconnect_timeout=10.0)


__all__ = ["start", "settings", "quote"]
