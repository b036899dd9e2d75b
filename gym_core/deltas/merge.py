"""A run's delta and its rebuild, one path for every program, and a finished run's files.

The two functions every program uses for a run's weights:

- :func:`run_delta` builds a run's delta (trained - base, fp32, keyed like the plain
  model): the run quantizes it, ``python -m gym_core.export`` writes it exactly;
- :func:`rebuild` rebuilds base + delta as one plain model: the run scores its quantized
  delta with it (and quantizers calibrate against the same base), export and evaluation
  scripts load a run's delta file with it (:func:`load_merged`); a soup's delta is applied
  the same way. The server applies deltas to activations instead (``operators``).

A run loads its base model once: under a LoRA policy the base is the policy's own frozen
weights (:func:`lora_base`, nothing copied), under a full fine-tune its frozen reference
copy, after ``model.init`` a copy kept before the earlier runs were applied
(:class:`gym_core.train.job.RunBase`); a rebuilt model shares every weight the delta does
not change with that base, so it costs the changed matrices only.

A finished run's trained model as one plain model: base + the LoRA adapter in ``final/``
(exact), or base + the quantized delta in ``delta/`` (what the quantizer kept). Used by
``python -m gym_core.export``; anything else that needs the run's model (serving,
evaluation scripts) opens it the same way:

    run = TrainedRun.open("runs/first")                  # checks the files; no torch
    model, tokenizer = load_merged(run, "final", plugins)  # one plain model, fp32
    base, tokenizer = base_model(run)                     # or the base alone, and
    policy = load_adapter(run, base)                      # the adapter on it, unmerged

Opening a run checks its files and imports no torch; loading merges in fp32, because a
small delta added to bf16 weights is lost to rounding (bf16 keeps 8 bits of mantissa).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from gym_core.base.errors import GymError

SOURCES = ("final", "delta")


def run_delta(trained, base=None) -> dict:
    """A run's delta: the trained weights minus the base's, fp32 on the CPU, keyed like the
    plain model's parameters ("model.layers.0.self_attn.q_proj.weight"), for every weight
    that changed.

    ``trained`` is the policy's model: a peft LoRA model or a plain one. ``base`` is the
    base model (plain); leave it out for a LoRA model whose frozen weights are the base
    itself (a run without ``model.init``): then the delta is each LoRA layer's
    B @ A * scaling, exact, and no base weights are read."""
    from gym_core.deltas.delta import lora_delta, state_delta

    if base is None:
        return lora_delta(trained)
    return state_delta(plain_state(trained), dict(base.named_parameters()))


def rebuild(base, delta: dict, *, share: bool = True):
    """``base`` + ``delta`` as one plain model in eval mode: each weight the delta has
    becomes W + d, added in fp32 and cast once to W's dtype (a tiny delta added to bf16
    weights would be lost, docs/algorithms.md §10).

    ``share=True``: a new model whose changed weights are new tensors and whose other
    weights *are* the base's (nothing copied: modify neither while both are in use);
    ``share=False``: ``base`` itself is changed and returned. A delta that does not fit
    the model raises :class:`GymError` naming the weight."""
    import torch

    from gym_core.deltas.delta import apply_delta

    if not share:
        apply_delta(base, delta)
        return base.eval()
    model = sharing_copy(base)
    params = dict(base.named_parameters())
    where: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                where.setdefault(id(p), []).append((module, name))
    with torch.no_grad():
        for key, d in delta.items():
            p = params.get(key)
            if p is None:
                raise GymError(f"the delta has '{key}', which this model does not have")
            if p.shape != d.shape:
                raise GymError(f"delta '{key}' has shape {tuple(d.shape)}, the model "
                               f"{tuple(p.shape)}")
            new = torch.nn.Parameter((p.float() + d.to(p.device)).to(p.dtype),
                                     requires_grad=False)
            for module, name in where[id(p)]:  # tied weights: every place that holds it
                module._parameters[name] = new
    return model.eval()


def sharing_copy(model):
    """A copy of ``model``'s modules that holds the very same parameter and buffer tensors
    (no weights copied): its own module objects, so replacing a weight or calling
    ``torch.func.functional_call`` on the copy leaves ``model`` alone."""
    import copy
    import itertools

    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def lora_base(peft_model):
    """The plain base model under a LoRA model, sharing its frozen weights (nothing loaded
    or copied): each LoRA layer replaced by the layer it wraps, the adapters left out.
    ``peft_model`` is not changed."""
    return sharing_copy(peft_model).unload().eval()


def plain_state(model) -> dict:
    """A model's weights as one plain model's (fp32, on the CPU, keyed like the base
    model's parameters): a LoRA model's base weights with its adapters' delta added,
    without changing it."""
    from gym_core.deltas.delta import base_key, lora_delta

    if not any("lora_" in n for n, _ in model.named_parameters()):
        return {n: p.detach().float().cpu() for n, p in model.named_parameters()}
    state = {base_key(n): p.detach().float().cpu()
             for n, p in model.named_parameters() if "lora_" not in n}
    for key, d in lora_delta(model).items():
        state[key] = state[key] + d
    return state
CONFIG = Path(".hydra") / "config.yaml"


@dataclass
class TrainedRun:
    """What ``python -m gym_core`` left in ``runs/<name>/``."""

    path: Path
    model: DictConfig  # the run's model settings (model.source, path, lora, ...)
    quant: str  # the quantizer it ran with: its delta is delta/<quant>.safetensors
    lora: bool  # final/ holds a LoRA adapter (False: the full model, model.finetune=full)

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def final(self) -> Path:
        return self.path / "final"

    @classmethod
    def open(cls, path: str | Path) -> TrainedRun:
        """Check the run directory and read its config; one-line errors name what is missing."""
        from gym_core.config.schema import ModelConfig

        path = Path(path).expanduser()
        if not path.is_dir():
            raise GymError(
                f"run={path} does not exist or is not a directory; point run= at a run "
                "directory (runs/<run.name>, written by python -m gym_core)"
            )
        config_file = path / CONFIG
        jobs = sorted(p.name for p in path.iterdir() if (p / CONFIG).is_file())
        if not config_file.is_file() and jobs:
            raise GymError(f"run={path} is a sweep; name one of its jobs: run={path / jobs[0]} "
                           f"(jobs: {', '.join(jobs)})")
        if not config_file.is_file():
            raise GymError(
                f"{config_file} is missing: it records the run's model settings (python -m "
                "gym_core writes it). For a run made with run_job(), save its config there: "
                "OmegaConf.save(cfg, run_dir / '.hydra/config.yaml')"
            )
        try:
            raw = OmegaConf.load(config_file)
            model = OmegaConf.merge(OmegaConf.structured(ModelConfig), raw.model)
        except Exception as exc:
            raise GymError(f"{config_file} has no readable 'model' section: "
                           f"{str(exc).splitlines()[0]}") from None
        quant = OmegaConf.select(raw, "quant.name", default="none")
        final = path / "final"
        if (final / "adapter_config.json").is_file():
            lora = True
        elif (final / "config.json").is_file():
            lora = False
        else:
            raise GymError(
                f"{final} holds neither a LoRA adapter (adapter_config.json) nor a model "
                "(config.json): the run has not finished training. Finish it by running the "
                "same run.name again (it resumes from its last checkpoint)"
            )
        return cls(path=path, model=model, quant=str(quant), lora=lora)

    def delta_file(self) -> Path:
        """``delta/<quant>.safetensors``, the quantized delta the run wrote."""
        if self.quant == "none":
            raise GymError(
                f"the run {self.path} ran with quant=none, so it wrote no delta; use "
                "source=final, or train with quant=bitdelta / quant=deltaquant"
            )
        file = self.path / "delta" / f"{self.quant}.safetensors"
        if not file.is_file():
            raise GymError(
                f"{file} does not exist (the run's config says quant={self.quant}): the run "
                "stopped before writing it; run the same run.name again, or use source=final"
            )
        return file

    def base_path(self) -> Path | None:
        """The folder holding the base model's weights, or None when the base is built in
        code (model=tiny)."""
        from gym_core.model.policy import smollm2_folder

        if self.model.source == "smollm2":
            return smollm2_folder(self.model.cache_dir).resolve()
        if self.model.source == "local":
            return Path(self.model.path).expanduser().resolve()
        return None


def _fp32(model_cfg: DictConfig) -> DictConfig:
    cfg = OmegaConf.create(OmegaConf.to_container(model_cfg))
    cfg.dtype = "float32"
    return cfg


def base_model(run: TrainedRun):
    """The run's base model (fp32, eval mode) and tokenizer."""
    from gym_core.model.policy import load_base as load

    return load(_fp32(run.model))


def start_model(run: TrainedRun):
    """The model the run's training started from (fp32, eval mode) and tokenizer: its base
    model, or for a run started from an earlier one (``model.init``) that run's result,
    rebuilt from the chain its ``final/gym.json`` records (gym_core.model.stages)."""
    from gym_core.model.policy import apply_stages
    from gym_core.model.stages import recorded_chain

    model, tok = base_model(run)
    chain = recorded_chain(run.final)
    if chain:
        model = apply_stages(model, chain).eval()
    return model, tok


def load_tokenizer(run: TrainedRun):
    """The tokenizer the run trained with (saved in final/)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(run.final)
    except (OSError, ValueError) as exc:
        raise GymError(f"could not read the tokenizer in {run.final}: {exc}") from None


def load_adapter(run: TrainedRun, base):
    """``base`` with the run's LoRA adapter attached (a peft model, not merged): the
    policy as the run trained it."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, run.final)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise GymError(f"could not apply the adapter in {run.final} to the run's base model "
                       f"({describe(run)}): {str(exc).splitlines()[0]}") from None


def load_full(run: TrainedRun):
    """The fully fine-tuned model saved in final/ (model.finetune=full), fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(run.final, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise GymError(f"could not load the model in {run.final}: {exc}") from None


def describe(run: TrainedRun) -> str:
    from gym_core.model.policy import describe as describe_model

    return describe_model(run.model)


def load_merged(run: TrainedRun, source: str, plugins):
    """The run's trained model as one plain ``PreTrainedModel`` (fp32, eval mode) and its
    tokenizer. ``source="final"``: base + the adapter merged (or the full fine-tuned model);
    ``source="delta"``: base + the dequantized delta file."""
    if source not in SOURCES:
        raise GymError(f"source={source!r} is not one of {', '.join(SOURCES)}")
    if source == "delta":
        file = run.delta_file()
        delta = read_run_delta(file, plugins)
        model, _ = base_model(run)
        try:
            model = rebuild(model, delta, share=False)  # the base is ours alone: in place
        except GymError as exc:
            raise GymError(f"{file} does not fit the run's base model: {exc}") from None
    elif run.lora:
        # W + B A * alpha / r per layer, added to the fp32 weights of the model the run
        # started from (its base, or an earlier run's result)
        from gym_core.model.policy import merge_adapter

        model = merge_adapter(start_model(run)[0], run.final)
    else:
        model = load_full(run)
    model.eval()
    return model, load_tokenizer(run)


def read_run_delta(file: Path, plugins):
    """The fp32 delta in a run's delta file; a file its quantizer cannot decode is a
    one-line error naming it."""
    from gym_core.deltas.delta import read_delta

    try:
        return read_delta(file, plugins)
    except GymError:
        raise
    except Exception as exc:
        raise GymError(f"{file} could not be decoded ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''}); the file is damaged: "
                       "write it again by running the same run.name (with its quant=)") from None


def exact_delta(run: TrainedRun):
    """The run's exact fp32 weight delta (trained - base), keyed like the plain model's
    parameters: B @ A * scaling per LoRA layer, or every changed weight (full fine-tuning).
    For a run started from an earlier one, against the original base too (earlier stages
    included), as the run's own quantized delta is."""
    from gym_core.model.stages import recorded_chain

    base, _ = base_model(run)
    chain = recorded_chain(run.final)
    if run.lora and not chain:
        return run_delta(load_adapter(run, base))
    if run.lora:
        import copy

        from gym_core.model.policy import apply_stages, merge_adapter

        # the start model from a copy of the base already loaded (stages change it in place)
        start = apply_stages(copy.deepcopy(base), chain)
        fine = merge_adapter(start, run.final)
    else:
        fine = load_full(run)
    return run_delta(fine, base)
