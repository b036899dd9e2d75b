"""User-facing errors: a sentence that says what was wrong, where, and the fix."""

from __future__ import annotations

import contextlib
import sys


class GymError(Exception):
    """Bad input from the user (config, data file, model path, checkpoint, plugin).

    Printed without a traceback; the process exits with status 2. Every error gym raises
    for something a user can fix derives from it (:class:`gym_core.plugins.PluginError`,
    :class:`gym_core.registry.RegistryError`, ...).
    """


@contextlib.contextmanager
def exit_on_user_error():
    try:
        yield
    except GymError as exc:
        print(f"gym: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
