"""``python -m gym_core.soup soup=<rule> soup.inputs=[a,b,c]``: merge deltas (DeltaSoup).

A Hydra app of its own (conf/soup.yaml), so ``-m`` sweeps rules and their knobs:

    python -m gym_core.soup soup=median soup.inputs=[runs/a,runs/b,runs/c]
    python -m gym_core.soup -m soup=mean,median,krum soup.inputs=[a.safetensors,b.safetensors,c.safetensors]

Each job writes ``soup.safetensors`` (a full-precision delta: base + soup is
``gym_core.deltas.merge.rebuild(base, read_delta(path, plugins))``, as for a run's delta;
``python -m gym_core.serve`` serves it as a variant) and ``report.json`` into its
directory (``out``, default ``soups/<rule>-<time>``). Start-up imports no torch.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import hydra
from omegaconf import MISSING, DictConfig


@dataclass
class SoupAppConfig:
    soup: Any = MISSING
    out: str = MISSING  # the job's directory (Hydra's run dir; a sweep's jobs go below it)


@hydra.main(version_base=None, config_path="pkg://gym_core.conf", config_name="soup")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from gym_core.base.errors import exit_on_user_error
    from gym_core.deltas.aggregate import make_soup
    from gym_core.plugin.startup import bootstrap

    with exit_on_user_error():
        report = make_soup(cfg.soup, HydraConfig.get().runtime.output_dir, bootstrap())
    print(f"gym soup: {report['rule']} of {len(report['contributors'])} deltas -> "
          f"{report['output']} ({report['output_bytes']} bytes)")
    for c in report["contributors"]:
        flags = [f for f, on in (("excluded", c["excluded"]), ("clipped", c["clipped"])) if on]
        print(f"  {c['input']}: norm {c['norm']:.4g}, distance {c['distance']:.4g}"
              f"{' (' + ', '.join(flags) + ')' if flags else ''}")
    if report["privacy"]:
        p = report["privacy"]
        print(f"  DP: epsilon {p['epsilon']:.3f} at delta {p['delta']:g} (noise std {p['noise_std']:.3g})")
    return report["aggregate_norm"]


def entry() -> None:
    from hydra.core.config_store import ConfigStore

    from gym_core.base.errors import exit_on_user_error
    from gym_core.plugin.startup import bootstrap

    with exit_on_user_error():
        bootstrap()
        ConfigStore.instance().store(name="soup_schema", node=SoupAppConfig)
        args = sys.argv[1:]
        if not {"--hydra-help", "--info", "-i"}.intersection(args):
            # as python -m gym_core: a bad override or a missing value is one line, exit 2
            from gym_core.config.checks import check_missing
            from gym_core.plugin.startup import NO_JOB_FLAGS, check_overrides

            cfg = check_overrides(args, config_name="soup")
            if not NO_JOB_FLAGS.intersection(args):
                check_missing(cfg)
        main()


if __name__ == "__main__":
    sys.exit(entry())
