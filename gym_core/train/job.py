"""One job, top to bottom: load, evaluate, train, evaluate, save, quantize, summarise."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gym_core.base import threads
from gym_core.base.errors import GymError
from gym_core.base.files import write_json
from gym_core.config.checks import preflight
from gym_core.data.formats import check_task, rows_to_check
from gym_core.deltas.delta import load_packed, reconstruction_error, save_packed
from gym_core.deltas.merge import lora_base, rebuild, run_delta
from gym_core.eval.heldout import evaluate, evaluate_episodes, preference_accuracy
from gym_core.model.policy import describe, load_base, load_policy, save_final
from gym_core.model.stages import base_identity
from gym_core.plugin.startup import bootstrap, check_named_components
from gym_core.train import reference
from gym_core.train.checkpoint import check_checkpoint, list_checkpoints
from gym_core.train.distributed import Dist, setup, teardown
from gym_core.train.interrupt import StopRequest, interrupted_line
from gym_core.train.loop import seed_everything, train
from gym_core.train.resume import check as check_resume
from gym_core.train.resume import data_digest, read_record, recorded_threads
from gym_core.train.resume import record as record_run
from gym_core.train.rundir import check_run_name, check_run_state, prepare_run_dir, run_lock
from gym_core.train.trackers import Trackers, open_trackers


def run_dir_for(cfg: DictConfig) -> Path:
    """Hydra's output directory for this job (runs/<run.name>, or a sweep's job folder)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.run.root) / cfg.run.name


def run_job(cfg: DictConfig, run_dir: Path | None = None) -> dict[str, Any]:
    """Run one job; under torchrun every rank calls this and rank 0 alone writes.

    Rank 0 holds the run directory's lock (:mod:`gym_core.train.rundir`) for the whole job;
    SIGINT / SIGTERM stop it with a checkpoint (:mod:`gym_core.train.interrupt`)."""
    with config_errors():
        chain = preflight(cfg)  # model.init's chain too: refused before anything is written
        if run_dir is None:
            check_run_name(cfg)
        check_named_components(cfg)
    dist = setup(cfg.trainer.device)
    finished = False
    try:
        run_dir = Path(run_dir) if run_dir is not None else run_dir_for(cfg)
        # every rank works in rank 0's directory (a default run.name holds a time stamp)
        run_dir = Path(dist.broadcast(str(run_dir)))
        # one thread count for the whole run, a resumed one's from its run.json (results
        # differ in the last bits between counts); trainer.threads overrides it
        threads.configure(cfg.trainer.threads, keep=True, recorded=recorded_threads(run_dir))
        with contextlib.ExitStack() as stack:
            # under trainer.backend=ray the driver holds the lock for its workers
            if dist.main and not os.environ.get("GYM_RAY_WORKER"):
                stack.enter_context(run_lock(run_dir))
            stop = stack.enter_context(StopRequest(
                lambda signum, step: interrupted_line(cfg, run_dir, signum, step, dist),
                show=dist.main))
            # the experiment trackers (logger=...), built before anything slow; closed
            # with the run's outcome (gym_core/train/trackers.py)
            trackers = Trackers([])
            if dist.main:
                with config_errors():
                    trackers = open_trackers(cfg, bootstrap())
            stack.push(lambda kind, exc, tb: trackers.close(ok=kind is None))
            with config_errors():
                summary = _run_job(cfg, run_dir, dist, stop, chain, trackers)
            finished = True
            return summary
    finally:
        threads.release()
        if dist.enabled:
            teardown(synchronize=finished)


def config_errors():
    """OmegaConf errors raised while the job reads its config (an interpolation that does
    not resolve, a missing value) as gym's one-line error."""
    from gym_core.plugin.startup import config_errors as errors

    return errors(bootstrap())


def _run_job(cfg: DictConfig, run_dir: Path, dist: Dist, stop: StopRequest,
             chain: list[dict[str, Any]] | None, trackers: Trackers) -> dict[str, Any]:
    plugins = bootstrap()
    if dist.main:
        prepare_run_dir(run_dir)
        check_run_state(run_dir)
    dist.barrier()
    started = time.perf_counter()
    if dist.main:  # the first line: what runs where (loading and a first evaluation follow)
        n = threads.in_use()
        print(f"gym: {cfg.algorithm.name} on {cfg.data.name}, {describe(cfg.model)}"
              f"{'' if n is None else f', {n} thread' + ('s' if n > 1 else '')}, "
              f"in {run_dir}: loading", flush=True)

    # Resolve every named component before the slow work, so a typo fails in a second.
    algo_cls = plugins.component("algorithm", cfg.algorithm.name).load()
    task = plugins.component("data", cfg.data.name).load()(cfg.data)
    metric_fn = plugins.component("reward", task.metric).load() if task.metric else None
    rewards = []
    if algo_cls.online:
        names = list(cfg.algorithm.rewards)
        # as many weights as rewards: OnlineAlgorithmConfig.validate
        weights = cfg.algorithm.reward_weights or [1.0] * len(names)
        rewards = [(n, plugins.component("reward", n).load(), float(w))
                   for n, w in zip(names, weights)]
    quantizer = None
    if cfg.quant.name != "none":
        quantizer = plugins.component("quant", cfg.quant.name).load()(cfg.quant)
    # an existing run continues only as itself (gym_core.train.resume)
    digest = data_digest(task.train, task.test)
    setup_checked = read_record(run_dir) is not None  # compared by check_resume
    changed = check_resume(cfg, run_dir, digest)
    saved_before = read_eval_before(run_dir / "eval_before.json")

    seed_everything(cfg.trainer.seed)  # the adapter's initialisation draws from it
    # rank 0 alone quantizes the run's delta at the end: it keeps the base's weights from
    # this load (RunBase). Not under FSDP, which shards a full fine-tune's frozen copy on
    # every rank alike and frees it at the end: there the base is loaded again.
    sharded = dist.enabled and cfg.trainer.get("strategy", "ddp") == "fsdp"
    policy = load_policy(cfg.model, dist.device, system_prompt=cfg.data.system_prompt,
                         chain=chain, keep_base=quantizer is not None and dist.main
                         and not sharded)
    if algo_cls.online:  # score what was sampled: softmax(logits / T) (docs/algorithms.md §0.2)
        policy.temperature = float(cfg.algorithm.temperature)
    algo = algo_cls(cfg.algorithm, policy)
    check_task(cfg, algo_cls, task.train)
    algo.check_data(rows_to_check(task.train))
    algo.setup(cfg, run_dir, plugins)
    tcfg = cfg.trainer
    # the checkpoint it resumes from, checked before the start is recorded (a refused
    # start leaves run.json and .hydra/ as they were)
    checkpoints = list_checkpoints(run_dir)
    if checkpoints:
        check_checkpoint(checkpoints[-1][1], policy.model, policy.heads,
                         setup_checked=setup_checked)
    if dist.main:
        if changed:
            print(f"gym: {run_dir} continues with changed settings (applied from here on): "
                  f"{'; '.join(changed)}")
        record_run(cfg, run_dir, digest)
    test = task.test[: tcfg.eval_size] if tcfg.eval_size else task.test
    # with env=...: the held-out evaluation plays greedy episodes (docs/agents.md)
    from gym_core.env.setup import selected_environment

    env = selected_environment(cfg, plugins, algo_cls.online, task.train)
    metric = task.metric if env is None else f"env={env[1].name} accuracy"

    env_stats: dict[str, Any] = {}  # with an environment: each evaluation's statistics

    def score(model, desc, shared=dist):
        """Held-out score; the test prompts are split over the ranks of ``shared``. With
        an environment: its episodes' accuracy (their statistics in ``env_stats[desc]``)."""
        if env is not None:
            stats = evaluate_episodes(
                model, policy.tokenizer, *env, algo.transform_examples(test),
                system_prompt=cfg.data.system_prompt, batch_size=tcfg.eval_batch_size,
                desc=desc, dist=shared, max_prompt_length=cfg.algorithm.get("max_prompt_length"),
                progress=tcfg.progress and shared.main)
            env_stats[desc] = stats
            return None if stats is None else stats["accuracy"]
        if metric_fn is None:  # e.g. preference data without verifiable answers
            return None
        shown = algo.transform_examples(test)
        texts = algo.answer(shown, tcfg.eval_max_new_tokens)  # a remote policy answers itself
        if texts is not None:
            prompts = [ex["prompt"] for ex in shown]
            return sum(metric_fn(prompts, texts, shown)) / len(shown) if shown else None
        return evaluate(model, policy.tokenizer, shown, metric_fn,
                        system_prompt=cfg.data.system_prompt, batch_size=tcfg.eval_batch_size,
                        max_new_tokens=tcfg.eval_max_new_tokens, desc=desc, dist=shared,
                        max_prompt_length=cfg.algorithm.get("max_prompt_length"),
                        progress=tcfg.progress and shared.main)

    # The starting policy's score is kept in the run directory: a resumed run reuses it.
    def pref_score(desc):
        return preference_accuracy(policy, test, dist=dist, desc=desc,
                                   progress=tcfg.progress and dist.main, **lengths)

    # preference evaluation cuts texts like an offline method's training does
    lengths = {} if algo_cls.online else {
        "max_prompt_length": cfg.algorithm.max_prompt_length,
        "max_completion_length": cfg.algorithm.max_completion_length}

    before_file = run_dir / "eval_before.json"
    before = pref_before = None
    # the "before" score counts only if taken on the same held-out examples, the same way
    how = {"eval_size": tcfg.eval_size, "eval_max_new_tokens": tcfg.eval_max_new_tokens}
    if env is not None:  # the episodes depend on the environment and its limits
        how["env"] = OmegaConf.to_container(env[1], resolve=True)
    saved = saved_before
    if saved is not None and saved.get("settings", how) == how:
        before, pref_before = saved["accuracy"], saved.get("preference_accuracy")
        env_stats["eval before"] = saved.get("env")
    elif tcfg.eval_before:
        if saved is not None and dist.main:
            print(f"gym: trainer.eval_* changed since {before_file.name} was written: "
                  "scoring the starting model again")
        before = score(policy.model, "eval before")
        pref_before = pref_score("preference before")
        if dist.main:
            write_json(before_file, {"accuracy": before, "preference_accuracy": pref_before,
                                     "env": env_stats.get("eval before"), "settings": how})
    if dist.main:
        print(f"gym: held-out {metric or 'score'} before training: {_fmt(before)}")

    result = train(cfg, policy, algo, task, rewards, plugins, run_dir, dist, stop, trackers,
                   checkpoint_checked=True)
    after = score(policy.model, "eval after")
    pref_after = pref_score("preference after")
    if not dist.main:
        return {"steps": result.steps, "eval": {"after": after}}
    print(f"gym: held-out {metric or 'score'} after training: {_fmt(after)}")
    save_final(policy, run_dir / "final", record={
        "base": base_identity(cfg.model), "algorithm": cfg.algorithm.name, "chain": chain or []})

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
        # with env=...: before/after are the episodes' accuracy, eval.env their statistics
        "eval": {"metric": metric, "before": before, "after": after,
                 "after_quant": after_quant, "test_examples": len(test),
                 # held-out pairs whose chosen completion the policy prefers (log-prob)
                 "preference_accuracy": {"before": pref_before, "after": pref_after},
                 **({} if env is None else {"env": {
                     "name": env[1].name, "before": env_stats.get("eval before"),
                     "after": env_stats.get("eval after"),
                     "after_quant": env_stats.get("eval after quant")}})},
        "quant_stats": quant_stats,
        "algorithm_stats": algo.report(),
        # model.init: the run this one started from, and the whole chain from the base
        "init": chain and {"run": chain[-1]["run"], "algorithm": chain[-1]["algorithm"],
                           "chain": chain},
        "run_dir": str(run_dir),
        "overrides": _overrides(),
    }
    if cfg.trainer.get("objective"):  # a sweep's objective: any logged metric
        from gym_core.eval.during import objective

        summary["objective"] = objective(cfg, run_dir)
    # the README's main job: where this run's scores sit against the README's range
    summary["reference"] = reference.compare(cfg, summary, plugins)
    write_json(run_dir / "summary.json", summary)
    print(summary_table(summary))
    if summary["reference"]:
        print(reference.table(summary["reference"]))
    trackers.log_summary(summary, run_dir)
    plugins.hook.gym_run_end(summary=summary, run_dir=str(run_dir))
    return summary


def read_eval_before(path: Path) -> dict[str, Any] | None:
    """The starting model's saved score, or None; a damaged file is a one-line error."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(saved, dict) or "accuracy" not in saved:
            raise ValueError("no 'accuracy' entry")
        if saved["accuracy"] is not None and not isinstance(saved["accuracy"], (int, float)):
            raise ValueError(f"'accuracy' is {saved['accuracy']!r}, not a number")
    except (ValueError, UnicodeDecodeError) as exc:
        raise GymError(f"{path} is unreadable ({exc}): it holds the starting model's held-out "
                       "score; delete it to score the starting model again") from None
    return saved


def quantize_and_score(cfg, policy, quantizer, run_dir: Path, score, task=None):
    """Delta = fine-tuned - base (:func:`gym_core.deltas.merge.run_delta`); quantize (and
    calibrate, for quantizers that do); write; read back; rebuild base + delta
    (:func:`gym_core.deltas.merge.rebuild`); score. After ``model.init`` the delta is still
    against the original base model (earlier stages included): one file on the shared base.
    The base is not loaded again when the policy holds it (:class:`RunBase`)."""
    base = RunBase(cfg, policy)
    delta = run_delta(policy.model, base.for_delta())
    if not delta:
        from gym_core.base.errors import warn

        warn("training left every weight as it was (every advantage or gradient was 0?): "
             f"the {cfg.quant.name} delta is empty")
    num = sum(d.numel() for d in delta.values())
    t0 = time.perf_counter()
    packed = quantizer.quantize(delta)
    uncalibrated = packed
    if task is not None:
        packed = quantizer.calibrate(packed, _calibration_context(cfg, policy, task, base)) \
            or packed
    path = run_dir / "delta" / f"{cfg.quant.name}.safetensors"
    size = save_packed(packed, path)
    restored = quantizer.dequantize(load_packed(path))
    rebuilt = rebuild(base.get(), restored)
    quant_seconds = time.perf_counter() - t0
    after_quant = score(rebuilt, "eval after quant")
    print(f"gym: held-out accuracy after {cfg.quant.name}: {_fmt(after_quant)}")
    stats = {
        "bits_per_weight": round(packed.bits_per_weight, 4),
        "compression_ratio": round(packed.compression_ratio, 3) if num else None,
        "delta_bytes": size,
        "delta_params": num,
        "delta_file": str(path),
        "quantize_seconds": round(quant_seconds, 3),
        "error": reconstruction_error(delta, restored),  # docs/algorithms.md §10.7
    }
    if packed is not uncalibrated:  # the same delta before calibration, for comparison
        del rebuilt
        stats["after_quant_uncalibrated"] = score(
            rebuild(base.get(), quantizer.dequantize(uncalibrated)),
            "eval after quant, uncalibrated")
    stats.update(quantizer.stats())
    return after_quant, stats


class RunBase:
    """The run's base model for its delta and rebuilds, loaded once per run: the policy
    holds it (a LoRA policy's frozen weights, :func:`gym_core.deltas.merge.lora_base`,
    nothing loaded or copied; a full fine-tune's reference copy, its starting weights;
    after ``model.init``, the copy :func:`gym_core.model.policy.load_policy` kept before the
    earlier runs were applied). Only a policy that kept none (FSDP) loads it again, on
    first use."""

    def __init__(self, cfg, policy):
        self.cfg, self.policy = cfg, policy
        self._model = None

    @property
    def in_policy(self) -> bool:
        """The LoRA policy's frozen weights are the base (no ``model.init``)."""
        return self.policy.lora and not self.cfg.model.init

    def for_delta(self):
        """What :func:`gym_core.deltas.merge.run_delta` needs: None when the LoRA
        adapter is the delta itself, else the base model."""
        return None if self.in_policy else self.get()

    def get(self):
        """The base model (eval mode, on the policy's device). Shared: read it, never
        modify it."""
        if self._model is None:
            policy = self.policy
            if self.in_policy:
                self._model = lora_base(policy.model)
            elif self.cfg.model.init:
                self._model = policy._base
            else:  # a full fine-tune from the base: its starting weights are the base
                self._model = policy._ref_copy
            if self._model is None:
                self._model = load_base(self.cfg.model)[0]
            self._model = self._model.to(policy.device)
        return self._model


def _calibration_context(cfg, policy, task, base: RunBase):
    from gym_core.data.tasks import render_prompts
    from gym_core.deltas.delta import CalibrationContext

    prompts = render_prompts(policy.tokenizer, [ex["prompt"] for ex in task.train],
                             cfg.data.system_prompt)
    return CalibrationContext(teacher=policy.model, load_base=base.get,
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
        (f"held-out {ev['metric'] or 'score'} before", _fmt(ev["before"])),
        (f"held-out {ev['metric'] or 'score'} after", _fmt(ev["after"])),
        (f"held-out {ev['metric'] or 'score'} after quant", _fmt(ev["after_quant"])),
    ]
    for when in ("before", "after", "after_quant"):
        e = (ev.get("env") or {}).get(when)
        if e:
            rows.append((f"episodes {when.replace('_', ' ')}",
                         f"tool called {e['tool_call_share']:.3f}, without error "
                         f"{e['tool_ok_share']:.3f}, turns {e['mean_turns']:.2f}"))
    pref = ev.get("preference_accuracy") or {}
    if pref.get("after") is not None:
        rows += [("preference accuracy before", _fmt(pref.get("before"))),
                 ("preference accuracy after", _fmt(pref["after"]))]
    q = s.get("quant_stats")
    if q:
        rows += [
            ("bits per weight", q["bits_per_weight"]),
            ("compression vs bf16", f"{q['compression_ratio']}x" if q['compression_ratio'] else "-"),
            ("delta file bytes", q["delta_bytes"]),
        ]
    width = max(len(k) for k, _ in rows)
    lines = [f"  {k:<{width}}  {v}" for k, v in rows]
    bar = "-" * (width + 20)
    return "\n".join([bar, "  gym summary", bar, *lines, bar, f"  {s['run_dir']}/summary.json"])
