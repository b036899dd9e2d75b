"""The UI's pages, one module each; importing this package registers every page."""

from gym_core.ui.pages import (  # noqa: F401
    compare,
    data,
    new_run,
    playground,
    runs_page,
    variants,
)
