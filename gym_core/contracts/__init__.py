"""Contract test suites a plugin author runs against their own implementation.

Each module here holds a pytest class that checks what gym relies on for one family
(:mod:`gym_core.contracts.quantizer`; a plugin that declares a family ships its own, e.g.
``gym_cl_grpo.contracts`` for experience stores).
A plugin's test file subclasses it and provides the implementation through a fixture;
pytest then runs every contract test on it. ``docs/plugins.md`` shows how.

The modules import pytest and torch: import them from tests only, never from a plugin's
``__init__`` (which must stay cheap for ``python -m gym_core --help``).
"""
