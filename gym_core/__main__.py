"""``python -m gym_core [overrides]``: compose the config with Hydra and run one job.

Start-up stays light: plugins are discovered and their schemas registered (no torch),
and the heavy modules are imported only when a job actually runs.
``python -m gym_core --plugins`` lists the installed plugins and exits.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from gym_core.config import bootstrap


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


def entry() -> None:
    from gym_core.errors import GymError, exit_on_user_error

    with exit_on_user_error():
        plugins = bootstrap()
        if "--plugins" in sys.argv[1:]:
            if len(sys.argv) > 2:
                raise GymError("--plugins lists the installed plugins and takes no other "
                               f"arguments; got {' '.join(sys.argv[1:])}")
            # Like pytest's --trace-config / `datasette plugins`: what is installed, from
            # which distribution, and which config-group options each plugin adds.
            from gym_core.plugins import format_listing

            print(format_listing(plugins))
            return
        main()


if __name__ == "__main__":
    sys.exit(entry())
