"""The ``eval`` section of ``python -m gym_core.eval`` (conf/eval.yaml). Cheap: no torch."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvalConfig:
    # base, run folders, delta:runs/x, checkpoints (runs/x/checkpoints/step-N, or a run's
    # checkpoints folder for all of them), exported folders, served:NAME
    models: list[str] = field(default_factory=lambda: ["base"])
    # data (the config's data=), a data option's name, jsonl:PATH, lm_eval:NAME
    tasks: list[str] = field(default_factory=lambda: ["data"])
    server: str | None = None  # a running python -m gym_core.serve, for served:NAME models
    api_key: str | None = None  # its --api-key, when it has one
    tokenizer: str | None = None  # a folder with the served base's tokenizer (lm_eval tasks)
    n: int = 1  # samples per prompt: 1 = greedy accuracy; n > 1: pass@k and avg@n
    k: list[int] = field(default_factory=lambda: [1])
    temperature: float = 1.0  # sampling (n > 1)
    top_p: float = 1.0
    pass_threshold: float = 1.0  # a sample passes when its verifier score reaches this
    max_new_tokens: int = 32
    batch_size: int = 64  # rows generated together
    seed: int = 0
    limit: int | None = None  # the first N held-out examples of each task
    system_prompt: str | None = None  # None: the task's data.system_prompt
    prompt_field: str = "prompt"  # jsonl:PATH tasks
    answer_field: str = "answer"
    verifier: str = "accuracy"  # the reward that scores jsonl:PATH tasks
    lm_eval_include: list[str] = field(default_factory=list)  # folders of task YAMLs
    lm_eval_builtin: bool = True  # the harness's own tasks too (false: only the folders')
    num_fewshot: int | None = None  # lm_eval tasks; None: each task's own
    root: str = "runs"  # the results store: <root>/results.sqlite
    force: bool = False  # evaluate again what the store already holds
