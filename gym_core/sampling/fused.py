"""A lean prefill and decode step for Llama-family models (Llama, Qwen2, Mistral): the
sampler's fast path.

Each decode step of a Hugging Face model with a peft adapter runs about 70 Python-level
operations per layer (three matmuls per adapted linear layer, a cache that grows by
concatenation, masks rebuilt every step). Here, once per :func:`gym_core.sampling.generation.
generate` call, the adapter is merged into copies of the weights (``W + scale B A``) with
the q/k/v and gate/up projections stacked into one matrix each; the prompts run once and
their KV cache is kept once per prompt, shared by its rows, beside a preallocated cache per
row; everything but the matmuls is one call each to the C++ kernels of decode.cpp
(:class:`TorchOps` is the same in torch), and the matmuls see only the rows still running.

Merging changes rounding (``(W + BA) x`` is not bit for bit ``W x + B(A x)``), so the
sampler is the trained policy up to float32 rounding; :mod:`gym_core.sampling.generation` records
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


def _parts(module):
    """(base weight, bias, [(A, B, scaling) of each active LoRA adapter]) of a linear
    layer as it acts now; None for a layer this path cannot reproduce (a LoRA variant
    such as DoRA, a quantized layer)."""
    lora = _lora_layer_type()
    if lora is not None and isinstance(module, lora):
        base = module.get_base_layer()
        if type(base) is not torch.nn.Linear or getattr(module, "fan_in_fan_out", False):
            return None
        factors = []
        if not module.disable_adapters and not module.merged:
            active = [a for a in module.active_adapters if a in module.lora_A]
            if any(a in module.lora_variant for a in active):
                return None
            factors = [(module.lora_A[a].weight, module.lora_B[a].weight, module.scaling[a])
                       for a in active]
        return base.weight, base.bias, factors
    if type(module) is torch.nn.Linear:
        return module.weight, module.bias, []
    return None


@torch.no_grad()
def merged_linear(*modules) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of linear layers stacked along their outputs, as they act now:
    ``W + scaling B A`` for each active adapter, written once into one new matrix;
    None when a layer is not one this path reproduces."""
    parts = [_parts(m) for m in modules]
    if any(p is None for p in parts):
        return None
    if len(parts) == 1 and not parts[0][2]:  # nothing to merge or stack: the layer's own
        return parts[0][0], parts[0][1]
    weight = parts[0][0].new_empty(sum(p[0].shape[0] for p in parts), parts[0][0].shape[1])
    row = 0
    for w, _, factors in parts:
        out = weight[row: row + w.shape[0]]
        if not factors:
            out.copy_(w)
        for i, (a, b, scaling) in enumerate(factors):
            torch.addmm(w if i == 0 else out, b, a, alpha=scaling, out=out)
        row += w.shape[0]
    if all(p[1] is None for p in parts):
        return weight, None
    return weight, torch.cat([p[1] if p[1] is not None else p[0].new_zeros(p[0].shape[0])
                              for p in parts])


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
        return self.plain(x)

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding over the last dimension; ``sin`` carries rotate_half's sign
    (:meth:`FusedDecoder.rotary`)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


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
                 n_heads, n_kv, head_dim):
        self.hf, self.layers = hf, layers
        self.lm_head, self.norm, self.eps = lm_head, norm, eps
        self.scaling, self.n_heads, self.n_kv, self.head_dim = scaling, n_heads, n_kv, head_dim
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
                parts = [merged_linear(att.q_proj, att.k_proj, att.v_proj),
                         merged_linear(att.o_proj), merged_linear(mlp.gate_proj, mlp.up_proj),
                         merged_linear(mlp.down_proj)]
                if any(p is None for p in parts) or parts[2][1] is not None \
                        or parts[3][1] is not None:
                    return None
                layers.append(_Layer(layer.input_layernorm.weight,
                                     layer.post_attention_layernorm.weight,
                                     *(_Linear(*p) for p in parts)))
        att = inner.layers[0].self_attn
        head_dim = att.head_dim
        return cls(hf, layers, _Linear(*head), inner.norm.weight, inner.norm.variance_epsilon,
                   att.scaling, config.num_attention_heads, config.num_key_value_heads,
                   head_dim)

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

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, repeats: int,
                max_new_tokens: int) -> torch.Tensor:
        """Run the left-padded prompts [B, P] once (positions 0..P-1, as the model's own
        forward numbers them; padding hidden from every real token), keep their KV cache
        once per prompt for its ``repeats`` rows (read one after another, so from the
        CPU's cache) with room for each row's own ``max_new_tokens`` positions, and return
        the logits [B, V] that predict each prompt's first new token. Keys are stored
        transposed, [.., d, T]."""
        ops = self.ops
        b, plen = ids.shape
        h, kv, d = self.n_heads, self.n_kv, self.head_dim
        n, width = b * repeats, _padded(max_new_tokens)
        valid = mask.bool()
        self.prompt_len = plen
        self.prompt_bias = torch.zeros(b, plen, device=ids.device).masked_fill(~valid, float("-inf"))
        self.group = torch.arange(b, device=ids.device).repeat_interleave(repeats)
        # causal, padding keys hidden; a padding query sees itself (its row stays finite)
        eye = torch.eye(plen, dtype=torch.bool, device=ids.device)
        allowed = (valid[:, None, :] | eye) & torch.ones_like(eye).tril()
        cos, sin = self.cos[:plen, None], self.sin[:plen, None]
        self.prompt_keys, self.prompt_values, self.keys, self.values = [], [], [], []
        x = F.embedding(ids, self.embed).reshape(b * plen, -1)
        delta = None
        for layer in self.layers:
            y = ops.rms_norm(x, delta, layer.ln1, self.eps)
            qkv = layer.qkv.plain(y).view(b, plen, h + 2 * kv, d)
            qk = _rotate(qkv[:, :, : h + kv], cos, sin)
            q, k = qk[:, :, :h].transpose(1, 2), qk[:, :, h:].transpose(1, 2)
            v = qkv[:, :, h + kv:].transpose(1, 2)
            keys = k.new_zeros(b, kv, d, _padded(plen))
            keys[..., :plen] = k.transpose(2, 3)
            self.prompt_keys.append(keys)
            self.prompt_values.append(v.contiguous())
            self.keys.append(k.new_zeros(n, kv, d, width))
            self.values.append(v.new_zeros(n, kv, width, d))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None],
                                                 scale=self.scaling, enable_gqa=True)
            out = out.transpose(1, 2).reshape(b * plen, h * d)
            y = ops.rms_norm(x, layer.o.plain(out), layer.ln2, self.eps)
            delta = layer.down.plain(ops.silu_mul(layer.gate_up.plain(y)))
        last = torch.arange(1, b + 1, device=ids.device) * plen - 1
        x = x.index_select(0, last) + delta.index_select(0, last)
        return self.lm_head.plain(ops.rms_norm(x, None, self.norm, self.eps))

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
        qk = _rotate(qkv[:, : (heads + kv) * d].view(n, heads + kv, d), cos, sin)
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
    def draw(logits, u, temperature):
        z = logits / temperature
        top = z.amax(-1, keepdim=True)
        e = (z - top).exp()
        cdf = e.cumsum(-1, dtype=torch.float64)
        total = cdf[:, -1]
        pick = torch.searchsorted(cdf, (u * total).unsqueeze(1), right=True).squeeze(1)
        # u * total rounded up to the total: the last token with mass
        last = e.shape[1] - 1 - (e > 0).flip(-1).int().argmax(-1)
        pick = torch.where(pick < e.shape[1], pick, last)
        logp = (z.gather(1, pick[:, None]) - top).squeeze(1) - total.log().float()
        # NaN or infinite logits: what argmax picks (a NaN first), so the step goes on and
        # the loss reports the NaN
        bad = ~torch.isfinite(total) | (total <= 0)
        pick = torch.where(bad, logits.argmax(-1), pick)
        return pick, logp.masked_fill(bad, float("nan"))


SOURCE = Path(__file__).with_name("decode.cpp")


@functools.cache
def kernels():
    """decode.cpp's operators (compiled once per machine, :mod:`gym_core.base.native`), or
    :class:`TorchOps` when this machine cannot compile them (a warning says so once)."""
    from gym_core.base.errors import GymError, warn
    from gym_core.base.native import isa_flags, load_ops

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
