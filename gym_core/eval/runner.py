"""One evaluation: every model of ``eval.models`` on every task of ``eval.tasks``,
results read from / written to the store (:mod:`gym_core.eval.store`)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from gym_core.base.errors import GymError
from gym_core.eval import models as M
from gym_core.eval import tasks as T
from gym_core.eval.scoring import Settings, summarise
from gym_core.eval.store import Row, Store, config_digest, now


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    cached: set[int] = field(default_factory=set)  # indices of rows read from the store
    failures: list[str] = field(default_factory=list)

    def as_json(self) -> str:
        return json.dumps({"results": [{**r.as_dict(), "cached": i in self.cached}
                                       for i, r in enumerate(self.rows)],
                           "failures": self.failures}, indent=2)

    def table(self) -> str:
        head = ("model", "step", "task", "metric", "value", "examples", "")
        body = [(r.model, str(r.step) if r.step >= 0 else "-", r.task, r.metric,
                 "n/a" if r.value is None else f"{r.value:.4f}", str(r.examples),
                 "(cached)" if i in self.cached else "") for i, r in enumerate(self.rows)]
        widths = [max(len(x[c]) for x in [head, *body]) for c in range(len(head))]
        lines = ["  ".join(x[c].ljust(widths[c]) for c in range(len(head))).rstrip()
                 for x in [head, *body]]
        lines.insert(1, "-" * len(lines[0]))
        lines += [f"failed: {f}" for f in self.failures]
        return "\n".join(lines)


def settings_of(ecfg) -> Settings:
    s = Settings(n=int(ecfg.n), ks=tuple(int(k) for k in ecfg.k),
                 temperature=float(ecfg.temperature), top_p=float(ecfg.top_p),
                 max_new_tokens=int(ecfg.max_new_tokens), batch_size=int(ecfg.batch_size),
                 seed=int(ecfg.seed), pass_threshold=float(ecfg.pass_threshold))
    s.check()
    return s


def evaluate(cfg, plugins, *, log=print) -> Report:
    """Evaluate ``cfg.eval.models`` on ``cfg.eval.tasks``. Names are checked before
    anything loads (an unknown task or a folder that is not a model: a GymError); a task
    that then fails is reported in ``Report.failures`` while the others' results are
    kept (and stored as each finishes)."""
    ecfg = cfg.eval
    s = settings_of(ecfg)
    if not ecfg.models or not ecfg.tasks:
        raise GymError("eval.models and eval.tasks each need at least one entry")
    tasks = [T.resolve(t, cfg.data, plugins) for t in ecfg.tasks]
    harness = [t.harness for t in tasks if t.kind == "lm_eval"]
    manager = None
    if harness:
        from gym_core.eval.harness import check_tasks, task_manager

        manager = task_manager(list(ecfg.lm_eval_include), ecfg.lm_eval_builtin)
        check_tasks(harness, manager)
    refs = [r for spec in ecfg.models for r in M.resolve(spec, cfg.model, ecfg.server,
                                                         ecfg.api_key)]
    store = Store(ecfg.root)
    report = Report()
    for ref in refs:
        loaded = None
        for task in tasks:
            try:
                T.load(task, cfg.data, plugins, ecfg.limit, prompt_field=ecfg.prompt_field,
                       answer_field=ecfg.answer_field, verifier=ecfg.verifier)
                settings = _digest_settings(task, s, ecfg)
                digest = config_digest(settings)
                old = [] if ecfg.force else store.cached(ref.key, ref.step, task.name, digest)
                if old:
                    report.cached.update(range(len(report.rows), len(report.rows) + len(old)))
                    report.rows.extend(old)
                    continue
                if ref.kind != "served" and loaded is None:
                    log(f"gym eval: loading {ref.spec}")
                    loaded = M.load(ref, cfg.model, plugins)
                log(f"gym eval: {ref.label} on {task.name}")
                values, examples = _score(ref, loaded, task, s, ecfg, manager)
                rows = [Row(ref.key, ref.run, ref.step, task.name, metric, value, examples,
                            digest, settings, now()) for metric, value in values.items()]
                store.write(rows)
                report.rows.extend(rows)
            except GymError as exc:
                report.failures.append(f"{ref.label} on {task.name}: {exc}")
    return report


def _digest_settings(task: T.EvalTask, s: Settings, ecfg) -> dict:
    common = {"task": task.digest(), "limit": ecfg.limit}
    if task.kind == "lm_eval":
        return {**common, "kind": "lm_eval", "num_fewshot": ecfg.num_fewshot,
                "max_new_tokens": s.max_new_tokens, "seed": s.seed}
    return {**common, **s.digest_fields(), "verifier": task.metric,
            "system_prompt": ecfg.system_prompt or task.system_prompt}


def _score(ref: M.ModelRef, loaded, task: T.EvalTask, s: Settings, ecfg, manager):
    """({metric: value}, examples scored) of one model on one task."""
    if task.kind == "lm_eval":
        from gym_core.eval.harness import GymLM, evaluate_harness, served_model_args

        if ref.kind == "served":
            if not ecfg.tokenizer:
                raise GymError("lm_eval tasks on a served model need eval.tokenizer=DIR (a "
                               "folder with the served base's tokenizer files)")
            lm, args = "local-completions", served_model_args(
                ecfg.server, ref.name, ecfg.tokenizer, api_key=ecfg.api_key,
                max_gen_toks=s.max_new_tokens)
        else:
            lm, args = GymLM(*loaded, batch_size=s.batch_size,
                             max_gen_toks=s.max_new_tokens, seed=s.seed), None
        got = evaluate_harness(lm, [task.harness], manager=manager, limit=ecfg.limit,
                               num_fewshot=ecfg.num_fewshot, seed=s.seed, model_args=args)
        if task.harness not in got:
            raise GymError(f"lm_eval task {task.harness!r} gave no results")
        return got[task.harness]["metrics"], got[task.harness]["examples"]
    system_prompt = ecfg.system_prompt or task.system_prompt
    if ref.kind == "served":
        scores = _score_served(ref, task, s, ecfg, system_prompt)
    else:
        from gym_core.eval.scoring import score_local

        scores = score_local(loaded[0], loaded[1], task.examples, task.metric_fn, s,
                             system_prompt=system_prompt)
    return summarise(scores, s, task.metric), len(scores)


def _score_served(ref, task, s: Settings, ecfg, system_prompt) -> list[list[float]]:
    from gym_core.data.tasks import chat_messages

    def one(i_ex):
        i, ex = i_ex
        texts = M.served_completions(
            ecfg.server, ref.name, chat_messages(ex["prompt"], system_prompt), n=s.n,
            temperature=0.0 if s.greedy else s.temperature, top_p=s.top_p,
            max_tokens=s.max_new_tokens, seed=s.seed * 1_000_003 + i, api_key=ecfg.api_key)
        return [float(v) for v in task.metric_fn([ex["prompt"]] * len(texts), texts,
                                                 [ex] * len(texts))]

    with ThreadPoolExecutor(max_workers=max(1, min(8, s.batch_size))) as pool:
        return list(pool.map(one, enumerate(task.examples)))
