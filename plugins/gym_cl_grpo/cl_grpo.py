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
API). Replies that do not parse are skipped and counted; they never reach the library.
Main branch reconciles the batch with one more LLM call; here the reconciliation rules
it asks for are applied exactly, in :func:`gym_cl_grpo.experience.apply_operations`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from gym_cl_grpo import CLGRPOConfig, prompts
from gym_cl_grpo.experience import Experience, labels, open_store
from gym_cl_grpo.llm import make_llm
from gym_cl_grpo.replies import parse_lessons, parse_operations
from gym_core.api import Algorithm

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
    trains_weights = False

    def __init__(self, cfg, policy) -> None:
        super().__init__(cfg, policy)  # values checked against CLGRPOConfig's declarations
        self.store = self.llm = None
        self.system_prompt = None
        self.library_step = 0  # the library's step this run's rollouts start from
        self._synced = False
        self._resumed = False
        self._shown: dict[str, Experience] | None = None

    # -- wiring -------------------------------------------------------------------------
    def setup(self, cfg, run_dir, plugins) -> None:
        self.system_prompt = cfg.data.system_prompt
        self.store = open_store(cfg, plugins, run_dir)  # a bad library fails here
        self.llm = make_llm(cfg, plugins, self.policy)  # a missing key fails here

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
        return {"library_size": len(self.store.list()), "library_step": self.library_step,
                "library_path": str(self.store.path)}

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
            out.append({**ex, _QUESTION: ex["prompt"], "prompt": prompts.inject(
                ex["prompt"], shown, self.cfg.inject_into, self.system_prompt)})
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

        # 2. one summary per trajectory of the kept groups
        convs = [prompts.summary_messages(g.question, c, r, g.answer)
                 for g in groups for c, r in zip(g.completions, g.rewards)]
        replies = iter(self.llm.chat(convs) if convs else [])
        attempts: list[list[tuple[float, str]]] = []
        for g in groups:
            attempts.append([(r, (next(replies) or "").strip()) for r in g.rewards])
        m["summaries_empty"] = sum(1 for a in attempts for _, s in a if not s)

        # 3. lessons per group, from its good and bad summaries side by side
        # good = above the group's mean reward, bad = below (binary rewards: right/wrong)
        contrast = [(g, [(r, s) for r, s in a if s]) for g, a in zip(groups, attempts)]
        contrast = [(g, a) for g, a in contrast
                    if any(r > g.mean for r, _ in a) and any(r < g.mean for r, _ in a)]
        convs = [prompts.advantage_messages(g.question, g.answer, a, self.cfg.lessons_per_group)
                 for g, a in contrast]
        m["groups_contrasted"] = len(contrast)
        lessons_per_group, lesson_unparsed, lessons_rejected = [], 0, 0
        for reply in (self.llm.chat(convs) if convs else []):
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
        convs = [prompts.update_messages(shown, lessons) for lessons in lessons_per_group]
        ops, op_unparsed, op_invalid = [], 0, 0
        for reply in (self.llm.chat(convs) if convs else []):
            parsed = parse_operations(reply, shown, self.cfg.max_experience_words)
            if parsed is None:
                op_unparsed += 1
                continue
            ops.extend(parsed[0])
            op_invalid += parsed[1]
        m.update(op_replies_unparsed=op_unparsed, ops_invalid=op_invalid,
                 llm_calls=self.llm.calls - calls_before,
                 llm_retries=self.llm.retries - retries_before,
                 llm_seconds=time.perf_counter() - t0)

        # 5. one atomic batch; the store renumbers G0..Gn. Recorded even when empty, so
        #    every step has its version of the library.
        result = self.store.apply(ops, self.library_step + 1)
        self.library_step = result.step
        m.update(ops_added=result.added, ops_updated=result.updated,
                 ops_deleted=result.deleted, ops_skipped=result.skipped,
                 library_size=result.size)
        return {k: float(v) for k, v in m.items()}

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
                kept.append(Group(
                    question=prompts.question_text(ex.get(_QUESTION, ex["prompt"])),
                    answer=str(ex.get("answer", "")),
                    completions=list(batch.completions[i * g:(i + 1) * g]),
                    rewards=[float(r) for r in row],
                ))
        return kept, total
