"""What every page of the UI shares: its settings, the header, the red error line, links."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

from nicegui import ui

from gym_core.ui.launcher import Launcher


@dataclass
class Settings:
    runs: Path = Path("runs")  # the runs folder the pages open first
    serve_url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    launcher: Launcher = field(default_factory=Launcher)


settings = Settings()

PAGES = [("/", "Runs"), ("/new", "New run"), ("/data", "Data"), ("/playground", "Playground"),
         ("/variants", "Variants"), ("/compare", "Compare")]
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


def _pre(text: str) -> str:
    import html

    return ('<pre style="white-space: pre-wrap; margin: 0; padding: 6px; background: #f4f4f4; '
            f'border-radius: 4px; font-size: 13px">{html.escape(text)}</pre>')
