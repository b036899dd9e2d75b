"""The New run page: a form built from the config groups, the command it composes, launching it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from nicegui import run, ui

from gym_core.base.errors import GymError
from gym_core.ui import configs
from gym_core.ui.layout import (
    error_line,
    frame,
    run_href,
    settings,
    tid,
)


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
