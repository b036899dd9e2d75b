"""What the Data page shows: a dataset option's rows as the policy will see them.

The rows come from the data plugin (``plugins.component("data", name).load()(cfg.data)``,
the task a run trains on) and are rendered by the same code training uses, with the
model's own tokenizer and chat template and ``data.system_prompt``:

- online methods (GRPO and kin) sample from the rendered prompt
  (:func:`gym_core.data.tasks.render_prompts`) and reward the answer field;
- offline methods (DPO, KTO, ...) train on the batch their own ``collate`` builds
  through :meth:`gym_core.model.policy.Policy.encode`: the page decodes that batch, so what it
  shows is the tokens the loss sees, cut where the method's length limits cut them.

The method's own ``check_data`` runs on the training split first: data a method cannot
use (DPO on unpaired rows) is reported here as a run would report it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from gym_core.base.errors import GymError


@dataclass
class Sequence:
    label: str  # "prompt", "chosen", "rejected", "completion", ...
    text: str  # as the model sees it (special tokens shown)
    tokens: int
    cut: bool = False  # shortened by a length limit


@dataclass
class Row:
    index: int
    source: dict[str, Any]  # the data plugin's row, as it is
    sequences: list[Sequence]
    target: str | None = None  # what the reward checks (online methods): the answer

    def source_json(self) -> str:
        return json.dumps(self.source, ensure_ascii=False, indent=1, default=str)


@dataclass
class DataView:
    data: str
    algorithm: str
    model: str
    split: str
    total: int  # rows in the split
    start: int
    online: bool
    reads: str  # the fields the method reads, one line
    problem: str | None = None  # the method's check_data message, if the data cannot serve
    rows: list[Row] = field(default_factory=list)


def view(overrides: list[str], split: str = "train", start: int = 0, count: int = 8
         ) -> DataView:
    """Rows ``start .. start+count`` of ``split`` for the config ``overrides`` give."""
    import torch

    from gym_core.data.formats import check_task, rows_to_check
    from gym_core.data.tasks import render_prompts
    from gym_core.model.policy import Policy, describe, load_tokenizer
    from gym_core.plugin.startup import bootstrap
    from gym_core.ui.configs import checked

    if split not in ("train", "test"):
        raise GymError(f"split must be train or test, not {split!r}")
    from omegaconf.errors import MissingMandatoryValue

    cfg = checked(overrides).cfg
    plugins = bootstrap()
    try:
        task = plugins.component("data", cfg.data.name).load()(cfg.data)
    except MissingMandatoryValue as exc:
        key = getattr(exc, "full_key", None) or "a field"
        raise GymError(f"data={cfg.data.name} needs {key}=... (add it to the overrides, e.g. "
                       "data.train_file=my.jsonl)") from None
    algo_cls = plugins.component("algorithm", cfg.algorithm.name).load()
    tok = load_tokenizer(cfg.model)
    examples = task.train if split == "train" else task.test
    start = max(0, min(start, max(len(examples) - 1, 0)))
    chosen = examples[start:start + count]
    # A Policy on the real tokenizer and a one-parameter placeholder module: encode()
    # needs a device, never the weights.
    policy = Policy(torch.nn.Linear(1, 1), tok, lora=False,
                    system_prompt=cfg.data.system_prompt)
    algo = algo_cls(cfg.algorithm, policy)
    out = DataView(data=cfg.data.name, algorithm=cfg.algorithm.name, model=describe(cfg.model),
                   split=split, total=len(examples), start=start, online=algo_cls.online,
                   reads="")
    try:
        check_task(cfg, algo_cls, task.train)
        algo.check_data(rows_to_check(task.train))
    except GymError as exc:
        out.problem = str(exc)
    if algo_cls.online:
        rewards = ", ".join(cfg.algorithm.rewards)
        out.reads = (f"the prompt, rendered; {cfg.algorithm.num_generations} samples of "
                     f"up to {cfg.algorithm.max_completion_length} tokens each are scored by "
                     f"the rewards [{rewards}] against the answer")
        texts = render_prompts(tok, [ex["prompt"] for ex in chosen], cfg.data.system_prompt)
        for i, (ex, text) in enumerate(zip(chosen, texts)):
            ids = tok(text, add_special_tokens=False).input_ids
            out.rows.append(Row(start + i, ex, [Sequence("prompt", text, len(ids))],
                                target=None if ex.get("answer") is None else str(ex["answer"])))
        return out
    out.reads = ("the prompt and the completions, rendered, tokenized and cut as the "
                 "method's own batches are")
    if out.problem or not chosen:
        out.rows = [Row(start + i, ex, []) for i, ex in enumerate(chosen)]
        return out
    try:
        batch = algo.collate(list(chosen))  # the page's rows as one batch of the method
    except GymError as exc:
        out.problem = str(exc)
        out.rows = [Row(start + i, ex, []) for i, ex in enumerate(chosen)]
        return out
    g = batch.group_size
    completion_limit = getattr(cfg.algorithm, "max_completion_length", None)
    # the batch's own rows, in its order (a method may reorder or unpair them)
    examples = batch.examples if len(batch.examples) == batch.prompt_ids.shape[0] else chosen
    for i, ex in enumerate(examples):
        j = next((k for k, c in enumerate(chosen) if c is ex), None)
        if j is None:  # a row the method derived (KTO unpairs a pair): its source's number
            j = next((k for k, c in enumerate(chosen) if c.get("prompt") == ex.get("prompt")), 0)
        ids = batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist()
        full = render_prompts(tok, [ex["prompt"]], cfg.data.system_prompt)[0]
        full_len = len(tok(full, add_special_tokens=False).input_ids)
        seqs = [Sequence("prompt", tok.decode(ids), len(ids), cut=full_len > len(ids))]
        for k, label in enumerate(completion_labels(ex, g)):
            row = i * g + k
            cids = batch.completion_ids[row][batch.completion_mask[row].bool()].tolist()
            seqs.append(Sequence(label, tok.decode(cids), len(cids),
                                 cut=completion_limit is not None and len(cids) >= completion_limit
                                 and _longer(tok, ex, label, cfg, completion_limit)))
        out.rows.append(Row(start + j, ex, seqs))
    return out


def completion_labels(ex: dict[str, Any], g: int) -> list[str]:
    """Names of a row's G completions in its batch (the order its method's collate uses:
    chosen then rejected for pairs)."""
    if g == 2 and "chosen" in ex and "rejected" in ex:
        return ["chosen", "rejected"]
    if g == 1 and "completion" in ex:
        if "label" in ex:
            return [f"completion ({'desirable' if ex['label'] else 'undesirable'})"]
        return ["completion"]
    return [f"completion {k + 1}" for k in range(g)]


def _longer(tok, ex, label, cfg, limit: int) -> bool:
    """True when the completion ``label`` names was longer than ``limit`` tokens."""
    from gym_core.data.tasks import render_completion

    key = label.split(" ")[0]
    if key not in ex:
        return True
    text = render_completion(tok, ex["prompt"], ex[key], cfg.data.system_prompt)
    return len(tok(text, add_special_tokens=False).input_ids) > limit
