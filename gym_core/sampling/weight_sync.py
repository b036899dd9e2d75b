"""Weight sync from the trainer to rollout workers, in the codec ``rollout.weight_sync``
names (docs/scale.md "Weight sync"):

- ``full``: every weight of the policy as one plain model (fp32, base and adapter merged),
  what a framework without deltas sends;
- ``lora``: the LoRA adapter's A and B matrices only (LoRA runs); the worker adds
  ``scale * B @ A`` to the base weights it kept;
- ``int8`` / ``deltaquant`` / ``bitdelta``: the change since the worker's last copy, packed
  by gym's own delta quantizers (8-bit per-row integers; DeltaQuant at its config's
  defaults; BitDelta: one sign bit a weight and a scale a matrix).

The packed codecs carry their error forward: the trainer keeps a mirror of the weights the
worker holds (what it rebuilt from the packed deltas, not what was meant), and the next
delta is taken against that mirror, so quantisation error never accumulates: whatever a
sync left out, the next one sends. The worker's weights track the trainer's within one
sync's quantisation error.

Messages are plain dicts of tensors (what Ray's object store serialises without copies);
:func:`message_bytes` is the size a sync moves.
"""

from __future__ import annotations

import typing
from typing import Any

import torch

from gym_core.base.errors import GymError
from gym_core.config.schema import WeightSync

CODECS = typing.get_args(WeightSync)  # declared once, in the config schema
#: the packed codecs: quantizer option and its settings
PACKED = {"int8": ("deltaquant", {"bits": 8, "mode": "kbit"}),
          "deltaquant": ("deltaquant", {}), "bitdelta": ("bitdelta", {})}


def message_bytes(message: dict[str, Any]) -> int:
    """Bytes of the tensors a sync message carries (what crosses the object store)."""
    return _bytes(message)


def _bytes(v) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, dict):
        return sum(_bytes(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return sum(_bytes(x) for x in v)
    if hasattr(v, "tensors"):  # a PackedDelta
        return _bytes(v.tensors)
    return 0


def _quantizer(codec: str, plugins):
    from omegaconf import OmegaConf

    name, settings = PACKED[codec]
    comp = plugins.component("quant", name)
    cfg = OmegaConf.merge(OmegaConf.structured(comp.config), settings)
    return comp.load()(cfg)


def adapter_state(policy) -> dict[str, Any]:
    """A LoRA policy's adapter as plain tensors keyed by the base weight they change:
    ``{key: (A, B, scale)}``."""
    out: dict[str, Any] = {}
    from gym_core.deltas.delta import base_key

    for name, module in policy.model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            a = module.lora_A["default"].weight.detach().float().cpu().clone()
            b = module.lora_B["default"].weight.detach().float().cpu().clone()
            scale = float(module.scaling["default"])
            out[base_key(f"{name}.weight")] = (a, b, scale)
    return out


class Sender:
    """The trainer's side: turns the policy's weights into sync messages."""

    def __init__(self, codec: str, policy, plugins=None) -> None:
        if codec not in CODECS:
            raise GymError(f"rollout.weight_sync={codec!r} is not one of {', '.join(CODECS)}")
        if codec == "lora" and not policy.lora:
            raise GymError("rollout.weight_sync=lora needs a LoRA policy (model.finetune=lora); "
                           "use full, int8, deltaquant or bitdelta")
        self.codec, self.policy = codec, policy
        self.quantizer = _quantizer(codec, plugins) if codec in PACKED else None
        self.mirror: dict[str, torch.Tensor] | None = None  # what the workers hold

    def initial(self) -> dict[str, Any]:
        """The first message: the full weights (workers start from them), and the mirror."""
        from gym_core.deltas.merge import plain_state

        if self.codec == "lora":  # the base weights once, then adapters on top of them
            from gym_core.deltas.delta import base_key

            self.start = {base_key(n): p.detach().float().cpu().clone()
                          for n, p in self.policy.model.named_parameters() if "lora_" not in n}
            return {"kind": "lora", "base": self.start, "adapter": adapter_state(self.policy)}
        state = plain_state(self.policy.model)
        if self.quantizer is not None:
            self.mirror = {k: v.clone() for k, v in state.items()}
        return {"kind": "full", "state": state}

    def full_now(self) -> list[dict[str, Any]]:
        """The messages that bring a new worker to what the others hold now."""
        if self.codec == "full":
            return [self.update()]
        if self.codec == "lora":
            return [{"kind": "lora", "base": self.start, "adapter": adapter_state(self.policy)}]
        return [{"kind": "full", "state": {k: v.clone() for k, v in self.mirror.items()}}]

    def update(self) -> dict[str, Any]:
        """The message that brings a worker from its last copy to the current weights."""
        from gym_core.deltas.merge import plain_state

        if self.codec == "full":
            return {"kind": "full", "state": plain_state(self.policy.model)}
        if self.codec == "lora":
            return {"kind": "lora", "adapter": adapter_state(self.policy)}
        if self.mirror is None:
            raise GymError("weight sync: the first message must be initial()")
        state = plain_state(self.policy.model)
        delta = {k: state[k] - self.mirror[k] for k in state
                 if state[k].dim() == 2 and not torch.equal(state[k], self.mirror[k])}
        # vectors (norms, biases) are small: sent exactly
        exact = {k: state[k] for k in state
                 if state[k].dim() != 2 and not torch.equal(state[k], self.mirror[k])}
        packed = self.quantizer.quantize(delta) if delta else None
        restored = self.quantizer.dequantize(packed) if packed is not None else {}
        for k, d in restored.items():
            self.mirror[k] += d.to(self.mirror[k].dtype)
        for k, v in exact.items():
            self.mirror[k] = v.clone()
        return {"kind": "packed", "codec": self.codec, "packed": packed, "exact": exact}


class Receiver:
    """The worker's side: applies sync messages to its plain (merged) model."""

    def __init__(self, model: torch.nn.Module, plugins=None) -> None:
        self.model = model
        self.plugins = plugins
        self.base: dict[str, torch.Tensor] | None = None  # for lora messages
        self._quantizers: dict[str, Any] = {}

    @torch.no_grad()
    def apply(self, message: dict[str, Any]) -> None:
        params = dict(self.model.named_parameters())
        kind = message["kind"]
        if kind == "full":
            state = message["state"]
            missing = [k for k in state if k not in params]
            if missing:
                raise GymError(f"weight sync: the worker's model has no weights {missing[:3]}")
            for k, v in state.items():
                params[k].copy_(v)
            self.base = None
        elif kind == "lora":
            if "base" in message:  # the first sync: the base weights, kept for the adapters
                for k, v in message["base"].items():
                    params[k].copy_(v)
                self.base = {k: message["base"][k].clone() for k in message["adapter"]}
            if self.base is None:
                raise GymError("weight sync: an adapter came before the base weights")
            for k, (a, b, scale) in message["adapter"].items():
                params[k].copy_(self.base[k] + scale * (b @ a))
        elif kind == "packed":
            codec = message["codec"]
            if codec not in self._quantizers:
                self._quantizers[codec] = _quantizer(codec, self.plugins)
            if message["packed"] is not None:
                for k, d in self._quantizers[codec].dequantize(message["packed"]).items():
                    params[k].add_(d.to(params[k].dtype))
            for k, v in message["exact"].items():
                params[k].copy_(v)
        else:
            raise GymError(f"weight sync: unknown message kind {kind!r}")
