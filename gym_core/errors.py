"""User-facing errors: a sentence that says what was wrong, where, and the fix."""

from __future__ import annotations

import contextlib
import sys


class GymError(Exception):
    """Bad input from the user (config, data file, model path, checkpoint, plugin).

    Printed without a traceback; the process exits with status 2.
    """


@contextlib.contextmanager
def exit_on_user_error():
    from gym_core.plugins import PluginError
    from gym_core.registry import RegistryError

    try:
        yield
    except (GymError, PluginError, RegistryError) as exc:
        print(f"gym: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
