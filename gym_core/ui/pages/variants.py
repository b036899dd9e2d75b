"""The Variants page: a runs folder's variants, served or not, and their export."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from nicegui import run, ui

from gym_core.base.errors import GymError
from gym_core.ui import configs
from gym_core.ui.client import ServeClient, ServeError
from gym_core.ui.layout import (
    _root_arg,
    error_line,
    frame,
    settings,
    tid,
)
from gym_core.ui.runs import (
    fmt_bytes,
)
from gym_core.ui.runs import scan as _scan

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
