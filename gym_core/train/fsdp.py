"""``trainer.strategy=fsdp``: the policy sharded over the ranks with PyTorch FSDP2
(``torch.distributed.fsdp.fully_shard``), under torchrun or ``trainer.backend=ray``.

What is sharded: each decoder layer (the model's ``_no_split_modules`` classes, as
accelerate wraps them) is one FSDP unit, and the root unit is the policy's
:class:`~gym_core.model.policy.LogprobScorer` (embeddings, final norm, LM head, the heads of
:meth:`~gym_core.model.policy.Policy.add_head`). Every weight is sharded, a LoRA run's frozen
base too; each rank keeps 1/world of each weight, its gradient and its AdamW state, and
gathers one layer at a time for a forward or backward pass. Every pass goes through the
root scorer (``policy.logprobs``), which is where FSDP gathers the root's weights. A full
fine-tune's frozen reference copy is sharded the same way, as a root of its own.

Where the full weights are needed (sampling rollouts, evaluation during training, the
end of training) every rank gathers them together (``get_model_state_dict`` with
``full_state_dict=True``) into a plain copy of the model, kept with its weights on the
meta device in between (:meth:`Sharded.full_model`); the sampler then runs on a plain
module with no FSDP hooks, so ranks that finish sampling at different steps never wait on
each other. Checkpoints are gym's own format: the full trainable weights and the full
optimizer state (``get_optimizer_state_dict``, keyed by parameter index as
``optimizer.state_dict()`` keys it) gathered to rank 0, which writes them; a resume
shards them again. So an FSDP checkpoint resumes under FSDP, DDP or one process, and
export, serve and eval read it like any other (docs/scale.md "FSDP").
"""

from __future__ import annotations

import contextlib
import copy

import torch

from gym_core.base.errors import GymError


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules FSDP shards one by one: those of the classes the model lists as
    ``_no_split_modules`` (Hugging Face's decoder layers), outermost only."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(hf, "_no_split_modules", None) or ())
    found: list[torch.nn.Module] = []
    for module in model.modules():
        if type(module).__name__ in names and not any(
                module in set(f.modules()) for f in found):
            found.append(module)
    return found


def _meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``module`` whose parameters are on the meta device (no memory),
    buffers copied (rotary tables are not in the state dict)."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"),
                                      requires_grad=p.requires_grad)
            for p in module.parameters()}
    return copy.deepcopy(module, memo)


def _to_meta(module: torch.nn.Module) -> None:
    """Drop the weights of a copy filled by :meth:`Sharded.full_model` (meta again)."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.device.type != "meta":
                m._parameters[name] = torch.nn.Parameter(
                    torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


class Sharded:
    """The sharded scorer and a meta-device copy of it for the full weights."""

    def __init__(self, scorer: torch.nn.Module, skeleton: torch.nn.Module,
                 reference: torch.nn.Module | None = None):
        self.scorer, self.skeleton, self.reference = scorer, skeleton, reference
        # tied weights (embeddings and LM head): [(module, name)] sharing one parameter,
        # tied again after each fill (loading by name gives each its own tensor)
        shared: dict[int, list[tuple[torch.nn.Module, str]]] = {}
        for m in skeleton.modules():
            for name, p in m._parameters.items():
                if p is not None:
                    shared.setdefault(id(p), []).append((m, name))
        self.tied = [places for places in shared.values() if len(places) > 1]

    @classmethod
    def shard(cls, scorer: torch.nn.Module, device: torch.device,
              reference: torch.nn.Module | None = None) -> Sharded:
        """Shard ``scorer`` (a LogprobScorer: ``.model`` and ``.heads``) in place, and
        ``reference`` (a LogprobScorer of a full fine-tune's frozen reference copy) the
        same way."""
        from torch.distributed.fsdp import fully_shard

        layers = decoder_layers(scorer.model)
        if not layers:
            raise GymError(
                f"trainer.strategy=fsdp: {type(scorer.model).__name__} names no decoder "
                "layers to shard (no _no_split_modules); use trainer.strategy=ddp")
        skeleton = _meta_copy(scorer)
        for module in [scorer] if reference is None else [scorer, reference]:
            for layer in decoder_layers(module.model):
                fully_shard(layer)
            fully_shard(module)
        held = sum(local(p).numel() for p in scorer.parameters())
        total = sum(p.numel() for p in scorer.parameters())
        print(f"gym: trainer.strategy=fsdp: rank {torch.distributed.get_rank()} holds "
              f"{held} of the {total} weights ({len(layers)} decoder layers and the root "
              "sharded)", flush=True)
        return cls(scorer, skeleton, reference)

    def score_reference(self, *args, **kw):
        """Log-probs under the sharded reference copy (no gradients), its root's weights
        freed again after the pass (no backward pass would free them)."""
        with torch.no_grad():
            try:
                return self.reference(*args, **kw)
            finally:
                self.reference.reshard()

    # --- full weights -------------------------------------------------------------------
    def _fill(self) -> torch.nn.Module:
        """Every rank: the full weights gathered into the skeleton (returned)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(self.scorer, options=_options())
        missing, unexpected = self.skeleton.load_state_dict(state, strict=False, assign=True)
        for (first, name), *rest in self.tied:
            for m, n in rest:
                m._parameters[n] = first._parameters[name]
        left = [n for n, p in self.skeleton.named_parameters() if p.device.type == "meta"]
        if left or unexpected:
            raise GymError(f"trainer.strategy=fsdp: gathering the full weights left {left[:3]} "
                           f"unset (unexpected {list(unexpected)[:3]})")
        return self.skeleton

    @contextlib.contextmanager
    def full_model(self):
        """A collective: every rank gets a plain model with the full current weights, for
        sampling or evaluation, freed again at the end."""
        try:
            yield self._fill().model
        finally:
            _to_meta(self.skeleton)

    def gather(self) -> torch.nn.Module:
        """A collective at the end of training: the plain scorer with the full weights,
        which replaces the sharded one (evaluation, export, quantization read it)."""
        return self._fill()

    # --- checkpoints --------------------------------------------------------------------
    def trainable_state(self, heads_prefix: str) -> dict[str, torch.Tensor] | None:
        """A collective: the full trainable weights on rank 0 (CPU), named as
        :func:`gym_core.train.checkpoint.trainable_state` names them; None on the others."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(self.scorer, options=_options(
            cpu_offload=True, ignore_frozen_params=True))
        if torch.distributed.get_rank() != 0:
            return None
        trainable = {n for n, p in self.scorer.named_parameters() if p.requires_grad}
        return {self._checkpoint_name(n, heads_prefix): t.detach().contiguous()
                for n, t in state.items() if n in trainable}

    @staticmethod
    def _checkpoint_name(fqn: str, heads_prefix: str) -> str:
        head, _, rest = fqn.partition(".")
        return heads_prefix + rest if head == "heads" else rest

    def load_trainable(self, weights: dict[str, torch.Tensor], heads_prefix: str) -> None:
        """Every rank: the full trainable weights of a checkpoint, sharded into place."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        named = {("heads." + n[len(heads_prefix):]) if n.startswith(heads_prefix)
                 else "model." + n: t for n, t in weights.items()}
        set_model_state_dict(self.scorer, named, options=_options(strict=False))

    def _order(self, optimizer) -> list[str]:
        fqn = {id(p): n for n, p in self.scorer.named_parameters()}
        return [fqn[id(p)] for g in optimizer.param_groups for p in g["params"]]

    def optimizer_state(self, optimizer) -> dict | None:
        """A collective: the full optimizer state on rank 0, in ``optimizer.state_dict()``'s
        layout (keyed by parameter index), so that any strategy resumes it; None on the
        other ranks."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        full = get_optimizer_state_dict(self.scorer, optimizer,
                                        options=_options(cpu_offload=True))
        if torch.distributed.get_rank() != 0:
            return None
        index = {n: i for i, n in enumerate(self._order(optimizer))}
        return {"state": {index[n]: v for n, v in full["state"].items()},
                "param_groups": [{**{k: v for k, v in g.items() if k != "params"},
                                  "params": [index[n] for n in g["params"]]}
                                 for g in full["param_groups"]]}

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        """Every rank: an ``optimizer.state_dict()``-layout state, sharded into place."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        order = self._order(optimizer)
        full = {"state": {order[int(i)]: v for i, v in state["state"].items()},
                "param_groups": [{**{k: v for k, v in g.items() if k != "params"},
                                  "params": [order[int(i)] for i in g["params"]]}
                                 for g in state["param_groups"]]}
        set_optimizer_state_dict(self.scorer, optimizer, full, options=_options())


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded (DTensor) tensor; the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def is_sharded(t: torch.Tensor) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "device_mesh")
