"""lm-evaluation-harness over gym's models: :class:`GymLM`, an ``lm_eval`` language model
(registered as ``gym``) that generates with gym's sampler (the fused KV-cached decoder,
each prompt prefilled once, stop strings ending rows early) and scores log-likelihoods
with one forward pass per batch; and :func:`evaluate_harness`, which runs harness tasks
through ``lm_eval.simple_evaluate`` on it, or on a served variant through the harness's
own ``local-completions`` model.

    from gym_core.eval.harness import GymLM, evaluate_harness
    lm = GymLM(model=model, tokenizer=tokenizer)          # any gym model: a base, a run
    evaluate_harness(lm, ["my_task"], include=["tasks/"])  # merged, a LoRA policy, ...

It follows the harness's ``hf`` model request by request (the same tokenisation, left
truncation, stop strings and scoring), so both give the same scores on the same
weights (tests/test_eval_harness.py checks it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from gym_core.base.errors import GymError


@register_model("gym")
class GymLM(TemplateLM):
    """A gym model as an lm-eval ``LM``. ``model``/``tokenizer``: a loaded model (plain,
    or a peft LoRA model); or ``pretrained``: anything ``eval.models`` names (a run
    folder, a checkpoint, an exported folder, ``delta:runs/x``, ``base``) with
    ``base`` the ``model=`` option of the base (for ``lm_eval --model gym``)."""

    def __init__(self, model=None, tokenizer=None, *, pretrained: str | None = None,
                 base: str = "smollm2", batch_size: int | str = 16,
                 max_length: int | None = None, max_gen_toks: int = 256, seed: int = 0,
                 **_ignored):
        super().__init__()
        if model is None:
            if pretrained is None:
                raise GymError("GymLM needs model= and tokenizer=, or pretrained=<what "
                               "eval.models names>")
            model, tokenizer = _load(pretrained, base)
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self._max_length = max_length
        self._max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self._device = next(model.parameters()).device

    # --- what the harness reads -------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        from lm_eval.models.utils import resolve_max_length

        return resolve_max_length(getattr(self.model, "config", None), self.tokenizer,
                                  default=2048)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs) -> list[int]:
        from lm_eval.models.utils import has_bos_prefix

        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and has_bos_prefix(
                string, self.tokenizer.decode(self.prefix_token_id)):
            kw["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **kw)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    # --- scoring ------------------------------------------------------------------------
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """(sum of the continuation's log-probs, whether greedy decoding gives it) per
        request: inputs right-padded in batches of similar length, one forward each."""
        order = sorted(range(len(requests)),
                       key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        out: list[Any] = [None] * len(requests)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                inps, conts = [], []
                for i in idx:
                    _, ctx, cont = requests[i]
                    inps.append((ctx + cont)[-(self.max_length + 1):][:-1])
                    conts.append(cont)
                width = max(len(x) for x in inps)
                ids = torch.zeros(len(idx), width, dtype=torch.long)
                mask = torch.zeros(len(idx), width, dtype=torch.long)
                for r, x in enumerate(inps):
                    ids[r, : len(x)] = torch.tensor(x)
                    mask[r, : len(x)] = 1
                logits = self.model(input_ids=ids.to(self._device),
                                    attention_mask=mask.to(self._device)).logits
                logp = F.log_softmax(logits.float(), dim=-1)
                for r, (i, cont) in enumerate(zip(idx, conts)):
                    n = len(inps[r])
                    rows = logp[r, n - len(cont) : n]
                    target = torch.tensor(cont, device=rows.device)
                    greedy = bool((rows.argmax(-1) == target).all())
                    out[i] = (float(rows.gather(1, target[:, None]).sum()), greedy)
        finally:
            self.model.train(was_training)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for w in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, *w))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[i] += lp
        return totals

    # --- generation ---------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Every request through gym's decode engine with continuous batching (the
        serving engine, :class:`gym_core.serve.engine.Engine`): up to ``batch_size`` rows
        run at once, a row leaves at its stop string, EOS or ``max_gen_toks`` and the next
        request's prompt joins in its place, so no row waits for the longest of a batch.
        Each row keeps its own sampling parameters and seed (``seed`` + its index)."""
        import threading

        from lm_eval.models.utils import (
            handle_stop_sequences,
            normalize_gen_kwargs,
            postprocess_generated_text,
        )

        from gym_core.serve.engine import Engine, Params, Request

        tok = self.tokenizer
        eos = tok.decode(self.eot_token_id, skip_special_tokens=False)
        texts: list[list[str]] = [[] for _ in requests]
        stops: list[list[str]] = []
        errors: list[str] = []
        left = [len(requests)]
        finished = threading.Event()
        lock = threading.Lock()

        def emitter(i: int):
            def emit(ev) -> None:
                if ev.kind == "text":
                    texts[i].append(ev.text)
                    return
                with lock:
                    if ev.kind == "error":
                        errors.append(ev.text)
                    left[0] -= 1
                    if left[0] == 0 or errors:
                        finished.set()
            return emit

        jobs = []
        for i, req in enumerate(requests):
            kwargs = normalize_gen_kwargs(dict(req.args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            temperature = float(kwargs.get("temperature") or 0.0)
            do_sample = bool(kwargs.get("do_sample")) and temperature > 0
            keep = self.max_length - max_gen
            if keep <= 0:
                raise GymError(f"max_gen_toks={max_gen} leaves no room for a prompt in "
                               f"the model's {self.max_length} tokens")
            ids = self.tok_encode(req.args[0])[-keep:]
            params = Params(max_tokens=max_gen, temperature=temperature if do_sample else 0.0,
                            top_p=float(kwargs.get("top_p") or 1.0) if do_sample else 1.0,
                            seed=self.seed + i, stop=[s for s in until if s])
            stops.append(until)
            jobs.append(Request(ids, None, params, emitter(i)))
        if not jobs:
            return []
        was_training = self.model.training
        self.model.eval()
        engine = Engine(self.model, tok, max_rows=self.batch_size, max_len=self.max_length,
                        share=False)
        try:
            # longest prompts first, as the harness orders them: joins of like lengths
            for job in sorted(jobs, key=lambda j: -len(j.prompt_ids)):
                engine.submit(job)
            finished.wait()
        finally:
            # what the last call's engine did (steps, prefills, prefix cache reuse)
            self.engine_stats = engine.load()
            engine.stop()
            self.model.train(was_training)
        if errors:
            raise GymError(f"generation failed: {errors[0]}")
        return [postprocess_generated_text(generation="".join(t), stop=until,
                                           think_end_token=None)
                for t, until in zip(texts, stops)]


def _load(pretrained: str, base: str):
    from gym_core.eval import models
    from gym_core.plugin.startup import bootstrap, compose

    plugins = bootstrap()
    model_cfg = compose([f"model={base}"]).model
    # one model, compared with none: runs and checkpoints load on their own base, and
    # base= says only what pretrained="base" is
    refs = models.resolve(pretrained, model_cfg, None, same_base=False)
    if len(refs) != 1 or refs[0].kind == "served":
        raise GymError(f"pretrained={pretrained!r} must name one local model")
    return models.load(refs[0], model_cfg, plugins)


def task_manager(include: list[str] | None, builtin: bool = True):
    """The harness's task index: its own tasks (``builtin``; most fetch their data from
    the hub, so only those already in the local datasets cache run) and the task YAMLs
    in the ``include`` folders."""
    from lm_eval.tasks import TaskManager

    paths = [str(Path(p).expanduser()) for p in include or []]
    for p in paths:
        if not Path(p).is_dir():
            raise GymError(f"eval.lm_eval_include: {p} is not a folder of task YAMLs")
    return TaskManager(include_path=paths or None, include_defaults=builtin)


def check_tasks(names: list[str], manager) -> None:
    """A harness task nobody defines is a one-line error, before any model loads."""
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise GymError(f"lm_eval task {unknown[0]!r} is not a known lm-evaluation-harness "
                       "task or group (add the folder of its YAML to eval.lm_eval_include)")


def evaluate_harness(lm, tasks: list[str], *, include: list[str] | None = None,
                     manager=None, limit: int | None = None, num_fewshot: int | None = None,
                     seed: int = 0, model_args: dict | None = None,
                     gen_kwargs: dict | None = None) -> dict[str, dict[str, Any]]:
    """Run harness ``tasks`` on ``lm`` (a :class:`GymLM`, or a harness model name such
    as ``"local-completions"`` with ``model_args``): {task: {"metrics": {name: value},
    "examples": n}}. Metric names drop the harness's ``,none`` filter suffix
    (``exact_match``; another filter: ``exact_match/strict-match``)."""
    import lm_eval

    manager = manager or task_manager(include)
    check_tasks(tasks, manager)
    if isinstance(lm, str):
        lm = harness_model(lm, model_args or {})
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=manager,
            limit=limit, num_fewshot=num_fewshot, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed, log_samples=False,
            bootstrap_iters=0, gen_kwargs=gen_kwargs, verbosity="ERROR")
    except (FileNotFoundError, ConnectionError) as exc:
        raise GymError(f"lm_eval tasks {', '.join(tasks)}: {str(exc).splitlines()[0]} "
                       "(is the task's data on this machine?)") from None
    out = {}
    for name, metrics in (results or {}).get("results", {}).items():
        values = {}
        for key, value in metrics.items():
            if key == "alias" or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            values[metric if filt in ("", "none") else f"{metric}/{filt}"] = float(value)
        n = results.get("n-samples", {}).get(name, {}).get("effective")
        out[name] = {"metrics": values, "examples": int(n) if n is not None else 0}
    return out


def harness_model(name: str, args: dict[str, Any]):
    """The harness's own model ``name`` (``hf``, ``local-completions``, ...) built from
    ``args``, imported from its module (the harness registers its models lazily)."""
    from importlib import import_module

    from lm_eval.models import MODEL_MAPPING

    if name not in MODEL_MAPPING:
        raise GymError(f"{name!r} is not an lm-evaluation-harness model "
                       f"({', '.join(sorted(MODEL_MAPPING))})")
    module, cls = MODEL_MAPPING[name].split(":")
    return getattr(import_module(module), cls).create_from_arg_obj(args)


def served_model_args(server: str, name: str, tokenizer: str, *, api_key: str | None = None,
                      max_gen_toks: int = 256) -> dict[str, Any]:
    """``model_args`` of the harness's ``local-completions`` model for a model served by
    ``python -m gym_core.serve`` (``generate_until`` tasks: prompts sent as text to its
    ``/v1/completions``; ``tokenizer``: a local folder holding the served base's
    tokenizer, which the harness uses to measure contexts)."""
    args = {"model": name, "base_url": server.rstrip("/") + "/v1/completions",
            "tokenizer_backend": "huggingface", "tokenizer": tokenizer,
            "tokenized_requests": False, "max_gen_toks": max_gen_toks, "num_concurrent": 1,
            "max_retries": 1}
    if api_key:
        args["header"] = {"Authorization": f"Bearer {api_key}"}
    return args
