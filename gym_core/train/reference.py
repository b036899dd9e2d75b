"""Where a run of the README's main job lands against the README's table.

``gym train algorithm=grpo quant=bitdelta`` on the defaults is the run README.md reports
("What the main job does"). When a run is that run (any seed, thread count, logger or
output settings), its summary says where each held-out score sits against the README's
range, so a newcomer sees at once whether their result is the documented one.

:data:`REFERENCE` must hold the same numbers as the README's table: whoever measures the
table again (mean and range over the seeds it names, on the CPU it names) updates both.
"""

from __future__ import annotations

from typing import Any

from gym_core.train.resume import flatten

#: The README's table of the main job: per held-out score, (mean, lowest, highest) over
#: ``seeds`` on ``cpu``.
REFERENCE: dict[str, Any] = {
    "command": "gym train algorithm=grpo quant=bitdelta",
    "seeds": [0, 1, 2],
    "cpu": "2-core AMD EPYC (x86-64, AVX-512), torch 2.13.0 CPU build",
    "scores": {
        "before": (0.36, 0.36, 0.36),
        "after": (0.60, 0.56, 0.62),
        "after_quant": (0.51, 0.49, 0.53),
        # held-out preference accuracy after training (the table's last row)
        "preference_after": (0.92, 0.89, 0.94),
    },
}

#: settings that do not change what the main job computes (where it writes, what it
#: shows, how many threads; the seed is the spread the table reports)
_FREE = ("run.", "logger.", "hydra.", "pipeline.", "ray.")  # where it ran, not what
_FREE_KEYS = {"trainer.seed", "trainer.threads", "trainer.progress", "trainer.tensorboard",
              "trainer.save_every", "trainer.keep_last", "trainer.device",
              "trainer.eval_batch_size", "model.cache_dir"}


def main_job_defaults(plugins) -> dict[str, Any] | None:
    """The main job's config (the schemas' defaults), flattened; None when a plugin it
    needs (grpo, bitdelta) is not loaded."""
    from omegaconf import OmegaConf

    from gym_core.config.schema import (
        MODEL_OPTIONS,
        ArithmeticConfig,
        RolloutConfig,
        TrainerConfig,
    )

    try:
        algo = plugins.component("algorithm", "grpo").config
        quant = plugins.component("quant", "bitdelta").config
    except Exception:
        return None
    tree = {"model": MODEL_OPTIONS["smollm2"], "data": ArithmeticConfig(),
            "algorithm": algo(), "quant": quant(), "trainer": TrainerConfig(),
            "rollout": RolloutConfig()}
    return flatten({k: OmegaConf.to_container(OmegaConf.structured(v)) for k, v in tree.items()})


def is_main_job(cfg, plugins) -> bool:
    from omegaconf import OmegaConf

    defaults = main_job_defaults(plugins)
    if defaults is None:
        return False
    mine = flatten(OmegaConf.to_container(cfg, resolve=True))
    quantized = mine.get("quant.name") != "none"

    def counted(key: str) -> bool:
        if key.startswith(_FREE) or key in _FREE_KEYS:
            return False
        return quantized or not key.startswith("quant.")

    keys = {k for k in (*defaults, *mine) if counted(k)}
    return all(mine.get(k) == defaults.get(k) for k in keys)


def compare(cfg, summary: dict[str, Any], plugins) -> dict[str, Any] | None:
    """Each held-out score of a main-job run against the README's range, or None when
    the run is not the main job."""
    if not is_main_job(cfg, plugins):
        return None
    ev = summary.get("eval") or {}
    scores = {**ev, "preference_after": (ev.get("preference_accuracy") or {}).get("after")}
    rows = {}
    for key, (mean, low, high) in REFERENCE["scores"].items():
        value = scores.get(key)
        if value is None:
            continue
        where = ("inside" if low - 1e-9 <= value <= high + 1e-9 else
                 f"below by {low - value:.2f}" if value < low else f"above by {value - high:.2f}")
        rows[key] = {"value": value, "mean": mean, "range": [low, high], "where": where}
    return {"seeds": REFERENCE["seeds"], "cpu": REFERENCE["cpu"], "scores": rows}


def table(reference: dict[str, Any] | None) -> str:
    """The summary's lines for :func:`compare`'s result ('' when None)."""
    if not reference or not reference["scores"]:
        return ""
    seeds = reference["seeds"]
    lines = [f"  README's main job ({len(seeds)} seed{'s' if len(seeds) > 1 else ''} "
             f"{', '.join(map(str, seeds))}; {reference['cpu']}):",
             f"  {'held-out accuracy':<20} {'this run':>8}  {'README mean [range]':<21} where"]
    names = {"before": "before", "after": "after", "after_quant": "after quant",
             "preference_after": "preference after"}
    for key, row in reference["scores"].items():
        low, high = row["range"]
        lines.append(f"  {names.get(key, key):<20} {row['value']:>8.3f}  "
                     f"{row['mean']:.2f} [{low:.2f}, {high:.2f}]{'':<8} {row['where']}")
    return "\n".join(lines)
