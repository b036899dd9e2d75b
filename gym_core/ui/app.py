"""The pages of ``python -m gym_core.ui`` (NiceGUI: FastAPI on the server, Vue/Quasar
and ECharts in the browser, every asset served by the package itself).

Runs, a run's live curves, sweeps, New run, Data, Playground and Variants. The pages only
lay things out: what they show comes from :mod:`gym_core.ui.runs`, :mod:`.configs`,
:mod:`.data_view`, :mod:`.launcher` and :mod:`.client`. Every user error is shown in the
page (a red line naming the problem) and the server carries on.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import quote

from nicegui import app, background_tasks, ui

import gym_core.ui.pages  # noqa: F401  (registers every page)
from gym_core.ui.layout import settings


def start(host: str, port: int, runs: Path, serve_url: str, api_key: str | None,
          token: str | None = None) -> None:
    """Serve the pages (blocks until Ctrl-C / SIGTERM); with ``token``, every request
    needs it (:mod:`gym_core.ui.auth`)."""
    if token:
        from gym_core.ui.auth import TokenGuard

        app.add_middleware(TokenGuard, token=token, port=port)
    address = f"http://{host}:{port}/" + (f"?token={token}" if token else "")
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
        print(f"gym ui: {address}  (runs folder {runs}, server {serve_url})", flush=True)

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
