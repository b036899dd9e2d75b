"""A lean decode step for Llama-family models (Llama, Qwen2, Mistral): the sampler's fast path.

Each decode step of a Hugging Face model with a peft adapter runs about 70 Python-level
operations per layer (three matmuls per adapted linear layer, a cache that grows by
concatenation, masks rebuilt every step). Here, once per :func:`gym_core.generation.
generate` call, the adapter is merged into copies of the weights (``W + scale B A``), the
q/k/v and gate/up projections are stacked into one matrix each, and the KV cache is a
preallocated buffer written in place: a layer is about 17 operations, and the matmuls see
the whole batch of rows still running (finished rows leave the batch).

Merging changes rounding (``(W + BA) x`` is not bit for bit ``W x + B(A x)``), so the
sampler is the trained policy up to float32 rounding; :mod:`gym_core.generation` records
the sampler's log-probs so the trainer can measure the mismatch and correct for it
(docs/algorithms.md §3).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

#: model_type values whose decoder layers this module reproduces exactly
ARCHS = ("llama", "qwen2", "mistral")


def _lora_layer_type():
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft is a dependency; a stripped environment just skips merging
        return None
    return LoraLayer


def merged_linear(module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of a linear layer as it acts now, adapters merged in; None for a
    layer this path cannot reproduce (a LoRA variant such as DoRA, a quantized layer)."""
    lora = _lora_layer_type()
    if lora is not None and isinstance(module, lora):
        base = module.get_base_layer()
        if type(base) is not torch.nn.Linear:
            return None
        weight = base.weight
        if not module.disable_adapters and not module.merged:
            deltas = [module.get_delta_weight(a) for a in module.active_adapters
                      if a in module.lora_A]
            if any(a in module.lora_variant for a in module.active_adapters):
                return None
            if deltas:
                weight = weight + sum(deltas)
        return weight, base.bias
    if type(module) is torch.nn.Linear:
        return module.weight, module.bias
    return None


def _stack(parts):
    weights = [w for w, _ in parts]
    biases = [b for _, b in parts]
    weight = torch.cat(weights, 0)
    if all(b is None for b in biases):
        return weight, None
    return weight, torch.cat([b if b is not None else w.new_zeros(w.shape[0])
                              for w, b in parts])


def _mkl_packing() -> bool:
    return (torch.backends.mkl.is_available() and hasattr(torch.ops, "mkl")
            and hasattr(torch.ops.mkl, "_mkl_linear"))


class _Linear:
    """y = x W^T + b. On CPU the weight is also kept in MKL's packed layout for one batch
    size (a decode step's matmuls are small enough that re-packing the weight on every
    call costs more than the product; the packed product is bit for bit F.linear's)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias
        self.packed, self.rows = None, 0

    def pack(self, rows: int) -> None:
        self.packed, self.rows = None, 0
        if self.weight.device.type == "cpu" and self.weight.dtype == torch.float32 \
                and _mkl_packing():
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight, rows)
            self.rows = rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.shape[0] == self.rows:
            return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, self.rows)
        return F.linear(x, self.weight, self.bias)


def _padded(length: int) -> int:
    """Key buffers are stored transposed ([.., d, T]) with T a whole number of 16-float
    vectors, so the kernel's last vector of positions stays inside the buffer."""
    return -(-length // 16) * 16


@dataclass
class _Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    qkv: _Linear
    o: _Linear
    gate_up: _Linear
    down: _Linear


class FusedDecoder:
    """The model's decode step over a preallocated KV cache, for rows that may leave."""

    def __init__(self, hf, layers: list[_Layer], lm_head: _Linear, norm, eps, scaling,
                 n_heads, n_kv, head_dim, inter):
        self.hf, self.layers = hf, layers
        self.lm_head, self.norm, self.eps = lm_head, norm, eps
        self.scaling, self.n_heads, self.n_kv, self.head_dim = scaling, n_heads, n_kv, head_dim
        self.inter = inter
        self.embed = hf.get_input_embeddings().weight
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.ops = kernels() if self.embed.device.type == "cpu" else TorchOps

    @classmethod
    def build(cls, model, total_length: int) -> FusedDecoder | None:
        """The decoder of ``model`` (a plain Hugging Face causal LM or a peft model
        around one) with its adapters merged, or None when the model is not one this
        path reproduces (then the caller uses the model's own forward)."""
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = getattr(hf, "config", None)
        inner = getattr(hf, "model", None)
        if (config is None or config.model_type not in ARCHS or inner is None
                or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb")
                or getattr(config, "hidden_act", None) != "silu"
                or getattr(config, "mlp_bias", False)):
            return None
        window = getattr(config, "sliding_window", None)
        sliding = window is not None and (config.model_type != "qwen2"
                                          or config.use_sliding_window)
        if sliding and total_length > window:
            return None
        head = merged_linear(hf.get_output_embeddings())
        if head is None or any(type(m) is not type(inner.norm) for m in
                               [x.input_layernorm for x in inner.layers]):
            return None
        layers = []
        with torch.no_grad():
            for layer in inner.layers:
                att, mlp = layer.self_attn, layer.mlp
                parts = [merged_linear(m) for m in (att.q_proj, att.k_proj, att.v_proj,
                                                    att.o_proj, mlp.gate_proj, mlp.up_proj,
                                                    mlp.down_proj)]
                if any(p is None for p in parts):
                    return None
                if parts[4][1] is not None or parts[5][1] is not None or parts[6][1] is not None:
                    return None
                layers.append(_Layer(
                    layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                    _Linear(*_stack(parts[:3])), _Linear(*parts[3]),
                    _Linear(torch.cat([parts[4][0], parts[5][0]], 0), None),
                    _Linear(parts[6][0], None)))
        att = inner.layers[0].self_attn
        head_dim = att.head_dim
        return cls(hf, layers, _Linear(*head), inner.norm.weight, inner.norm.variance_epsilon,
                   att.scaling, config.num_attention_heads, config.num_key_value_heads,
                   head_dim, config.intermediate_size)

    def rotary(self, length: int, device) -> None:
        """cos and sin for positions 0..length-1, from the model's own rotary module (so
        any RoPE scaling it applies is kept); sin carries rotate_half's sign."""
        pos = torch.arange(length, device=device).unsqueeze(0)
        probe = self.embed[:1].unsqueeze(0)
        cos, sin = self.hf.model.rotary_emb(probe, pos)
        half = self.head_dim // 2
        self.cos = cos[0]
        # rotate_half(x) * sin == roll(x, half) * cat(-sin[:half], sin[half:]) exactly
        self.sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)

    def load_cache(self, prefill_cache, prompt_mask: torch.Tensor, repeats: int,
                   max_new_tokens: int) -> None:
        """Keep the prompts' KV cache once per prompt (its ``repeats`` rows share it, and
        read it from the CPU's cache one after another) and preallocate each row's own
        cache for ``max_new_tokens`` positions. Keys are stored transposed, [.., d, T]."""
        self.prompt_keys, self.prompt_values, self.keys, self.values = [], [], [], []
        b, _, plen, _ = prefill_cache.layers[0].keys.shape
        self.prompt_len = plen
        self.prompt_bias = torch.zeros(prompt_mask.shape, device=prompt_mask.device).masked_fill(
            prompt_mask == 0, float("-inf"))
        self.group = torch.arange(b, device=prompt_mask.device).repeat_interleave(repeats)
        n, width = b * repeats, _padded(max_new_tokens)
        for layer in prefill_cache.layers:
            k, v = layer.keys, layer.values
            keys = k.new_zeros(b, k.shape[1], k.shape[3], _padded(plen))
            keys[..., :plen] = k.transpose(2, 3)
            self.prompt_keys.append(keys)
            self.prompt_values.append(v.contiguous())
            self.keys.append(k.new_zeros(n, k.shape[1], k.shape[3], width))
            self.values.append(v.new_zeros(n, v.shape[1], width, v.shape[3]))

    def pack(self, rows: int) -> None:
        """Pack every weight for decode steps of ``rows`` rows."""
        for layer in self.layers:
            for lin in (layer.qkv, layer.o, layer.gate_up, layer.down):
                lin.pack(rows)
        self.lm_head.pack(rows)

    def keep_rows(self, index: torch.Tensor) -> None:
        """Drop finished rows from the cache (rows ``index`` stay, in that order) and
        re-pack the weights for the smaller batch."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.group = self.group.index_select(0, index)
        self.pack(index.numel())

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits [n, V] for the next position, given each row's token [n] at position
        ``pos`` (the same for all rows: prompts are left-padded)."""
        ops = self.ops
        x = F.embedding(tokens, self.embed)
        cos, sin = self.cos[pos], self.sin[pos]
        slot = pos - self.prompt_len
        delta = None
        for i, layer in enumerate(self.layers):
            y = ops.rms_norm(x, delta, layer.ln1, self.eps)  # x += delta first
            out = ops.attend(layer.qkv(y), self.prompt_keys[i], self.prompt_values[i],
                             self.prompt_bias, self.group, self.keys[i], self.values[i], slot,
                             cos, sin, self.n_heads, self.scaling)
            y = ops.rms_norm(x, layer.o(out), layer.ln2, self.eps)
            delta = layer.down(ops.silu_mul(layer.gate_up(y)))
        return self.lm_head(ops.rms_norm(x, delta, self.norm, self.eps))


class TorchOps:
    """The decode step's small operations in torch (what decode.cpp computes in one call
    each): the reference the kernels are tested against, and the path where they cannot
    be compiled."""

    @staticmethod
    def rms_norm(x, delta, weight, eps):
        if delta is not None:
            x.add_(delta)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)

    @staticmethod
    def attend(qkv, prompt_keys, prompt_values, prompt_bias, group, keys, values, slot, cos,
               sin, heads, scale):
        n, kv, d, _ = keys.shape
        half = d // 2
        qk = qkv[:, : (heads + kv) * d].view(n, heads + kv, d)
        qk = qk * cos + qk.roll(half, dims=-1) * sin
        keys[:, :, :, slot] = qk[:, heads:]
        values[:, :, slot] = qkv[:, (heads + kv) * d:].view(n, kv, d)
        # one query token: its heads grouped under their key/value head
        q = qk[:, :heads].reshape(n, kv, heads // kv, d)
        plen = prompt_bias.shape[1]
        scores = torch.cat([q @ prompt_keys[group][..., :plen], q @ keys[..., : slot + 1]], -1)
        bias = torch.cat([prompt_bias[group], prompt_bias.new_zeros(n, slot + 1)], -1)
        probs = (scores * scale + bias[:, None, None]).softmax(-1)
        out = probs[..., :plen] @ prompt_values[group] + probs[..., plen:] @ values[:, :, : slot + 1]
        return out.reshape(n, heads * d)

    @staticmethod
    def silu_mul(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def sample(probs, u):
        cdf = probs.cumsum(-1, dtype=torch.float64)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
        # u * total rounded up to the total: the last token with probability
        last = probs.shape[1] - 1 - (probs > 0).flip(-1).int().argmax(-1)
        return torch.where(pick < probs.shape[1], pick, last)


SOURCE = Path(__file__).with_name("decode.cpp")


@functools.cache
def kernels():
    """decode.cpp's operators (compiled once per machine, :mod:`gym_core.native`), or
    :class:`TorchOps` when this machine cannot compile them (a warning says so once)."""
    from gym_core.errors import GymError, warn
    from gym_core.native import isa_flags, load_ops

    isa, _ = isa_flags()
    vec = {"avx512": ("-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"),
           "avx2": ("-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2")}.get(
               isa, ("-DCPU_CAPABILITY=DEFAULT",))
    vec += ("-fopenmp",)
    try:
        load_ops("gym_decode", str(SOURCE), vec)
    except GymError as exc:
        warn(f"sampling without gym's decode kernels, at about half the speed: {exc}")
        return TorchOps
    return torch.ops.gym_decode
