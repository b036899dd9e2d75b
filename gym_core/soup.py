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
from pathlib import Path
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


#: what marks a folder as a training run's (gym_core/train/rundir.py, resume.py)
RUN_MARKS = (".gym.lock", "run.json", "checkpoints", "final", "metrics.jsonl")


def check_out(out: Path) -> None:
    """``out`` must be a folder the soup may write in: not a file, not a training run's
    folder (a soup there overwrote the run's ``.hydra/`` record), and writable (checked
    by writing a probe in it or in its nearest existing parent). Before Hydra creates it."""
    from gym_core.base.errors import GymError
    from gym_core.base.files import check_can_create

    if out.exists() and not out.is_dir():
        raise GymError(f"out={out} is a file: a soup writes a folder (soup.safetensors and "
                       "report.json); pick another out=")
    marks = [m for m in RUN_MARKS if (out / m).exists()] if out.is_dir() else []
    if marks:
        raise GymError(f"out={out} holds a training run ({', '.join(marks)}): a soup there "
                       "would overwrite the run's record; pick another out=, e.g. "
                       "out=soups/<name>")
    check_can_create(out / "soup.safetensors", "out=")


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
                check_out(Path(str(cfg.out)))
        main()


if __name__ == "__main__":
    sys.exit(entry())
