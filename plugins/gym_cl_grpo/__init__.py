"""Training-Free GRPO (Tencent Youtu, arXiv 2510.08191; docs/algorithms.md §8) as a gym
plugin: ``algorithm=cl_grpo``. The weights stay frozen; what is learned is a text
experience library kept in an ``experience_store`` and injected into the prompt, with an
``llm`` summarising trajectories and extracting lessons.

The two families the method needs belong to this plugin, not to the core: it declares
them through ``gym_add_families`` (hook specs in :mod:`gym_cl_grpo.hookspecs`, base
classes in :mod:`gym_cl_grpo.api`), and ``algorithm=cl_grpo`` pulls their config groups
into the run's config (a GRPO run's config has no ``experience_store`` or ``llm``).
Built-in options: ``experience_store=json|sqlite``, ``llm=local|openai|policy`` and
``policy=local|api`` (the model whose answers the library improves: the loaded model,
or any OpenAI-compatible endpoint, the paper's setting).

Cheap to import: config dataclasses and registration hooks only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from omegaconf import MISSING

from gym_cl_grpo import hookspecs
from gym_core.api import DataConfig, OnlineAlgorithmConfig, bounded, hookimpl, one_of

#: where the experience library goes in the prompt
InjectInto = Literal["system", "user"]


@dataclass
class CLGRPOConfig(OnlineAlgorithmConfig):
    """Training-Free GRPO (docs/algorithms.md §8). lr, weight_decay and adam_betas are
    unused: nothing is optimised. One step = one batch of questions
    (trainer.batch_size); epochs over the data are trainer.max_steps * batch_size /
    number of questions."""

    # The method's own config groups, top-level keys of the run's config (Hydra's
    # defaults list: `experience_store=sqlite llm=openai` select other options).
    defaults: list[Any] = field(default_factory=lambda: [
        {"/experience_store@_global_.experience_store": "json"},
        {"/llm@_global_.llm": "local"},
        {"/policy@_global_.policy": "local"},
        "_self_",
    ])
    name: str = "cl_grpo"
    num_generations: int = 5  # G rollouts per question (§8.1: 5)
    temperature: float = 0.7  # rollout temperature (§8.1: 0.7)
    max_completion_length: int = 64
    # the experience library rides in the prompt (inject_into): room for a large one
    max_prompt_length: int = 4096
    # lessons extracted per question (main-branch default 2)
    lessons_per_group: int = bounded(2, ge=1)
    # lessons are asked to be at most 32 words (§8.2); longer ones are rejected
    max_experience_words: int = bounded(64, ge=1)
    # where the library goes: "system" (main branch: appended to the system
    # instructions) or "user" (preview: after the problem in the user turn)
    inject_into: str = one_of(InjectInto, "system")
    # tokens of one trajectory summary (None: llm.max_new_tokens); G of them go into one
    # group-comparison prompt, so this bounds its length
    summary_max_new_tokens: int | None = bounded(None, ge=1)
    # the paper's options (docs/algorithms.md §8): the summaries and the group comparison
    # see the reference answer (True), or only the rewards (False)
    use_groundtruth: bool = True
    # at most this many operations per group update reply are applied (the paper's
    # semantic_max_operations); the structured schema asks for no more
    max_operations: int = bounded(3, ge=1)
    # a folder of prompt templates replacing the built-in ones, one file per stage:
    # solve.txt, summary.txt, group_comparison.txt, batch_update.txt (gym_cl_grpo/prompts.py
    # names each file's {placeholders}); missing files keep the built-in template
    prompts_dir: str | None = None
    # a library in the paper's {"G0": "...", ...} format to start from (imported as the
    # library's step 1 when it has no steps yet; a library with steps is kept as it is)
    library_init: str | None = None
    # the run's API budget over every endpoint (policy and llm; None: no limit). At a
    # step's end the run stops, with a checkpoint, when another step like the last one
    # would not fit; no request leaves once it is spent. Raise it and rerun to resume.
    max_api_tokens: int | None = bounded(None, ge=0)
    max_api_cost: float | None = bounded(None, ge=0)  # USD, priced with each endpoint's prices


# ----------------------------------------------------------------------------------------
# experience_store: the family's base schema and the built-in stores
# ----------------------------------------------------------------------------------------


@dataclass
class ExperienceStoreConfig:
    """Base of every ``experience_store=<name>`` option."""

    name: str = MISSING


@dataclass
class JsonStoreConfig(ExperienceStoreConfig):
    """One JSON file, replaced atomically, a snapshot per step; for one run at a time
    (use sqlite to share a library)."""

    name: str = "json"
    # None: <run_dir>/experiences/library.json; snapshots beside it in library.json.steps/
    path: str | None = None


@dataclass
class SqliteStoreConfig(ExperienceStoreConfig):
    """One SQLite database (WAL mode, one transaction per batch) that several runs (a
    multirun sweep) may share."""

    name: str = "sqlite"
    path: str | None = None  # None: <run_dir>/experiences/library.sqlite
    # how long a writer waits for another's transaction
    busy_timeout_s: float = bounded(60.0, gt=0)


# ----------------------------------------------------------------------------------------
# llm: the chat model the method calls for its own reasoning
# ----------------------------------------------------------------------------------------


@dataclass
class LLMConfig:
    """Base of every ``llm=<name>`` option."""

    name: str = MISSING
    max_new_tokens: int = bounded(512, ge=1)
    temperature: float = bounded(0.7, ge=0, hint="0: greedy")


@dataclass
class LocalLLMConfig(LLMConfig):
    """The policy model itself, through the core's generation code (works offline)."""

    name: str = "local"
    batch_size: int = bounded(8, ge=1)  # conversations per generate call
    # constrained decoding (gym_core.sampling.structured): the lesson and operation
    # replies follow their JSON schemas, so even a small model writes valid operations
    structured: bool = True


@dataclass
class OpenAIChatConfig(LLMConfig):
    """Any OpenAI-compatible chat-completions endpoint (OpenAI, DeepSeek, vLLM, llama.cpp
    server, ``python -m gym_core.serve``, ...). The API key is read from the environment
    variable *named* by ``api_key_env``: only that name is in the config, so the key
    never lands in a config dump or a log."""

    name: str = "openai"
    base_url: str = "https://api.openai.com/v1"  # .../chat/completions is appended
    model: str = MISSING  # e.g. gpt-4o-mini, deepseek-chat
    api_key_env: str = "OPENAI_API_KEY"  # the NAME of the variable holding the key
    timeout_s: float = bounded(120.0, gt=0)  # per request
    max_retries: int = bounded(5, ge=0)  # on 429, 5xx and connection errors
    # first wait; doubles each retry (Retry-After wins on 429)
    backoff_s: float = bounded(1.0, ge=0)
    max_backoff_s: float = bounded(60.0, ge=0)
    concurrency: int = bounded(8, ge=1)  # requests in flight at once
    # USD per million tokens, this endpoint's model (charged from each reply's usage)
    input_price: float = bounded(0.0, ge=0)
    output_price: float = bounded(0.0, ge=0)
    # ask for JSON replies that follow the stage's schema (OpenAI response_format
    # json_schema; gym_core.serve enforces it by constrained decoding)
    structured: bool = True


@dataclass
class SamePolicyLLMConfig(LLMConfig):
    """The policy's own endpoint (``policy=api``) or model (``policy=local``) reflects
    too, as in the paper (one model acts and reflects); its generation settings here,
    its endpoint, key, prices and budget the policy's."""

    name: str = "policy"
    structured: bool = True


# ----------------------------------------------------------------------------------------
# policy: the model whose answers the library improves
# ----------------------------------------------------------------------------------------


@dataclass
class PolicyConfig:
    """Base of every ``policy=<name>`` option."""

    name: str = MISSING


@dataclass
class LocalPolicyConfig(PolicyConfig):
    """The model gym loaded (``model=...``), sampled by the core's rollout engine."""

    name: str = "local"


@dataclass
class ApiPolicyConfig(OpenAIChatConfig):
    """An OpenAI-compatible endpoint answers the rollouts (``algorithm.num_generations``
    requests per question at ``algorithm.temperature``, at most
    ``algorithm.max_completion_length`` tokens) and the held-out questions (greedy,
    ``trainer.eval_max_new_tokens``). ``max_new_tokens`` / ``temperature`` here are
    used only when ``llm=policy`` reflects through it."""

    name: str = "api"
    structured: bool = False  # the policy answers in free text


# ----------------------------------------------------------------------------------------
# the paper's math domain (gym_cl_grpo/math.py)
# ----------------------------------------------------------------------------------------


@dataclass
class AimeConfig(DataConfig):
    """AIME-format problems from local files (JSONL, or a JSON list): ``problem`` (or
    ``question``) and ``answer`` per row; scored by ``math_verify`` on ``\\boxed{}``."""

    name: str = "aime"
    train_file: str = MISSING
    test_file: str | None = None  # None: hold out test_fraction of train_file
    test_fraction: float = bounded(0.2, gt=0, lt=1)


@hookimpl
def gym_add_datasets(registry):
    registry.add("aime", AimeConfig, "gym_cl_grpo.math:aime_task")


@hookimpl
def gym_add_families(families):
    families.add("experience_store", hook="gym_add_experience_stores", specs=hookspecs)
    families.add("llm", hook="gym_add_llms", specs=hookspecs)
    families.add("policy", hook="gym_add_policies", specs=hookspecs)


@hookimpl
def gym_add_algorithms(registry):
    registry.add("cl_grpo", CLGRPOConfig, "gym_cl_grpo.cl_grpo:TrainingFreeGRPO")


@hookimpl
def gym_add_experience_stores(registry):
    registry.add("json", JsonStoreConfig, "gym_cl_grpo.stores.json_store:JsonStore")
    registry.add("sqlite", SqliteStoreConfig, "gym_cl_grpo.stores.sqlite_store:SqliteStore")


@hookimpl
def gym_add_llms(registry):
    registry.add("local", LocalLLMConfig, "gym_cl_grpo.llm:LocalLLM")
    registry.add("openai", OpenAIChatConfig, "gym_cl_grpo.openai_client:OpenAIChat")
    registry.add("policy", SamePolicyLLMConfig, "gym_cl_grpo.llm:SamePolicyLLM")


@hookimpl
def gym_add_policies(registry):
    registry.add("local", LocalPolicyConfig, "gym_cl_grpo.policy:LocalPolicy")
    registry.add("api", ApiPolicyConfig, "gym_cl_grpo.policy:ApiPolicy")
