"""One job, top to bottom: load, evaluate, train, evaluate, save, quantize, summarise."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from gym_core.delta import (
    apply_delta,
    load_packed,
    lora_delta,
    reconstruction_error,
    save_packed,
    state_delta,
)
from gym_core.distributed import Dist, setup, teardown
from gym_core.errors import GymError
from gym_core.evaluate import evaluate, preference_accuracy
from gym_core.files import write_json
from gym_core.model import describe, load_base, load_policy, save_final
from gym_core.startup import bootstrap
from gym_core.train import seed_everything, train


def run_dir_for(cfg: DictConfig) -> Path:
    """Hydra's output directory for this job (runs/<run.name>, or a sweep's job folder)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.run.root) / cfg.run.name


def run_job(cfg: DictConfig, run_dir: Path | None = None) -> dict[str, Any]:
    """Run one job; under torchrun every rank calls this and rank 0 alone writes."""
    dist = setup(cfg.trainer.device)
    try:
        return _run_job(cfg, run_dir, dist)
    finally:
        if dist.enabled:
            teardown()


def _run_job(cfg: DictConfig, run_dir: Path | None, dist: Dist) -> dict[str, Any]:
    plugins = bootstrap()
    run_dir = Path(run_dir) if run_dir is not None else run_dir_for(cfg)
    # every rank works in rank 0's directory (a default run.name holds a time stamp)
    run_dir = Path(dist.broadcast(str(run_dir)))
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    # Resolve every named component before the slow work, so a typo fails in a second.
    algo_cls = plugins.component("algorithm", cfg.algorithm.name).load()
    task = plugins.component("data", cfg.data.name).load()(cfg.data)
    metric_fn = plugins.component("reward", task.metric).load() if task.metric else None
    rewards = []
    if algo_cls.online:
        names = list(cfg.algorithm.rewards)
        weights = cfg.algorithm.reward_weights or [1.0] * len(names)
        if len(weights) != len(names):
            raise GymError(
                f"algorithm.reward_weights has {len(weights)} values for {len(names)} "
                f"rewards {names}"
            )
        rewards = [(n, plugins.component("reward", n).load(), float(w))
                   for n, w in zip(names, weights)]
    quantizer = None
    if cfg.quant.name != "none":
        quantizer = plugins.component("quant", cfg.quant.name).load()(cfg.quant)

    seed_everything(cfg.trainer.seed)  # the adapter's initialisation draws from it
    policy = load_policy(cfg.model, dist.device, system_prompt=cfg.data.system_prompt)
    if algo_cls.online:  # score what was sampled: softmax(logits / T) (docs/algorithms.md §0.2)
        policy.temperature = float(cfg.algorithm.temperature)
    algo = algo_cls(cfg.algorithm, policy)
    algo.check_data(task.train)
    algo.setup(cfg, run_dir, plugins)
    tcfg = cfg.trainer
    test = task.test[: tcfg.eval_size] if tcfg.eval_size else task.test

    def score(model, desc, shared=dist):
        """Held-out score; the test prompts are split over the ranks of ``shared``."""
        if metric_fn is None:  # e.g. preference data without verifiable answers
            return None
        return evaluate(model, policy.tokenizer, algo.transform_examples(test), metric_fn,
                        system_prompt=cfg.data.system_prompt, batch_size=tcfg.eval_batch_size,
                        max_new_tokens=tcfg.eval_max_new_tokens, desc=desc, dist=shared)

    # The starting policy's score is kept in the run directory: a resumed run reuses it.
    def pref_score():
        return preference_accuracy(policy, test, dist=dist, **lengths)

    # preference evaluation cuts texts like an offline method's training does
    lengths = {} if algo_cls.online else {
        "max_prompt_length": cfg.algorithm.max_prompt_length,
        "max_completion_length": cfg.algorithm.max_completion_length}

    before_file = run_dir / "eval_before.json"
    before = pref_before = None
    if before_file.is_file():
        saved = json.loads(before_file.read_text())
        before, pref_before = saved["accuracy"], saved.get("preference_accuracy")
    elif tcfg.eval_before:
        before = score(policy.model, "eval before")
        pref_before = pref_score()
        if dist.main:
            write_json(before_file, {"accuracy": before, "preference_accuracy": pref_before})
    if dist.main:
        print(f"gym: held-out {task.metric} before training: {_fmt(before)}")

    result = train(cfg, policy, algo, task, rewards, plugins, run_dir, dist)
    after = score(policy.model, "eval after")
    pref_after = pref_score()
    if not dist.main:
        return {"steps": result.steps, "eval": {"after": after}}
    print(f"gym: held-out {task.metric} after training: {_fmt(after)}")
    save_final(policy, run_dir / "final")

    after_quant, quant_stats = None, None
    if quantizer is not None:  # rank 0 alone: the others are done
        after_quant, quant_stats = quantize_and_score(
            cfg, policy, quantizer, run_dir, lambda model, desc: score(model, desc, Dist()),
            task=task,
        )

    summary = {
        "algorithm": cfg.algorithm.name,
        "quant": cfg.quant.name,
        "model": describe(cfg.model),
        "data": cfg.data.name,
        "steps": result.steps,
        "train_seconds": round(result.seconds, 2),
        "tokens_per_second": round(result.tokens_per_second, 2),
        "total_seconds": round(time.perf_counter() - started, 2),
        "eval": {"metric": task.metric, "before": before, "after": after,
                 "after_quant": after_quant, "test_examples": len(test),
                 # held-out pairs whose chosen completion the policy prefers (log-prob)
                 "preference_accuracy": {"before": pref_before, "after": pref_after}},
        "quant_stats": quant_stats,
        "algorithm_stats": algo.report(),
        "run_dir": str(run_dir),
        "overrides": _overrides(),
    }
    write_json(run_dir / "summary.json", summary)
    print(summary_table(summary))
    plugins.hook.gym_run_end(summary=summary, run_dir=str(run_dir))
    return summary


def quantize_and_score(cfg, policy, quantizer, run_dir: Path, score, task=None):
    """Delta = fine-tuned - base; quantize (and calibrate, for quantizers that do); write;
    read back; rebuild base + delta; score."""
    if policy.lora:
        delta = lora_delta(policy.model)
    else:
        base, _ = load_base(cfg.model)
        delta = state_delta(dict(policy.model.named_parameters()),
                            dict(base.named_parameters()))
        del base
    t0 = time.perf_counter()
    packed = quantizer.quantize(delta)
    uncalibrated = packed
    if task is not None:
        packed = quantizer.calibrate(packed, _calibration_context(cfg, policy, task)) or packed
    path = run_dir / "delta" / f"{cfg.quant.name}.safetensors"
    size = save_packed(packed, path)
    restored = quantizer.dequantize(load_packed(path))
    rebuilt = _rebuild(cfg, policy, restored)
    quant_seconds = time.perf_counter() - t0
    after_quant = score(rebuilt, "eval after quant")
    print(f"gym: held-out accuracy after {cfg.quant.name}: {_fmt(after_quant)}")
    num = sum(d.numel() for d in delta.values())
    stats = {
        "bits_per_weight": round(packed.bits_per_weight, 4),
        "compression_ratio": round(packed.compression_ratio, 3),
        "delta_bytes": size,
        "delta_params": num,
        "delta_file": str(path),
        "quantize_seconds": round(quant_seconds, 3),
        "error": reconstruction_error(delta, restored),  # docs/algorithms.md §10.7
    }
    if packed is not uncalibrated:  # the same delta before calibration, for comparison
        del rebuilt
        stats["after_quant_uncalibrated"] = score(
            _rebuild(cfg, policy, quantizer.dequantize(uncalibrated)),
            "eval after quant, uncalibrated")
    stats.update(quantizer.stats())
    return after_quant, stats


def _rebuild(cfg, policy, delta):
    model, _ = load_base(cfg.model)
    model.to(policy.device)
    apply_delta(model, delta)
    return model


def _calibration_context(cfg, policy, task):
    from gym_core.data import render_prompts
    from gym_core.delta import CalibrationContext

    def fresh_base():
        return load_base(cfg.model)[0].to(policy.device)

    prompts = render_prompts(policy.tokenizer, [ex["prompt"] for ex in task.train],
                             cfg.data.system_prompt)
    return CalibrationContext(teacher=policy.model, load_base=fresh_base,
                              tokenizer=policy.tokenizer, prompts=prompts, device=policy.device)


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def summary_table(s: dict[str, Any]) -> str:
    ev = s["eval"]
    rows = [
        ("algorithm", s["algorithm"]),
        ("quant", s["quant"]),
        ("model", s["model"]),
        ("steps", s["steps"]),
        ("train seconds", s["train_seconds"]),
        ("tokens / second", s["tokens_per_second"]),
        (f"held-out {ev['metric']} before", _fmt(ev["before"])),
        (f"held-out {ev['metric']} after", _fmt(ev["after"])),
        (f"held-out {ev['metric']} after quant", _fmt(ev["after_quant"])),
    ]
    pref = ev.get("preference_accuracy") or {}
    if pref.get("after") is not None:
        rows += [("preference accuracy before", _fmt(pref.get("before"))),
                 ("preference accuracy after", _fmt(pref["after"]))]
    q = s.get("quant_stats")
    if q:
        rows += [
            ("bits per weight", q["bits_per_weight"]),
            ("compression vs bf16", f"{q['compression_ratio']}x"),
            ("delta file bytes", q["delta_bytes"]),
        ]
    width = max(len(k) for k, _ in rows)
    lines = [f"  {k:<{width}}  {v}" for k, v in rows]
    bar = "-" * (width + 20)
    return "\n".join([bar, "  gym summary", bar, *lines, bar, f"  {s['run_dir']}/summary.json"])
