"""``python -m gym_core [overrides]``: compose the config with Hydra and run one job.

Start-up stays light: plugins are discovered and their schemas registered (no torch),
and the heavy modules are imported only when a job actually runs.
``python -m gym_core --plugins`` lists the installed plugins and exits.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from gym_core.startup import bootstrap


@hydra.main(version_base=None, config_path="pkg://gym_core.conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from gym_core.errors import exit_on_user_error
    from gym_core.run import run_job

    with exit_on_user_error():
        summary = run_job(cfg)
    # The return value is what sweepers (Optuna) optimise: held-out accuracy at the end.
    ev = summary.get("eval", {})
    best = ev.get("after_quant") if ev.get("after_quant") is not None else ev.get("after")
    return best


HELP_HEADER = """\
gym: post-training for language models, one plugin per method.
Usage: python -m gym_core [group=option ...] [key=value ...]   (-m for a sweep)
"""

HELP_FOOTER = """\
Examples:
  python -m gym_core algorithm=grpo quant=bitdelta
  python -m gym_core model=tiny trainer.max_steps=2 run.name=smoke
  python -m gym_core -m algorithm=grpo,dr_grpo algorithm.lr=1e-5,3e-5
  python -m gym_core algorithm=dpo --help          # the config those options give
Plugins: --plugins lists them (distribution, version, options added);
GYM_DISABLE_PLUGINS=name1,name2 skips installed plugins; docs/plugins.md.
Powered by Hydra (https://hydra.cc); --hydra-help shows Hydra's own options.
"""


def config_groups() -> dict[str, list[str]]:
    """Every config group and its options: the schemas stored by plugins and the core,
    and any YAML presets shipped in gym_core.conf (Hydra's own groups left out)."""
    from importlib import resources

    from hydra.core.config_store import ConfigStore

    groups: dict[str, set[str]] = {}
    for name, node in ConfigStore.instance().repo.items():
        if isinstance(node, dict) and name != "hydra":
            groups.setdefault(name, set()).update(k.removesuffix(".yaml") for k in node)
    for folder in resources.files("gym_core.conf").iterdir():
        if folder.is_dir() and not folder.name.startswith("_"):
            groups.setdefault(folder.name, set()).update(
                f.name.removesuffix(".yaml") for f in folder.iterdir() if f.name.endswith(".yaml"))
    return {g: sorted(opts) for g, opts in sorted(groups.items())}


def print_help(overrides: list[str]) -> None:
    """Hydra's --help lists groups by copying its whole config store once per group (a
    second with every plugin installed); this reads the store once."""
    from omegaconf import OmegaConf

    from gym_core.startup import compose

    groups = "\n".join(f"{g}: {', '.join(opts)}" for g, opts in config_groups().items())
    config = OmegaConf.to_yaml(compose(overrides))
    print(f"{HELP_HEADER}\n== Config groups (installed options) ==\n{groups}\n\n"
          f"== Config (defaults; override with key=value) ==\n{config}\n{HELP_FOOTER}")


#: Hydra's command-line flags that take a value (the value is not an override)
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp",
                     "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun"}


def overrides_of(args: list[str]) -> list[str]:
    """The key=value / group=option arguments, without Hydra's flags and their values."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a.startswith("-"):
            skip = a in _FLAGS_WITH_VALUE
        else:
            out.append(a)
    return out


def check_overrides(args: list[str]) -> None:
    """Compose the config the overrides give before Hydra runs, so that a bad override is
    one line and exit 2 (Hydra's own report is several lines and exit 1). A sweep (-m) is
    checked with the first value of each swept key."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from gym_core.startup import compose

    overrides = overrides_of(args)
    if not overrides:
        compose([])
        return
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        from gym_core.errors import GymError

        raise GymError(f"cannot parse the overrides: {str(exc).splitlines()[0]}") from None
    first = []
    for o in parsed:
        if o.is_sweep_override():
            try:
                values = list(o.sweep_string_iterator())
            except Exception:  # an interval (Optuna) has no first value: its sweeper checks
                continue
            if values:
                first.append(f"{o.get_key_element()}={values[0]}")
        else:
            first.append(o.input_line)
    compose(first)


def entry() -> None:
    from gym_core.errors import GymError, exit_on_user_error
    from gym_core.threads import prepare_environment

    prepare_environment()  # before anything loads torch's OpenMP runtime

    with exit_on_user_error():
        plugins = bootstrap()
        args = sys.argv[1:]
        if "--plugins" in args:
            if len(args) > 1:
                raise GymError("--plugins lists the installed plugins and takes no other "
                               f"arguments; got {' '.join(args)}")
            # Like pytest's --trace-config / `datasette plugins`: what is installed, from
            # which distribution, and which config-group options each plugin adds.
            from gym_core.plugins import format_listing

            print(format_listing(plugins))
            return
        if ("--help" in args or "-h" in args) and "--hydra-help" not in args:
            print_help(overrides_of(args))
            return
        if "--hydra-help" not in args and "--info" not in args:
            check_overrides(args)
    main()


if __name__ == "__main__":
    sys.exit(entry())
