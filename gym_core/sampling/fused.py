"""gym's one decode engine: a lean prefill and decode step for the architectures of
:data:`ARCHS` (Llama, Qwen2, Mistral, Qwen3), under the sampler (:mod:`gym_core.sampling.
generation`, :mod:`gym_core.sampling.episodes`) and the server (:mod:`gym_core.serve.engine`).

Each decode step of a Hugging Face model with a peft adapter runs about 70 Python-level
operations per layer (three matmuls per adapted linear layer, a cache that grows by
concatenation, masks rebuilt every step). Here, once per :func:`gym_core.sampling.generation.
generate` call, the adapter is merged into copies of the weights (``W + scale B A``) with
the q/k/v and gate/up projections stacked into one matrix each; the prompts run once and
their KV cache is kept once per prompt, shared by its rows, beside a preallocated cache per
row; everything but the matmuls is one call each to the C++ kernels of decode.cpp
(:class:`TorchOps` is the same in torch), and the matmuls see only the rows still running.

One KV-cache layout serves both: per layer, keys ``[rows, kv, d, T]`` (transposed) and
values ``[rows, kv, T, d]``, one row per running sequence, beside an optional shared prefix
(the sampler's prompts, once per prompt for its G rows; empty for the server, whose rows
hold their own prompt). Each row has its own length (``slots``) and rotary position, so
rows can join and leave at any step (:meth:`FusedDecoder.open_rows`). A row may add a
variant's delta to every linear layer (:class:`RowDeltas`: the server's per-row variants),
applied per original layer on the stacked q/k/v and gate/up matrices.

A model outside the table runs on its own Hugging Face forward through one fallback,
:class:`OwnForward`: the same decoder interface (the sampler's prefill / step / keep_rows,
the server's join / advance / leave) over the model's own caches, so the sampler, the
multi-turn episodes and the server each have one loop; :func:`build_decoder` picks, with one
warning per reason.

Merging changes rounding (``(W + BA) x`` is not bit for bit ``W x + B(A x)``), so the
sampler is the trained policy up to float32 rounding; :mod:`gym_core.sampling.generation` records
the sampler's log-probs so the trainer can measure the mismatch and correct for it
(docs/algorithms.md §3).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

#: model_type values whose decoder layers this module reproduces exactly (qwen3: a per-head
#: RMSNorm of q and k before rotary, ``q_norm`` / ``k_norm``)
ARCHS = ("llama", "qwen2", "mistral", "qwen3")

_warned: set[str] = set()


def _outside(reason: str) -> None:
    """Say once per process why a model decodes on its own forward."""
    if reason not in _warned:
        _warned.add(reason)
        from gym_core.base.errors import warn

        warn(f"{reason}: it decodes through its own Hugging Face forward (slower; gym's "
             f"decode engine reproduces {', '.join(ARCHS)})")


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

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 parts: list[tuple[str, int, int]] = ()):
        self.weight, self.bias = weight, bias
        self.packed, self.rows = None, 0
        # (module name, first and last output column): the original layers stacked here,
        # where a row's variant adds its delta
        self.parts = list(parts)

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


class RowDeltas:
    """Per-row variant deltas on linear layers: after ``y = x W^T + b`` for the whole batch,
    each group of rows sharing a variant gets ``x_rows @ D^T`` added, one
    :meth:`~gym_core.deltas.delta.DeltaOperator.add_to` call per operator class. A variant is
    anything with ``ops`` (module name -> operator); rows of the base are in no group and
    cost nothing."""

    def __init__(self):
        self.variants: list = []  # the current pass's groups
        self.groups = None  # RowGroups over the flattened rows of the pass, or None
        # per layer: [(operator class, ops per group, prepared)], kept while the batch's
        # variants stay the same (most decode steps), so steps do not rebuild them
        self._plans: dict[str, list] = {}

    def set(self, variants: list, groups) -> None:
        if len(variants) != len(self.variants) or \
                any(a is not b for a, b in zip(variants, self.variants)):
            self._plans = {}
        self.variants, self.groups = variants, groups

    def set_rows(self, variants: list, spans: list[tuple[int, int]]) -> None:
        """Group the flattened rows by variant: ``spans[i]`` is row i's range of rows,
        ``variants[i]`` its variant (None: the base, in no group)."""
        from gym_core.deltas.delta import RowGroups

        order: dict[int, list[int]] = {}
        chosen: list = []
        for v, span in zip(variants, spans):
            if v is None:
                continue
            if id(v) not in order:
                order[id(v)] = []
                chosen.append(v)
            order[id(v)].extend(range(*span))
        if not chosen:
            self.set([], None)
            return
        idx, offs = [], [0]
        for v in chosen:
            idx += order[id(v)]
            offs.append(len(idx))
        self.set(chosen, RowGroups(torch.tensor(idx, dtype=torch.int32), offs))

    def clear(self) -> None:
        """After a pass: no groups (the plans stay for the next step)."""
        self.groups = None

    def forget(self) -> None:
        self.variants, self.groups, self._plans = [], None, {}

    def _plan(self, key: str) -> list:
        plan = self._plans.get(key)
        if plan is None:
            by_class: dict[type, list] = {}
            for g, variant in enumerate(self.variants):
                op = variant.ops.get(key)
                if op is not None:
                    by_class.setdefault(type(op), [None] * len(self.variants))[g] = op
            plan = self._plans[key] = [(cls, ops, cls.prepare(ops)) for cls, ops in by_class.items()]
        return plan

    def add(self, parts, x: torch.Tensor, y: torch.Tensor) -> None:
        """``y [N, out]`` (fp32, contiguous) += each group's delta of each original layer
        ``(name, first, last column)`` in ``parts``, from ``x [N, in]``."""
        if self.groups is None:
            return
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        for key, lo, hi in parts:
            plan = self._plan(key)
            if not plan:
                continue
            whole = lo == 0 and hi == y.shape[1] and y.dtype == torch.float32 \
                and y.is_contiguous()
            out = y if whole else torch.zeros(y.shape[0], hi - lo, device=y.device)
            for cls, ops, prepared in plan:
                cls.add_to(x, out, self.groups, ops, prepared)
            if not whole:
                y[:, lo:hi] += out.to(y.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding over the last dimension; ``sin`` carries rotate_half's sign
    (:meth:`FusedDecoder.rotary`)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def left_padded(seqs: list[list[int]], pad: int = 0, device=None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as one left-padded batch: ids [B, longest] (``pad`` before each) and
    its mask (1 on the real tokens), so every row ends where its continuation starts."""
    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, x in enumerate(seqs):
        ids[i, width - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[i, width - len(x):] = 1
    return ids.to(device), mask.to(device)


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
    q_norm: torch.Tensor | None = None  # qwen3: per-head RMSNorm weights [d]
    k_norm: torch.Tensor | None = None


def _refers(ref, variant) -> bool:
    """Whether ``ref`` (a weak reference, or None for the base) is ``variant``'s."""
    return ref is None if variant is None else ref is not None and ref() is variant


@dataclass
class _Prefix:
    """A prompt prefix kept by the server (automatic prefix caching, as vLLM's): per layer
    the rotated keys and the values [1, kv, L, d] of ``tokens`` as ``variant`` computes
    them. A prompt that begins with it (under the same variant) joins by copying them
    and running only its own remaining tokens."""

    tokens: tuple[int, ...]
    variant: object  # a weak reference to the variant (None: the base), so a variant
    # removed from the server is not held by its prefixes, and they stop matching
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    valid = None  # every position is seen (:class:`_Past` has rows of their own lengths)

    def of(self, variant) -> bool:
        return _refers(self.variant, variant)

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


@dataclass
class _Past:
    """Rows' own caches a chunk continues (:meth:`FusedDecoder.extend`): per layer keys
    and values [B, kv, L, d], and which of the L positions each row has, ``valid`` [B, L]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    valid: torch.Tensor

    @property
    def length(self) -> int:
        return self.valid.shape[1]


def _common(a: list[int], b: list[int]) -> int:
    """The length of the common prefix of two token lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _stacked(names: dict, *modules, share: bool = False) -> _Linear | None:
    """The layers stacked (:func:`merged_linear`), with each one's name and columns.
    ``share``: plain (unadapted) layers then hold views of the stacked matrix, so the
    weights are in memory once (the server's frozen base)."""
    merged = merged_linear(*modules)
    if merged is None:
        return None
    parts, col = [], 0
    for m in modules:
        out = (m.get_base_layer() if hasattr(m, "get_base_layer") else m).out_features
        parts.append((names[id(m)], col, col + out))
        col += out
    weight, bias = merged
    if share and len(modules) > 1 and all(type(m) is torch.nn.Linear for m in modules):
        with torch.no_grad():
            for m, (_, lo, hi) in zip(modules, parts):
                m.weight.data = weight[lo:hi]
                if m.bias is not None:
                    m.bias.data = bias[lo:hi]
    return _Linear(weight, bias, parts)


def _reason(hf, total_length: int) -> str | None:
    """Why ``hf`` is not one the fused decoder reproduces (None: it is)."""
    config = getattr(hf, "config", None)
    inner = getattr(hf, "model", None)
    kind = getattr(config, "model_type", type(hf).__name__)
    if config is None or kind not in ARCHS:
        return f"model type {kind!r} is not in gym's decode engine"
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return f"this {kind} model has no decoder layers / rotary module where expected"
    if getattr(config, "hidden_act", None) != "silu" or getattr(config, "mlp_bias", False):
        return f"this {kind} model's MLP (activation or bias) is not the engine's"
    window = getattr(config, "sliding_window", None)
    sliding = window is not None and (kind not in ("qwen2", "qwen3") or config.use_sliding_window)
    if sliding and total_length > window:
        return f"this {kind} model's sliding window is shorter than the positions asked for"
    return None


class FusedDecoder:
    """The model's prefill and decode step over preallocated KV caches, for rows that may
    join and leave."""

    #: the sampler compacts the batch when at most this share of its rows is still running:
    #: the weights are packed for one batch size, and a packed product costs about the same
    #: for any number of rows up to it (the weights' memory traffic dominates), so a
    #: finished row stays, fed its EOS, until half the batch has finished
    compact_at = 0.5

    def __init__(self, hf, layers: list[_Layer], lm_head: _Linear, norm, eps, scaling,
                 n_heads, n_kv, head_dim, qk_eps=0.0):
        self.hf, self.layers = hf, layers
        self.lm_head, self.norm, self.eps = lm_head, norm, eps
        self.scaling, self.n_heads, self.n_kv, self.head_dim = scaling, n_heads, n_kv, head_dim
        self.qk_eps = qk_eps
        self.embed = hf.get_input_embeddings().weight
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.deltas = RowDeltas()
        fast = self.embed.device.type == "cpu" and self.embed.dtype == torch.float32
        self.ops = kernels() if fast else TorchOps

    @classmethod
    def build(cls, model, total_length: int, share: bool = False) -> FusedDecoder | None:
        """The decoder of ``model`` (a plain Hugging Face causal LM or a peft model
        around one) with its adapters merged, or None when the model is not one this
        path reproduces (then :func:`build_decoder` takes :class:`OwnForward`; a warning
        says so once per reason). ``share``: the model's own q/k/v and gate/up weights become
        views of the stacked matrices (a frozen model served: its weights held once)."""
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        reason = _reason(hf, total_length)
        decoder = None if reason else cls._of(hf, share)
        if reason is None and decoder is None:
            reason = (f"this {hf.config.model_type} model has a layer the engine cannot merge "
                      "(a LoRA variant such as DoRA, a quantized or biased MLP layer)")
        if reason:
            _outside(reason)
        return decoder

    @classmethod
    def _of(cls, hf, share: bool) -> FusedDecoder | None:
        inner = hf.model
        names = {id(m): name for name, m in hf.named_modules()}
        head = _stacked(names, hf.get_output_embeddings())
        if head is None or any(type(m) is not type(inner.norm) for m in
                               [x.input_layernorm for x in inner.layers]):
            return None
        layers = []
        qk_eps = 0.0
        with torch.no_grad():
            for layer in inner.layers:
                att, mlp = layer.self_attn, layer.mlp
                parts = [_stacked(names, att.q_proj, att.k_proj, att.v_proj, share=share),
                         _stacked(names, att.o_proj),
                         _stacked(names, mlp.gate_proj, mlp.up_proj, share=share),
                         _stacked(names, mlp.down_proj)]
                if any(p is None for p in parts) or parts[2].bias is not None \
                        or parts[3].bias is not None:
                    return None
                norms = [getattr(att, "q_norm", None), getattr(att, "k_norm", None)]
                if norms[0] is not None:
                    qk_eps = norms[0].variance_epsilon
                layers.append(_Layer(layer.input_layernorm.weight,
                                     layer.post_attention_layernorm.weight, *parts,
                                     *(n.weight if n is not None else None for n in norms)))
        att = inner.layers[0].self_attn
        config = hf.config
        return cls(hf, layers, head, inner.norm.weight, inner.norm.variance_epsilon,
                   att.scaling, config.num_attention_heads, config.num_key_value_heads,
                   att.head_dim, qk_eps)

    def rotary(self, length: int, device) -> None:
        """cos and sin for positions 0..length-1, from the model's own rotary module (so
        any RoPE scaling it applies is kept); sin carries rotate_half's sign."""
        pos = torch.arange(length, device=device).unsqueeze(0)
        probe = self.embed[:1].unsqueeze(0)
        cos, sin = self.hf.model.rotary_emb(probe, pos)
        half = self.head_dim // 2
        self.cos = cos[0].contiguous()
        # rotate_half(x) * sin == roll(x, half) * cat(-sin[:half], sin[half:]) exactly
        self.sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)

    def _linear(self, lin: _Linear, x: torch.Tensor, plain: bool = False) -> torch.Tensor:
        y = lin.plain(x) if plain else lin(x)
        if self.deltas.groups is not None:
            self.deltas.add(lin.parts, x, y)
        return y

    def _qk_norm(self, layer: _Layer, qkv: torch.Tensor) -> torch.Tensor:
        """qkv [.., heads + 2 kv, d] with q and k normalized per head (qwen3)."""
        if layer.q_norm is None:
            return qkv
        h, kv, d = self.n_heads, self.n_kv, self.head_dim
        return torch.cat([F.rms_norm(qkv[..., :h, :], (d,), layer.q_norm, self.qk_eps),
                          F.rms_norm(qkv[..., h:h + kv, :], (d,), layer.k_norm, self.qk_eps),
                          qkv[..., h + kv:, :]], dim=-2)

    @torch.no_grad()
    def _prompts(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 variants: list | None = None, past: _Prefix | _Past | None = None,
                 head: bool = True):
        """The left-padded prompts [B, P] through every layer (padding hidden from every
        real token; ``positions`` [B, P] their rotary positions; ``variants``: each
        prompt's variant or None; ``past``: a cached prefix every prompt continues, or
        each row's own cache, seen by every token): per layer the rotated keys and the
        values [B, kv, P, d] of the prompts' own tokens, and the logits [B, V] that
        predict each prompt's next token (None without ``head``)."""
        ops = self.ops
        b, plen = ids.shape
        h, kv, d = self.n_heads, self.n_kv, self.head_dim
        valid = mask.bool()
        # causal, padding keys hidden; a padding query sees itself (its row stays finite)
        eye = torch.eye(plen, dtype=torch.bool, device=ids.device)
        allowed = (valid[:, None, :] | eye) & torch.ones_like(eye).tril()
        if past is not None:  # the past's positions come first, seen by every query
            seen = allowed.new_ones(b, plen, past.length) if past.valid is None else \
                past.valid[:, None, :].expand(b, plen, past.length)
            allowed = torch.cat([seen, allowed], dim=2)
        cos, sin = self.cos[positions][:, :, None], self.sin[positions][:, :, None]
        keys, values = [], []
        if variants is not None:  # each prompt's tokens, then its last one at the head
            real = mask.sum(1).tolist()
            self.deltas.set_rows(variants, [(i * plen + plen - r, (i + 1) * plen)
                                            for i, r in enumerate(real)])
        x = F.embedding(ids, self.embed).reshape(b * plen, -1)
        delta = None
        for layer in self.layers:
            y = ops.rms_norm(x, delta, layer.ln1, self.eps)
            qkv = self._qk_norm(layer, self._linear(layer.qkv, y, True).view(b, plen, h + 2 * kv, d))
            qk = _rotate(qkv[:, :, : h + kv], cos, sin)
            q, k = qk[:, :, :h].transpose(1, 2), qk[:, :, h:].transpose(1, 2)
            v = qkv[:, :, h + kv:].transpose(1, 2)
            keys.append(k)
            values.append(v)
            if past is not None:
                k = torch.cat([past.keys[len(keys) - 1].expand(b, -1, -1, -1), k], dim=2)
                v = torch.cat([past.values[len(values) - 1].expand(b, -1, -1, -1), v], dim=2)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None],
                                                 scale=self.scaling, enable_gqa=True)
            out = out.transpose(1, 2).reshape(b * plen, h * d)
            y = ops.rms_norm(x, self._linear(layer.o, out, True), layer.ln2, self.eps)
            delta = self._linear(layer.down, ops.silu_mul(self._linear(layer.gate_up, y, True)),
                                 True)
        if not head:
            return keys, values, None
        last = torch.arange(1, b + 1, device=ids.device) * plen - 1
        x = x.index_select(0, last) + delta.index_select(0, last)
        y = ops.rms_norm(x, None, self.norm, self.eps)
        if variants is None:
            return keys, values, self.lm_head.plain(y)
        self.deltas.set_rows(variants, [(i, i + 1) for i in range(b)])
        try:
            return keys, values, self._linear(self.lm_head, y, True)
        finally:
            self.deltas.clear()

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, repeats: int,
                max_new_tokens: int) -> torch.Tensor:
        """The sampler's prefill: run the left-padded prompts [B, P] once (positions
        0..P-1, as the model's own forward numbers them), keep their KV cache once per
        prompt for its ``repeats`` rows (read one after another, so from the CPU's cache)
        with room for each row's own ``max_new_tokens`` positions, and return the logits
        [B, V] that predict each prompt's first new token. Keys are stored transposed,
        [.., d, T]."""
        b, plen = ids.shape
        kv, d = self.n_kv, self.head_dim
        n, width = b * repeats, _padded(max_new_tokens)
        positions = torch.arange(plen, device=ids.device).expand(b, plen)
        keys, values, logits = self._prompts(ids, mask, positions)
        self.prompt_len = plen
        self.prompt_bias = torch.zeros(b, plen, device=ids.device).masked_fill(~mask.bool(),
                                                                                float("-inf"))
        self.group = torch.arange(b, device=ids.device).repeat_interleave(repeats)
        self.prompt_keys, self.prompt_values, self.keys, self.values = [], [], [], []
        for k, v in zip(keys, values):
            stored = k.new_zeros(b, kv, d, _padded(plen))
            stored[..., :plen] = k.transpose(2, 3)
            self.prompt_keys.append(stored)
            self.prompt_values.append(v.contiguous())
            self.keys.append(k.new_zeros(n, kv, d, width))
            self.values.append(v.new_zeros(n, kv, width, d))
        return logits

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
        """The sampler's step: logits [n, V] for the next position, given each row's
        token [n] at position ``pos`` (the same for all rows: prompts are left-padded)."""
        n = tokens.shape[0]
        slots = torch.full((n,), pos - self.prompt_len, dtype=torch.long, device=tokens.device)
        return self._step(tokens, self.keys, self.values, self.group, slots, slots + self.prompt_len)

    def _step(self, tokens, keys, values, group, slots, positions) -> torch.Tensor:
        ops = self.ops
        x = F.embedding(tokens, self.embed)
        norms = self.layers[0].q_norm is not None
        delta = None
        for i, layer in enumerate(self.layers):
            y = ops.rms_norm(x, delta, layer.ln1, self.eps)  # x += delta first
            out = ops.attend(self._linear(layer.qkv, y), self.prompt_keys[i],
                             self.prompt_values[i], self.prompt_bias, group, keys[i], values[i],
                             slots, positions, self.cos, self.sin, self.n_heads, self.scaling,
                             layer.q_norm if norms else None, layer.k_norm if norms else None,
                             self.qk_eps)
            y = ops.rms_norm(x, self._linear(layer.o, out), layer.ln2, self.eps)
            delta = self._linear(layer.down, ops.silu_mul(self._linear(layer.gate_up, y)))
        y = ops.rms_norm(x, delta, self.norm, self.eps)
        return self._linear(self.lm_head, y)

    # -- rows that join and leave (the server) ---------------------------------------

    #: automatic prefix caching: prompts joining together that begin with the same run of at
    #: least this many tokens (the same variant) have it computed once and kept
    prefix_min = 16

    def open_rows(self, max_rows: int, max_len: int, prefix_cache_bytes: int = 0) -> None:
        """Serve up to ``max_rows`` rows of up to ``max_len`` positions, each holding its
        own prompt (no shared prefix): :meth:`join`, :meth:`leave`, :meth:`advance`. The
        cache grows with the longest row and is freed when the last row leaves.

        ``prefix_cache_bytes``: the budget of the prefix cache (0: none). A prefix of at
        least :attr:`prefix_min` tokens that prompts joining together share (or a prompt
        with one of the last 32 that joined) is computed once and kept, least recently
        used out first; a later prompt that begins with a kept prefix copies its keys
        and values and runs only the rest of its tokens. The
        result is the same computation up to float rounding (the prefix's tokens run as
        one row instead of inside each prompt's batch)."""
        device = self.embed.device
        kv, d = self.n_kv, self.head_dim
        self.max_rows, self.max_len = max_rows, max_len
        self.prefix_budget = prefix_cache_bytes
        self.prefixes: dict[tuple, _Prefix] = {}  # insertion order: least recently used first
        self.recent: list[tuple[object, list[int]]] = []  # the last prompts: (variant ref, ids)
        self.prefix_stats = {"prefix_hits": 0, "prefix_tokens_reused": 0}
        self.prompt_len = 0
        self.prompt_keys = [self.embed.new_zeros(1, kv, d, 0)] * len(self.layers)
        self.prompt_values = [self.embed.new_zeros(1, kv, 0, d)] * len(self.layers)
        self.prompt_bias = self.embed.new_zeros(1, 0)
        self.lengths: list[int] = []
        self.keys, self.values = [], []
        self.rotary(max_len, device)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def _fit(self, length: int) -> None:
        """Room for a row of ``length`` positions (and its next token)."""
        width = self.keys[0].shape[3] if self.keys else 0
        if length < width:
            return
        new = _padded(min(max(length + 1, int(width * 1.5), 64), self.max_len + 1))
        kv, d, n = self.n_kv, self.head_dim, self.rows
        keys = [self.embed.new_zeros(self.max_rows, kv, d, new) for _ in self.layers]
        values = [self.embed.new_zeros(self.max_rows, kv, new, d) for _ in self.layers]
        for old, fresh in zip(self.keys, keys):
            fresh[:n, :, :, :width] = old[:n]
        for old, fresh in zip(self.values, values):
            fresh[:n, :, :width] = old[:n]
        self.keys, self.values = keys, values

    @property
    def prefix_bytes(self) -> int:
        return sum(e.nbytes for e in getattr(self, "prefixes", {}).values())

    @torch.no_grad()
    def join(self, prompts: list[list[int]], variants: list, copies: int = 1) -> torch.Tensor:
        """Prefill the prompts (token ids, each at positions 0..len-1; ``variants``: each
        one's variant or None), append them as rows ``rows..`` (``copies`` rows each, one
        after another: the sampler's G episodes of a prompt) and return the logits
        [len * copies, V] that predict their first new tokens. Each prompt runs once;
        prompts that begin with a kept prefix (:meth:`open_rows`) run only their
        remaining tokens, one pass per prefix."""
        b = len(prompts)
        if self.rows + b * copies > self.max_rows:
            raise ValueError(f"{self.rows} + {b * copies} rows are more than {self.max_rows}")
        self._fit(max(len(p) for p in prompts))
        logits = self._join(prompts, variants, self._prefixes_of(prompts, variants),
                            [[self.rows + i * copies + c for c in range(copies)]
                             for i in range(b)])
        self.lengths += [len(p) for p in prompts for _ in range(copies)]
        return logits.repeat_interleave(copies, dim=0) if copies > 1 else logits

    def _join(self, prompts: list[list[int]], variants: list, pasts: list[_Prefix | None],
              slots: list[list[int]]) -> torch.Tensor:
        """The prompts into rows ``slots`` (each prompt's rows) in one pass, each after its
        kept prefix (``pasts``, or None) if it has one."""
        starts = [p.length if p is not None else 0 for p in pasts]
        ids, mask = left_padded([p[s:] for p, s in zip(prompts, starts)],
                                device=self.embed.device)
        lengths = mask.sum(1).tolist()
        b, width = ids.shape
        positions = (mask.cumsum(1) - 1).clamp(min=0) + torch.tensor(starts)[:, None]
        past = None
        if any(starts):
            if all(p is pasts[0] for p in pasts):  # one prefix for all: shared, not copied
                past = pasts[0]
            else:  # each row's own (or none), padded to the longest
                longest = max(starts)
                valid = torch.arange(longest)[None] < torch.tensor(starts)[:, None]
                keys = [k.new_zeros(b, k.shape[1], longest, k.shape[3])
                        for k in next(p for p in pasts if p is not None).keys]
                values = [torch.zeros_like(k) for k in keys]
                for i, p in enumerate(pasts):
                    if p is not None:
                        for k, v, pk, pv in zip(keys, values, p.keys, p.values):
                            k[i, :, :p.length] = pk[0]
                            v[i, :, :p.length] = pv[0]
                past = _Past(keys, values, valid.to(ids.device))
        try:
            keys, values, logits = self._prompts(ids, mask, positions, variants, past)
        finally:
            self.deltas.clear()
        for layer, (k, v, kbuf, vbuf) in enumerate(zip(keys, values, self.keys, self.values)):
            for i, n in enumerate(lengths):
                s, p = starts[i], pasts[i]
                for row in slots[i]:
                    if p is not None:
                        kbuf[row, :, :, :s] = p.keys[layer][0].transpose(1, 2)
                        vbuf[row, :, :s] = p.values[layer][0]
                    kbuf[row, :, :, s:s + n] = k[i, :, width - n:].transpose(1, 2)
                    vbuf[row, :, s:s + n] = v[i, :, width - n:]
        hits = [s for s in starts if s]
        self.prefix_stats["prefix_hits"] += len(hits)
        self.prefix_stats["prefix_tokens_reused"] += sum(hits)
        return logits

    @torch.no_grad()
    def extend(self, rows: list[int], chunks: list[list[int]]) -> None:
        """Append ``chunks[i]`` (token ids, at least one) to row ``rows[i]`` in one pass:
        each token sees the row's cache and the chunk's earlier tokens, at the row's next
        positions (the sampler's multi-turn episodes: an environment's reply). Gives no
        logits: the next :meth:`advance` feeds the token after."""
        lengths = [len(c) for c in chunks]
        had = [self.lengths[r] for r in rows]
        longest = max(had)
        self._fit(max(h + n for h, n in zip(had, lengths)))
        index = torch.tensor(rows, dtype=torch.long, device=self.embed.device)
        valid = torch.arange(longest, device=index.device)[None] < \
            torch.tensor(had, device=index.device)[:, None]
        past = _Past([k.index_select(0, index)[..., :longest].transpose(2, 3)
                      for k in self.keys],
                     [v.index_select(0, index)[:, :, :longest] for v in self.values], valid)
        ids, mask = left_padded(chunks, device=index.device)
        width = ids.shape[1]
        positions = (mask.cumsum(1) - 1).clamp(min=0) + torch.tensor(had)[:, None]
        keys, values, _ = self._prompts(ids, mask, positions, None, past, head=False)
        for k, v, kbuf, vbuf in zip(keys, values, self.keys, self.values):
            for i, (row, h, n) in enumerate(zip(rows, had, lengths)):
                kbuf[row, :, :, h:h + n] = k[i, :, width - n:].transpose(1, 2)
                vbuf[row, :, h:h + n] = v[i, :, width - n:]
        for row, n in zip(rows, lengths):
            self.lengths[row] += n

    def _prefixes_of(self, prompts: list[list[int]], variants: list) -> list[_Prefix | None]:
        """Each prompt's kept prefix (the longest it begins with, shorter than itself,
        under its variant), after keeping the prefixes that prompts without one share
        with each other or with one of the last prompts that joined."""
        if not self.prefix_budget:
            return [None] * len(prompts)
        found = [self._lookup(p, v) for p, v in zip(prompts, variants)]
        share: dict[tuple, list[int]] = {}
        m = self.prefix_min
        for i, (p, past) in enumerate(zip(prompts, found)):
            if past is None and len(p) > m:
                share.setdefault((id(variants[i]), tuple(p[:m])), []).append(i)
        new: list[tuple[list[int], object, list[int]]] = []  # (tokens, variant, members)
        for members in share.values():
            first, variant = prompts[members[0]], variants[members[0]]
            shortest = min(len(prompts[i]) for i in members) - 1
            if len(members) > 1:  # with each other
                length = min(shortest, *(_common(first, prompts[i]) for i in members[1:]))
            else:  # or with an earlier prompt (a chat's system prompt, one request at a time)
                length = min(shortest, max((_common(first, ids) for ref, ids in self.recent
                                            if _refers(ref, variant)), default=0))
            if length >= m:
                new.append((first[:length], variant, members))
        if new:  # every new prefix in one pass
            for (_, _, members), past in zip(new, self._keep([(t, v) for t, v, _ in new])):
                for i in members:
                    found[i] = past
        self.recent = (self.recent + [(None if v is None else weakref.ref(v), list(p))
                                      for p, v in zip(prompts, variants)])[-32:]
        return found

    def _lookup(self, prompt: list[int], variant) -> _Prefix | None:
        best = None
        for key in [k for k, e in self.prefixes.items() if e.variant is not None
                    and e.variant() is None]:  # of a variant no longer served
            del self.prefixes[key]
        for entry in self.prefixes.values():
            if entry.of(variant) and entry.length < len(prompt) \
                    and (best is None or entry.length > best.length) \
                    and tuple(prompt[:entry.length]) == entry.tokens:
                best = entry
        if best is not None:  # most recently used: last out
            key = (id(variant), best.tokens)
            self.prefixes[key] = self.prefixes.pop(key)
        return best

    def _keep(self, starts: list[tuple[list[int], object]]) -> list[_Prefix]:
        """Run the prefixes ``starts`` ((tokens, variant) each) in one pass and keep
        their keys and values (least recently used entries out while over the budget; one
        larger than the whole budget is used for this join and not kept)."""
        lengths = [len(t) for t, _ in starts]
        ids, mask = left_padded([t for t, _ in starts], device=self.embed.device)
        width = ids.shape[1]
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        try:
            keys, values, _ = self._prompts(ids, mask, positions, [v for _, v in starts],
                                            head=False)
        finally:
            self.deltas.clear()
        out = []
        for i, ((tokens, variant), n) in enumerate(zip(starts, lengths)):
            ref = None if variant is None else weakref.ref(variant)
            entry = _Prefix(tuple(tokens), ref,
                            [k[i:i + 1, :, width - n:].contiguous() for k in keys],
                            [v[i:i + 1, :, width - n:].contiguous() for v in values])
            if entry.nbytes <= self.prefix_budget:
                self.prefixes[(id(variant), entry.tokens)] = entry
                while self.prefix_bytes > self.prefix_budget:
                    self.prefixes.pop(next(iter(self.prefixes)))
            out.append(entry)
        return out

    def leave(self, row: int) -> None:
        """Drop row ``row``; the last row moves into its place."""
        last = self.rows - 1
        if row != last:
            for buf in self.keys + self.values:
                buf[row] = buf[last]
            self.lengths[row] = self.lengths[last]
        self.lengths.pop()
        if not self.lengths:
            self.release()

    def release(self) -> None:
        """No rows: free the cache."""
        self.lengths, self.keys, self.values = [], [], []

    @torch.no_grad()
    def advance(self, tokens: torch.Tensor, variants: list) -> torch.Tensor:
        """One decode step of every row: ``tokens`` [rows] at each row's next position,
        ``variants`` each row's variant or None; returns the logits [rows, V]."""
        n = self.rows
        self._fit(max(self.lengths))
        slots = torch.tensor(self.lengths, dtype=torch.long, device=tokens.device)
        group = torch.zeros(n, dtype=torch.long, device=tokens.device)
        self.deltas.set_rows(variants, [(i, i + 1) for i in range(n)])
        try:
            logits = self._step(tokens, [k[:n] for k in self.keys],
                                [v[:n] for v in self.values], group, slots, slots)
        finally:
            self.deltas.clear()
        self.lengths = [x + 1 for x in self.lengths]
        return logits


def build_decoder(model, total_length: int, *, fused: bool | None = None,
                  share: bool = False) -> FusedDecoder | OwnForward:
    """The decoder of ``model`` for positions up to ``total_length``: the engine
    (:meth:`FusedDecoder.build`) when its table has the model, else :class:`OwnForward` (a
    warning says why, once per reason). ``fused``: True demands the engine (an error for a
    model outside it), False takes :class:`OwnForward` (the reference the engine is tested
    against), None picks. ``share``: as :meth:`FusedDecoder.build` (the server)."""
    if fused is not False:
        decoder = FusedDecoder.build(model, total_length, share=share)
        if decoder is not None:
            return decoder
        if fused:
            raise ValueError(f"{type(model).__name__} has no fused decode path")
    return OwnForward(model)


@dataclass
class _Group:
    """Rows in one batched cache of the model's own forward: rows of one length, or
    (``mask``) left-padded rows."""

    cache: object  # the model's cache (transformers' DynamicCache), batch = len(rows)
    rows: list[int]  # the decoder row of each batch row
    variant: object = None  # the server's variant of every row here, or None
    mask: torch.Tensor | None = None  # [k, T] 0 on padding (None: no padding)
    positions: torch.Tensor | None = None  # [k] each padded row's next position

    def select(self, at: list[int], device) -> None:
        """Keep batch rows ``at``."""
        index = torch.tensor(at, device=device)
        self.cache.batch_select_indices(index)
        if self.mask is not None:
            self.mask, self.positions = self.mask[index], self.positions[index]


class OwnForward:
    """:class:`FusedDecoder`'s interface on the model's own Hugging Face forward: gym's one
    fallback, for a model outside :data:`ARCHS` (and the reference the engine is tested
    against: ``fused=False``). The sampler's :meth:`prefill` / :meth:`pack` /
    :meth:`step` / :meth:`keep_rows` and the server's :meth:`open_rows` / :meth:`join` /
    :meth:`advance` / :meth:`leave` / :meth:`release`.

    Rows in one batched cache (a :class:`_Group`) decode in one forward. The sampler's
    rows are one group: the left-padded prompts run once (padding masked, each row's
    positions counted from its first real token, as transformers' ``generate`` counts
    them) and each prompt's cache is repeated for its rows. The server's prompts that join
    in one call with one length and one variant form a group (no padding). A finished row
    leaves its group at once (nothing is packed for a batch size, so there is nothing to
    gain by keeping it). A variant adds its delta through forward hooks on the linear
    layers (:class:`RowDeltas`), attached only for the passes of its rows."""

    #: the sampler compacts the batch as soon as a row finishes
    compact_at = 1.0

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.device = next(model.parameters()).device
        self.deltas = RowDeltas()
        self.linears: list | None = None  # (name, module) of each linear layer, when needed
        self.groups: list[_Group] = []
        self.max_rows: int | None = None

    def _hook(self, key: str):
        def hook(module, args, output):
            from gym_core.deltas.delta import RowGroups

            x = args[0].reshape(-1, module.in_features)
            y = torch.zeros(x.shape[0], module.out_features, device=output.device)
            self.deltas.groups = RowGroups.single(x.shape[0])
            self.deltas.add([(key, 0, module.out_features)], x, y)
            return output + y.view(output.shape).to(output.dtype)

        return hook

    def _run(self, ids: torch.Tensor, cache, variant=None, **padding):
        """(logits [k, V] of each row's last position, the cache) after ``ids`` [k, t];
        ``padding``: the ``attention_mask`` and ``position_ids`` of padded rows."""
        from gym_core.model.kv import cache_kw, cache_of

        handles = []
        if variant is not None:
            if self.linears is None:
                self.linears = [(name, m) for name, m in self.model.named_modules()
                                if isinstance(m, torch.nn.Linear)]
            self.deltas.set([variant], None)
            handles = [m.register_forward_hook(self._hook(name)) for name, m in self.linears]
        try:
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **padding,
                             **cache_kw(cache))
        finally:
            for h in handles:
                h.remove()
            self.deltas.groups = None
        return out.logits[:, -1], cache_of(out)

    # -- the sampler -----------------------------------------------------------------

    def rotary(self, length: int, device) -> None:
        """Nothing to prepare: the model's forward numbers positions from its cache."""

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, repeats: int,
                max_new_tokens: int) -> torch.Tensor:
        """:meth:`FusedDecoder.prefill`: the logits [B, V] that predict each left-padded
        prompt's first new token; prompt b's cache held for its rows ``b * repeats ..``."""
        padded = not bool(mask.bool().all())
        padding = {}
        if padded:
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            padding = dict(attention_mask=mask, position_ids=positions)
        logits, cache = self._run(ids, None, **padding)
        if repeats > 1:
            cache.batch_repeat_interleave(repeats)
        group = _Group(cache, list(range(ids.shape[0] * repeats)))
        if padded:
            group.mask = mask.repeat_interleave(repeats, dim=0)
            group.positions = positions[:, -1].repeat_interleave(repeats) + 1
        self.groups = [group]
        return logits

    def pack(self, rows: int) -> None:
        """Nothing to pack: the model's own layers run."""

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """The logits [n, V] for each row's next position after its token ``tokens`` [n]
        (``pos``: every cache knows its own length)."""
        logits = None
        for g in self.groups:
            index = torch.tensor(g.rows, device=tokens.device)
            padding = {}
            if g.mask is not None:
                g.mask = torch.cat([g.mask, g.mask.new_ones(len(g.rows), 1)], 1)
                padding = dict(attention_mask=g.mask, position_ids=g.positions[:, None])
                g.positions = g.positions + 1
            lg, g.cache = self._run(tokens.index_select(0, index).unsqueeze(1), g.cache,
                                    g.variant, **padding)
            if logits is None:
                logits = lg.new_empty(tokens.shape[0], lg.shape[-1])
            logits[index] = lg
        return logits

    def keep_rows(self, index: torch.Tensor) -> None:
        """Rows ``index`` stay, in that order (row i is the old row ``index[i]``)."""
        new = {old: i for i, old in enumerate(index.tolist())}
        groups = []
        for g in self.groups:
            at = [j for j, row in enumerate(g.rows) if row in new]
            if not at:
                continue
            if len(at) < len(g.rows):
                g.select(at, self.device)
            g.rows = [new[g.rows[j]] for j in at]
            groups.append(g)
        self.groups = groups

    # -- rows that join and leave (the server) ---------------------------------------

    def open_rows(self, max_rows: int, max_len: int, prefix_cache_bytes: int = 0) -> None:
        """Serve up to ``max_rows`` rows (``max_len``: the model's own limit applies; no
        prefix cache on this path: ``prefix_cache_bytes`` is not used)."""
        self.max_rows = max_rows
        self.prefix_stats = {"prefix_hits": 0, "prefix_tokens_reused": 0}
        self.prefix_bytes = 0
        self.release()

    @property
    def rows(self) -> int:
        return sum(len(g.rows) for g in self.groups)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for g in self.groups for layer in g.cache.layers
                   for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor))

    @torch.no_grad()
    def join(self, prompts: list[list[int]], variants: list, copies: int = 1) -> torch.Tensor:
        """:meth:`FusedDecoder.join`: the prompts' logits [len * copies, V]; the prompts
        of one length and one variant prefill together, as one group (each prompt's
        cache repeated for its ``copies`` rows)."""
        first = self.rows
        if self.max_rows is not None and first + len(prompts) * copies > self.max_rows:
            raise ValueError(f"{first} + {len(prompts) * copies} rows are more than "
                             f"{self.max_rows}")
        together: dict[tuple[int, int], list[int]] = {}
        for i, (ids, variant) in enumerate(zip(prompts, variants)):
            together.setdefault((len(ids), id(variant)), []).append(i)
        logits = None
        for members in together.values():
            variant = variants[members[0]]
            ids = torch.tensor([prompts[i] for i in members], dtype=torch.long,
                               device=self.device)
            lg, cache = self._run(ids, None, variant)
            if copies > 1:
                cache.batch_repeat_interleave(copies)
            self.groups.append(_Group(cache, [first + i * copies + c for i in members
                                              for c in range(copies)], variant))
            if logits is None:
                logits = lg.new_empty(len(prompts), lg.shape[-1])
            logits[members] = lg
        return logits.repeat_interleave(copies, dim=0) if copies > 1 else logits

    @torch.no_grad()
    def extend(self, rows: list[int], chunks: list[list[int]]) -> None:
        """:meth:`FusedDecoder.extend`: each row's chunk through the model's forward on
        the row's own cache (a row sharing a group's cache leaves it for a group of its
        own, its cache copied out)."""
        import copy

        for row, chunk in zip(rows, chunks):
            g = next(g for g in self.groups if row in g.rows)
            if len(g.rows) > 1:
                j = g.rows.index(row)
                own = _Group(copy.deepcopy(g.cache), [row], g.variant)
                own.cache.batch_select_indices(torch.tensor([j], device=self.device))
                g.select([i for i in range(len(g.rows)) if i != j], self.device)
                g.rows = [r for r in g.rows if r != row]
                self.groups.append(own)
                g = own
            ids = torch.tensor([chunk], dtype=torch.long, device=self.device)
            _, g.cache = self._run(ids, g.cache, g.variant)

    def advance(self, tokens: torch.Tensor, variants: list) -> torch.Tensor:
        """One decode step of every row (a row's variant is the one it joined with)."""
        return self.step(tokens.to(self.device), 0)

    def leave(self, row: int) -> None:
        """Drop row ``row``; the last row moves into its place."""
        keep = list(range(self.rows - 1))
        if row < len(keep):
            keep[row] = len(keep)
        self.keep_rows(torch.tensor(keep, dtype=torch.long))

    def release(self) -> None:
        """No rows: free the caches."""
        self.groups = []


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
    def attend(qkv, prompt_keys, prompt_values, prompt_bias, group, keys, values, slots,
               positions, cos, sin, heads, scale, q_norm=None, k_norm=None, norm_eps=0.0):
        n, kv, d, _ = keys.shape
        x = qkv[:, : (heads + kv) * d].view(n, heads + kv, d)
        if q_norm is not None:
            x = torch.cat([F.rms_norm(x[:, :heads], (d,), q_norm, norm_eps),
                           F.rms_norm(x[:, heads:], (d,), k_norm, norm_eps)], 1)
        qk = _rotate(x, cos[positions][:, None], sin[positions][:, None])
        rows = torch.arange(n, device=keys.device)
        keys[rows, :, :, slots] = qk[:, heads:]
        values[rows, :, slots] = qkv[:, (heads + kv) * d:].view(n, kv, d)
        # one query token: its heads grouped under their key/value head
        q = qk[:, :heads].reshape(n, kv, heads // kv, d)
        plen, longest = prompt_bias.shape[1], int(slots.max()) + 1
        own = torch.arange(longest, device=keys.device)
        own_bias = qkv.new_zeros(n, longest).masked_fill(own[None] > slots[:, None],
                                                         float("-inf"))
        scores = torch.cat([q @ prompt_keys[group][..., :plen], q @ keys[..., :longest]], -1)
        bias = torch.cat([prompt_bias[group], own_bias], -1)
        probs = (scores * scale + bias[:, None, None]).softmax(-1)
        out = probs[..., :plen] @ prompt_values[group] + \
            probs[..., plen:] @ values[:, :, :longest]
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
