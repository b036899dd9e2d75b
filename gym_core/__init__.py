"""gym: a plugin-registry framework for post-training language models.

The public names a plugin needs are importable from here without importing torch.

For notebooks and scripts (:mod:`gym_core.scripting`, loaded on first use; no torch until
a run starts)::

    import gym_core
    result = gym_core.run(["model=tiny", "trainer.max_steps=2", "run.name=nb"])
    result.summary, result.paths, result.metrics()   # summary.json, files, a DataFrame
    result.export(format="hf"); server = result.serve()

- ``compose(overrides)``: the config ``gym train OVERRIDES`` would run;
- ``run(config_or_overrides, run_dir=None)``: run it, get a ``Result``;
- ``open_run(path)``: the ``Result`` of a run made earlier;
- ``export_run(run, format=...)``, ``start_server(base, variants)``, ``evaluate(*args)``.
"""

from gym_core.plugin.hookspecs import hookimpl, hookspec

__version__ = "0.3.0"
#: The plugin API version; plugins may declare which one they need.
API_VERSION = "2"

#: The Python API for notebooks and scripts, loaded on first access.
_SCRIPTING = ("compose", "run", "open_run", "export_run", "start_server", "evaluate",
              "Result", "Server")

__all__ = ["API_VERSION", "__version__", "hookimpl", "hookspec", *_SCRIPTING]


def __getattr__(name: str):
    if name in _SCRIPTING:
        from gym_core import scripting

        return getattr(scripting, name)
    raise AttributeError(f"module 'gym_core' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_SCRIPTING])
