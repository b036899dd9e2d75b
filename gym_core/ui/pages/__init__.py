"""The UI's pages, one module each; importing this package registers every page."""

from gym_core.ui.pages import data, new_run, playground, runs_page, variants  # noqa: F401
