"""``python -m gym_core.ui``: gym's web UI (runs and their live curves, sweeps, New run,
Data, Playground, Variants). Needs the ``ui`` extra (``pip install -e '.[ui]'``); the
modules here other than :mod:`gym_core.ui.app` import no UI library, so the CLI's
``--help`` never loads one."""
