"""Training-Free GRPO (docs/algorithms.md §8): GRPO's loop with a text experience library in
place of the weights.

Per step, on the batch the core's rollout engine sampled with the library injected
(:meth:`transform_examples`; G rollouts per question, verifier rewards):

1. keep the groups whose mean reward is strictly between 0 and 1 (only they contrast);
2. summarise every trajectory of a kept group, graded against the ground truth;
3. per group, contrast good and bad summaries and extract at most K lessons;
4. per group, label each lesson ADD / UPDATE / DELETE / NONE against the library;
5. apply all operations as one batch (the store reconciles them: DELETE beats UPDATE,
   duplicate ADDs merge) and renumber G0..Gn.

Steps 2-4 are batched LLM calls (``llm=local``: the policy itself; ``llm=openai``: an
API; ``llm=policy``: the policy's own endpoint). Replies that do not parse are skipped and
counted; they never reach the library. With ``policy=api`` the rollouts and the held-out
answers come from an OpenAI-compatible endpoint (:mod:`gym_cl_grpo.policy`); every API
call is charged to the run's usage record and budget (:mod:`gym_cl_grpo.budget`).
With ``env=...`` the rollouts are multi-turn episodes (docs/agents.md): the library goes
in each episode's system turn and the summaries read each episode's transcript.
Main branch reconciles the batch with one more LLM call; here the reconciliation rules
it asks for are applied exactly, in :func:`gym_cl_grpo.experience.apply_operations`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gym_cl_grpo import CLGRPOConfig, prompts
from gym_cl_grpo.budget import FIELDS, Ledger, difference
from gym_cl_grpo.experience import Experience, Operation, clean_text, labels, open_store
from gym_cl_grpo.llm import make_llm
from gym_cl_grpo.policy import as_messages
from gym_cl_grpo.replies import parse_lessons, parse_operations
from gym_core.api import SYSTEM_ADDITION, Algorithm, GymError, write_json

_QUESTION = "cl_grpo_question"  # the row's own prompt, kept beside the injected one


@dataclass
class Group:
    question: str
    answer: str
    completions: list[str]
    rewards: list[float]

    @property
    def mean(self) -> float:
        return sum(self.rewards) / len(self.rewards)


class TrainingFreeGRPO(Algorithm):
    Config = CLGRPOConfig
    online = True
    data_types = ("prompt_only",)
    trains_weights = False

    def __init__(self, cfg, policy) -> None:
        super().__init__(cfg, policy)  # values checked against CLGRPOConfig's declarations
        self.store = self.llm = self.api = self.ledger = None
        self.run_dir: Path | None = None
        self.system_prompt = None
        self.templates = prompts.Templates()
        self._step_usage: dict[str, float] | None = None  # the ledger when the step began
        self._last_step_usage: dict[str, float] | None = None
        self.library_step = 0  # the library's step this run's rollouts start from
        self._synced = False
        self._resumed = False
        self._shown: dict[str, Experience] | None = None
        self.episodes = False  # env=...: rollouts are multi-turn episodes (docs/agents.md)

    # -- wiring -------------------------------------------------------------------------
    def setup(self, cfg, run_dir, plugins) -> None:
        self.system_prompt = cfg.data.system_prompt
        self.run_dir = Path(run_dir)
        self.templates = prompts.Templates.load(self.cfg.prompts_dir)  # a bad template fails here
        acfg = self.cfg
        self.ledger = Ledger(Path(run_dir) / "api_usage.json", acfg.max_api_tokens,
                             acfg.max_api_cost)
        policy_impl = plugins.component("policy", cfg.policy.name).load()
        self.api = None if getattr(policy_impl, "local", False) else \
            policy_impl(cfg.policy, self.ledger)  # a missing key fails here
        self.episodes = cfg.get("env") is not None
        if self.episodes and self.api is not None:
            raise GymError(f"algorithm=cl_grpo with env={cfg.env.name} plays its episodes with "
                           f"the local policy; policy={cfg.policy.name} answers single turns "
                           "(use policy=local)")
        self.llm = make_llm(cfg, plugins, self.policy, ledger=self.ledger, api_policy=self.api)
        uses_api = self.api is not None or getattr(type(self.llm), "charges_usage", False)
        if uses_api:
            for key in ("max_api_tokens", "max_api_cost"):
                if acfg.get(key) == 0:
                    raise GymError(f"algorithm.{key}=0 allows no API call, and this run calls "
                                   "an API; raise it, or set it to null for no limit")
            limit = self.ledger.exhausted()
            if limit:
                raise GymError(f"the API budget {limit} is already spent "
                               f"({self.ledger.spent_line()}, recorded in {self.ledger.path}); "
                               "raise it to continue this run")
            self._last_step_usage = self.ledger.last_step
            if self.stop_reason():  # a resumed run whose budget does not fit another step
                raise GymError(self._budget_line("the API budget has no room for another step"))
        self.store = open_store(cfg, plugins, run_dir)  # a bad library fails here
        if acfg.library_init:
            self._import_library(Path(acfg.library_init))

    def _import_library(self, path: Path) -> None:
        """A new library starts from a file in the paper's format (recorded as step 1 of
        the library, before any training step would be; a library with steps is kept)."""
        entries = read_paper_library(path)
        if self.store.last_step() > 0:
            print(f"gym: cl_grpo: the experience library {self.store.path} already has "
                  f"steps; algorithm.library_init={path} is not imported again")
            return
        self.store.apply([Operation("ADD", text=t) for t in entries], 1)
        print(f"gym: cl_grpo: imported {len(entries)} experiences from {path}")

    def state_dict(self) -> dict[str, Any]:
        return {"library_step": self.library_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.library_step = int(state.get("library_step", 0))
        self._resumed = True

    def _sync_library(self) -> None:
        """A new run continues the library it finds (another run's, or a shared one) from
        its last step. A run resumed from a checkpoint older than the library's last step
        redoes those steps: the library goes back to the checkpoint's version first."""
        if self._synced:
            return
        if not self._resumed:
            self.library_step = self.store.last_step()
        elif self.store.last_step() > self.library_step:
            print(f"gym: cl_grpo: rewinding the experience library {self.store.path} from "
                  f"step {self.store.last_step()} to the checkpoint's step {self.library_step}")
            self.store.rewind(self.library_step)
        self._synced = True

    def report(self) -> dict[str, Any]:
        if self.store is None:
            return {}
        out = {"library_size": len(self.store.list()), "library_step": self.library_step,
               "library_path": str(self.store.path)}
        if self.ledger is not None and self.ledger.total["calls"]:
            out.update(self.ledger.report())  # what the run's API calls cost, in all
        return out

    def stop_reason(self) -> str | None:
        """With a budget: stop after this step when another step like it would not fit."""
        last = self._last_step_usage
        if last is None or (self.cfg.max_api_tokens is None and self.cfg.max_api_cost is None):
            return None
        if self.ledger.remaining_fraction(last):
            return None
        return self._budget_line(f"stopping at the API budget after step {self.library_step}")

    def _budget_line(self, what: str) -> str:
        last = self._last_step_usage
        return (f"{what}: "
                f"{self.ledger.spent_line()} spent, and the last step cost "
                f"{last['cost']:.6g} USD / {int(last['input_tokens'] + last['output_tokens'])} "
                f"tokens (algorithm.max_api_cost={self.cfg.max_api_cost}, "
                f"algorithm.max_api_tokens={self.cfg.max_api_tokens}). The checkpoint and the "
                "library are at the last complete step: raise the budget and run the same "
                "command again to continue")

    # -- an API policy ------------------------------------------------------------------
    def sample_batch(self, examples, seeds, engine):
        if self._step_usage is None:
            self._step_usage = self.ledger.snapshot()
        shown = self.transform_examples(examples)
        if self.api is None:
            return engine.generate(shown, seeds)
        import torch

        from gym_core.api import Rollout

        g = self.cfg.num_generations
        convs = [as_messages(ex["prompt"], self.system_prompt) for ex in shown for _ in range(g)]
        row_seeds = [s * 1009 + i for s in seeds for i in range(g)]
        replies = self.api.answer(convs, max_tokens=self.cfg.max_completion_length,
                                  temperature=self.cfg.temperature, seeds=row_seeds)
        rows = [ex for ex in shown for _ in range(g)]
        completions = [r.text for r in replies]
        total, scored, metrics = engine.score(rows, completions)
        n = len(rows)
        lengths = [max(1, r.output_tokens or len(r.text.split())) for r in replies]
        width = max(lengths)
        mask = torch.zeros(n, width, dtype=torch.long)
        for i, k in enumerate(lengths):
            mask[i, :k] = 1
        return Rollout(
            prompt_ids=torch.zeros(len(shown), 1, dtype=torch.long),
            prompt_mask=torch.ones(len(shown), 1, dtype=torch.long),
            completion_ids=torch.zeros(n, width, dtype=torch.long), completion_mask=mask,
            truncated=torch.tensor([r.finish_reason == "length" for r in replies]),
            rewards=total, group_size=g, examples=rows, completions=completions,
            reward_metrics=metrics, scorable=scored)

    def answer(self, examples, max_new_tokens):
        if self.api is None:
            return None
        convs = [as_messages(ex["prompt"], self.system_prompt) for ex in examples]
        return [r.text for r in self.api.answer(convs, max_tokens=max_new_tokens,
                                                temperature=0.0)]

    # -- the library in the prompt --------------------------------------------------------
    def transform_examples(self, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self._sync_library()
        self._shown = labels(self.store.list())
        by_key = {e.key: label for label, e in self._shown.items()}
        out = []
        for ex in examples:
            picked = self.store.retrieve(prompts.question_text(ex["prompt"]))
            shown = {by_key[e.key]: e for e in sorted(picked, key=lambda e: e.key)
                     if e.key in by_key}
            if self.episodes:  # the environment reads the prompt: the library goes in the
                # episode's system turn (gym_core's SYSTEM_ADDITION), inject_into unused
                out.append({**ex, _QUESTION: ex["prompt"], SYSTEM_ADDITION: prompts.library_text(
                    shown, self.templates.solve)})
                continue
            out.append({**ex, _QUESTION: ex["prompt"], "prompt": prompts.inject(
                ex["prompt"], shown, self.cfg.inject_into, self.system_prompt,
                self.templates.solve)})
        return out

    # -- one step -------------------------------------------------------------------------
    def step(self, batches: list[Any], totals, updater) -> dict[str, float]:
        """No weights change (``trains_weights = False``, ``updater`` is None): the step
        learns by editing the library."""
        self._sync_library()
        shown = self._shown if self._shown is not None else labels(self.store.list())
        groups, total = self._contrasting_groups(batches)
        m: dict[str, float] = {"groups": total, "groups_kept": len(groups)}
        t0 = time.perf_counter()
        calls_before, retries_before = self.llm.calls, self.llm.retries

        t = self.templates
        gt = self.cfg.use_groundtruth
        chars = prompts.text_limit(self.cfg.max_experience_words)
        structured = bool(getattr(self.llm.cfg, "structured", False))

        # 2. one summary per trajectory of the kept groups
        convs = [prompts.summary_messages(g.question, c, r, g.answer if gt else None, t)
                 for g in groups for c, r in zip(g.completions, g.rewards)]
        replies = iter(self.llm.chat(convs, max_new_tokens=self.cfg.summary_max_new_tokens)
                       if convs else [])
        attempts: list[list[tuple[float, str]]] = []
        for g in groups:
            attempts.append([(r, (next(replies) or "").strip()) for r in g.rewards])
        m["summaries_empty"] = sum(1 for a in attempts for _, s in a if not s)

        # 3. lessons per group, from its good and bad summaries side by side
        # good = above the group's mean reward, bad = below (binary rewards: right/wrong)
        contrast = [(g, [(r, s) for r, s in a if s]) for g, a in zip(groups, attempts)]
        contrast = [(g, a) for g, a in contrast
                    if any(r > g.mean for r, _ in a) and any(r < g.mean for r, _ in a)]
        k = self.cfg.lessons_per_group
        convs = [prompts.advantage_messages(g.question, g.answer if gt else None, a, k, t,
                                            structured) for g, a in contrast]
        m["groups_contrasted"] = len(contrast)
        lessons_per_group, lesson_unparsed, lessons_rejected = [], 0, 0
        lesson_replies = (self.llm.chat(convs, schema=prompts.lessons_schema(k, chars))
                          if convs else [])
        for reply in lesson_replies:
            parsed = parse_lessons(reply, self.cfg.lessons_per_group,
                                   self.cfg.max_experience_words)
            if parsed is None:
                lesson_unparsed += 1
                continue
            lessons, rejected = parsed
            lessons_rejected += rejected
            if lessons:
                lessons_per_group.append(lessons)
        m.update(lesson_replies_unparsed=lesson_unparsed, lessons_rejected=lessons_rejected,
                 lessons=sum(len(x) for x in lessons_per_group))

        # 4. operations per group against the library the rollouts saw
        cap = self.cfg.max_operations
        convs = [prompts.update_messages(shown, lessons, cap, t, structured)
                 for lessons in lessons_per_group]
        ops, op_unparsed, op_invalid, over_cap = [], 0, 0, 0
        schema = prompts.operations_schema(shown, cap, chars)
        op_replies = self.llm.chat(convs, schema=schema) if convs else []
        for reply in op_replies:
            parsed = parse_operations(reply, shown, self.cfg.max_experience_words)
            if parsed is None:
                op_unparsed += 1
                continue
            ops.extend(parsed[0][:cap])  # semantic_max_operations: the first `cap` count
            over_cap += max(0, len(parsed[0]) - cap)
            op_invalid += parsed[1]
        m.update(op_replies_unparsed=op_unparsed, ops_invalid=op_invalid, ops_over_cap=over_cap,
                 llm_calls=self.llm.calls - calls_before,
                 llm_retries=self.llm.retries - retries_before,
                 llm_seconds=time.perf_counter() - t0)

        # 5. one atomic batch; the store renumbers G0..Gn. Recorded even when empty, so
        #    every step has its version of the library.
        result = self.store.apply(ops, self.library_step + 1)
        self.library_step = result.step
        self._record(result.step, groups, attempts, contrast, lesson_replies, op_replies,
                     ops, shown)
        m.update(ops_added=result.added, ops_updated=result.updated,
                 ops_deleted=result.deleted, ops_skipped=result.skipped,
                 library_size=result.size)
        # what the step's API calls (rollouts and reflection) took
        if self.ledger is not None and self._step_usage is not None:
            used = difference(self.ledger.snapshot(), self._step_usage)
            self._last_step_usage, self._step_usage = used, None
            self.ledger.end_step(used)
            if used["calls"] or self.api is not None:
                m.update({f"api_{k}": used[k] for k in FIELDS})
                m["api_latency_mean"] = used["seconds"] / used["calls"] if used["calls"] else 0.0
                m["api_cost_total"] = self.ledger.total["cost"]
        return {k: float(v) for k, v in m.items()}

    def _record(self, step, groups, attempts, contrast, lesson_replies, op_replies, ops,
                shown) -> None:
        """What the lesson LLM read and wrote at this step, as it wrote it:
        ``<run_dir>/reflections/step-<N>.json`` (replaced when a resumed run redoes the
        step), so a library that does not grow can be traced to the stage whose output
        was unusable."""
        if self.run_dir is None:
            return
        key_label = {e.key: label for label, e in shown.items()}
        write_json(self.run_dir / "reflections" / f"step-{step:06d}.json", {
            "step": step,
            "library_shown": {label: e.text for label, e in shown.items()},
            "groups": [{"question": g.question, "answer": g.answer, "rewards": g.rewards,
                        "completions": g.completions, "summaries": [s for _, s in a]}
                       for g, a in zip(groups, attempts)],
            "contrasted": [g.question for g, _ in contrast],
            "lesson_replies": lesson_replies,
            "operation_replies": op_replies,
            "operations_applied": [{"operation": o.kind, "id": key_label.get(o.key),
                                    "content": o.text} for o in ops],
        })

    def _contrasting_groups(self, batches) -> tuple[list[Group], int]:
        """Groups with 0 < mean reward < 1 (§8.1, step 2), and how many groups there were."""
        kept, total = [], 0
        for batch in batches:
            g = batch.group_size
            rewards = batch.rewards.detach().float().cpu().view(-1, g)
            for i, row in enumerate(rewards.tolist()):
                total += 1
                mean = sum(row) / g
                if not 0 < mean < 1:
                    continue
                ex = batch.examples[i * g]
                question = prompts.question_text(ex.get(_QUESTION, ex["prompt"]))
                completions = list(batch.completions[i * g:(i + 1) * g])
                if getattr(batch, "episodes", None) is not None:  # multi-turn episodes
                    records = batch.episodes[i * g:(i + 1) * g]
                    question = prompts.episode_task(records[0].messages) or question
                    completions = [prompts.transcript(r.messages) for r in records]
                kept.append(Group(question=question, answer=str(ex.get("answer", "")),
                                  completions=completions, rewards=[float(r) for r in row]))
        return kept, total


def read_paper_library(path: Path) -> list[str]:
    """The experiences of a library in the paper's format, ``{"G0": "text", ...}``, in
    id order; anything else is refused naming the file and what is wrong."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GymError(f"algorithm.library_init={path}: no such file") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise GymError(f"algorithm.library_init={path} is not a library: not valid JSON "
                       f"({exc})") from None
    if not isinstance(data, dict):
        raise GymError(f"algorithm.library_init={path} is not a library: expected an object "
                       f'{{"G0": "text", ...}}, got {type(data).__name__}')
    entries = []
    for key, text in data.items():
        if not (isinstance(key, str) and key[:1] == "G" and key[1:].isdigit()):
            raise GymError(f"algorithm.library_init={path} is not a library: key {key!r} is "
                           'not an id like "G0"')
        if not isinstance(text, str) or not clean_text(text):
            raise GymError(f"algorithm.library_init={path}: {key} is not a non-empty string")
        entries.append((int(key[1:]), clean_text(text)))
    return [t for _, t in sorted(entries)]
