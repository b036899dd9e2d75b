"""The serving engine: one thread owns the model and runs continuous batching.

Every step, waiting requests are prefilled (their prompts in one forward pass) and join the
batch; then all running rows decode one token together; rows that finished, or whose
client left, leave the batch. Rows of different variants share each forward pass: the base
layer's matmul runs once for the whole batch and each variant's delta operators add their
term to their own rows (:class:`VariantLayers`, docs/serve.md).

The KV cache (:class:`KVSlots`) keeps one slot per running row in preallocated
per-layer buffers; all rows end at the same column and each row's tokens are the last
``length`` columns before it (left padding, masked). A row joining copies its prompt's
keys and values into a free slot, a row leaving is replaced by the last slot: neither
touches the other rows.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from gym_core.deltas.delta import RowGroups
from gym_core.sampling.generation import Sampling, next_tokens, row_generators
from gym_core.serve.variants import Variant

log = logging.getLogger("gym.serve")


# ----------------------------------------------------------------------------------------
# variants inside one forward pass
# ----------------------------------------------------------------------------------------


class VariantLayers:
    """Forward hooks on every linear layer of the base: after ``y = x W^T + b`` for the
    whole batch, each group of rows sharing a variant gets ``x_rows @ D^T`` added, one
    :meth:`~gym_core.deltas.delta.DeltaOperator.add_to` call per operator class. Rows of the base
    model are in no group and cost nothing."""

    def __init__(self, model: torch.nn.Module):
        self.variants: list[Variant] = []  # the current forward pass's groups
        self.groups: RowGroups | None = None
        # per layer: [(operator class, ops per group, prepared)], kept while the batch's
        # variants stay the same (most decode steps), so steps do not rebuild them
        self._plans: dict[str, list] = {}
        self._handles = []
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                self._handles.append(module.register_forward_hook(self._hook(name)))

    def set(self, variants: list[Variant], groups: RowGroups | None) -> None:
        if len(variants) != len(self.variants) or \
                any(a is not b for a, b in zip(variants, self.variants)):
            self._plans = {}
        self.variants, self.groups = variants, groups

    def clear(self) -> None:
        """After a forward pass: no groups (the plans stay for the next step)."""
        self.groups = None

    def forget(self) -> None:
        self.variants, self.groups, self._plans = [], None, {}

    def _plan(self, key: str) -> list:
        by_class: dict[type, list] = {}
        for g, variant in enumerate(self.variants):
            op = variant.ops.get(key)
            if op is not None:
                by_class.setdefault(type(op), [None] * len(self.variants))[g] = op
        return [(cls, ops, cls.prepare(ops)) for cls, ops in by_class.items()]

    def _hook(self, key: str):
        def hook(module, args, output):
            if self.groups is None:
                return None
            plan = self._plans.get(key)
            if plan is None:
                plan = self._plans[key] = self._plan(key)
            if not plan:
                return None
            x = args[0].reshape(-1, module.in_features)
            x = x.float().contiguous() if x.dtype != torch.float32 else x.contiguous()
            if output.dtype == torch.float32 and output.is_contiguous():
                y, cast = output.view(-1, module.out_features), False
            else:
                y, cast = torch.zeros(x.shape[0], module.out_features), True
            for cls, ops, prepared in plan:
                cls.add_to(x, y, self.groups, ops, prepared)
            if cast:
                output = output + y.view(output.shape).to(output.dtype)
            return output

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def row_groups(variants: list[Variant | None], spans: list[tuple[int, int]]):
    """The rows of each distinct variant (token indices of the flattened batch):
    ``spans[i]`` is row i's token range. Base rows (None) are left out."""
    order: dict[int, list[int]] = {}
    chosen: list[Variant] = []
    for i, v in enumerate(variants):
        if v is None:
            continue
        key = id(v)
        if key not in order:
            order[key] = []
            chosen.append(v)
        order[key].extend(range(*spans[i]))
    if not chosen:
        return [], None
    idx, offs = [], [0]
    for v in chosen:
        idx += order[id(v)]
        offs.append(len(idx))
    return chosen, RowGroups(torch.tensor(idx, dtype=torch.int32), offs)


# ----------------------------------------------------------------------------------------
# the KV cache
# ----------------------------------------------------------------------------------------


class _SlotLayer(DynamicLayer):
    """One layer's view of :class:`KVSlots` for a forward pass: the new keys and values
    are written in place at the shared end column; nothing is concatenated."""

    def __init__(self, kbuf, vbuf, rows: int, start: int, end: int):
        super().__init__()
        self.kbuf, self.vbuf, self.rows, self.start, self.end = kbuf, vbuf, rows, start, end
        self.is_initialized = True
        self.device = kbuf.device
        self.keys = kbuf[:rows, :, start:end]
        self.values = vbuf[:rows, :, start:end]

    def update(self, key_states, value_states, *args, **kwargs):
        s = key_states.shape[-2]
        self.kbuf[: self.rows, :, self.end : self.end + s] = key_states
        self.vbuf[: self.rows, :, self.end : self.end + s] = value_states
        self.end += s
        self.keys = self.kbuf[: self.rows, :, self.start : self.end]
        self.values = self.vbuf[: self.rows, :, self.start : self.end]
        return self.keys, self.values


class _SlotCache(DynamicCache):
    def __init__(self, layers):
        super(DynamicCache, self).__init__(layers=layers)


class KVSlots:
    """Per-layer key/value buffers ``[max_rows, heads, capacity, head_dim]``; rows
    ``0..n-1`` are running. Every row's tokens end at column ``end``; row r's real tokens
    are the ``lengths[r]`` columns before it, the mask marks them."""

    def __init__(self, num_layers: int, heads: int, head_dim: int, dtype, max_rows: int):
        self.shape = (num_layers, heads, head_dim)
        self.dtype, self.max_rows = dtype, max_rows
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        self.capacity = self.start = self.end = self.n = 0
        self.lengths: list[int] = []

    def _relocate(self, capacity: int) -> None:
        """New buffers of ``capacity`` columns, the live window moved to column 0."""
        layers, heads, dim = self.shape
        k = [torch.zeros(self.max_rows, heads, capacity, dim, dtype=self.dtype) for _ in range(layers)]
        v = [torch.zeros(self.max_rows, heads, capacity, dim, dtype=self.dtype) for _ in range(layers)]
        mask = torch.zeros(self.max_rows, capacity, dtype=torch.long)
        width = self.end - self.start
        if self.n and width:
            for new, old in zip(k + v, self.k + self.v):
                new[: self.n, :, :width] = old[: self.n, :, self.start : self.end]
            mask[: self.n, :width] = self.mask[: self.n, self.start : self.end]
        self.k, self.v, self.mask, self.capacity = k, v, mask, capacity
        self.start, self.end = 0, width

    def _fit(self, end: int, width: int) -> None:
        """Make sure the window can end at column ``end`` (and one decode column after
        it) while ``width`` columns wide: move it to column 0, or grow the buffers."""
        if end + 1 <= self.capacity:
            return
        capacity = self.capacity
        if width + 1 + 16 > capacity:  # compacting alone would soon run out again
            capacity = max(width + 64, int(capacity * 1.5))
        self._relocate(capacity)

    def add(self, keys: list[torch.Tensor], values: list[torch.Tensor], length: int) -> int:
        """Append a row whose prompt's keys/values are ``[heads, length, dim]`` per layer;
        returns its slot."""
        if self.n == 0:
            self.start = self.end = 0
        width = max(self.end - self.start, length)
        self._fit(self.end + max(0, length - self.end), width)
        shift = max(0, length - self.end)  # the prompt must fit before the shared end
        if shift:
            if self.n:
                for buf in self.k + self.v:
                    buf[: self.n, :, self.start + shift : self.end + shift] = \
                        buf[: self.n, :, self.start : self.end].clone()
                self.mask[: self.n, self.start + shift : self.end + shift] = \
                    self.mask[: self.n, self.start : self.end].clone()
                self.mask[: self.n, self.start : self.start + shift] = 0
            self.start += shift
            self.end += shift
        slot = self.n
        for buf, src in zip(self.k, keys):
            buf[slot, :, self.end - length : self.end] = src
        for buf, src in zip(self.v, values):
            buf[slot, :, self.end - length : self.end] = src
        self.mask[slot].zero_()
        self.mask[slot, self.end - length : self.end] = 1
        self.start = min(self.start, self.end - length)
        self.lengths.append(length)
        self.n += 1
        return slot

    def remove(self, slot: int) -> None:
        """Drop a row; the last row moves into its slot."""
        last = self.n - 1
        if slot != last:
            for buf in self.k + self.v:
                buf[slot, :, self.start : self.end] = buf[last, :, self.start : self.end]
            self.mask[slot, self.start : self.end] = self.mask[last, self.start : self.end]
            self.lengths[slot] = self.lengths[last]
        self.mask[last].zero_()
        self.lengths.pop()
        self.n = last
        if self.n == 0:
            self.release()
        else:  # columns no running row uses any more
            self.start = self.end - max(self.lengths)
            self.mask[: self.n, : self.start] = 0

    def release(self) -> None:
        """Free the buffers (the batch is empty)."""
        self.k, self.v = [], []
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        self.capacity = self.start = self.end = self.n = 0
        self.lengths = []

    def step_inputs(self):
        """Cache, attention mask and position ids for one decode step of all rows."""
        self._fit(self.end, self.end - self.start)
        self.mask[: self.n, self.end] = 1
        layers = [_SlotLayer(k, v, self.n, self.start, self.end) for k, v in zip(self.k, self.v)]
        mask = self.mask[: self.n, self.start : self.end + 1]
        positions = torch.tensor(self.lengths, dtype=torch.long).unsqueeze(1)
        return _SlotCache(layers), mask, positions

    def advance(self) -> None:
        self.end += 1
        self.lengths = [n + 1 for n in self.lengths]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


# ----------------------------------------------------------------------------------------
# requests
# ----------------------------------------------------------------------------------------


@dataclass
class Params:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # vLLM's extension: always generate max_tokens (benchmarks)
    # response_format: the llguidance grammar the completion follows
    # (gym_core.sampling.structured), None: free text
    grammar: str | None = None


@dataclass
class Event:
    kind: str  # "text" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)  # "done": the completion's tokens


_ids = itertools.count()


class Request:
    """One completion: the engine calls ``emit`` (from its thread) with text as it is
    decoded, then one "done" or "error" event."""

    def __init__(self, prompt_ids: list[int], variant: Variant | None, params: Params,
                 emit: Callable[[Event], None]):
        self.id = next(_ids)
        self.prompt_ids, self.variant, self.params, self.emit = prompt_ids, variant, params, emit
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled.set()


class _Row:
    """A running request: its tokens and the text sent so far."""

    def __init__(self, req: Request, tokenizer, eos: set[int], max_len: int):
        self.req, self.tok, self.eos, self.max_len = req, tokenizer, eos, max_len
        p = req.params
        self.sampling = Sampling(do_sample=p.temperature > 0, temperature=max(p.temperature, 1e-5),
                                 top_p=p.top_p)
        seed = p.seed if p.seed is not None else int.from_bytes(os.urandom(8), "little")
        self.generator = row_generators([seed])[0] if p.temperature > 0 else None
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0
        self.prefix = self.read = 0  # incremental detokenization offsets
        self.holdback = max((len(s) for s in p.stop), default=1) - 1
        self.finish: str | None = None
        self.matcher = None  # response_format's grammar matcher, made at the first token

    def push(self, token: int) -> None:
        """Take one sampled token: update the text, decide whether the row is done, emit
        what is final."""
        p = self.req.params
        self.tokens.append(token)
        if token in self.eos and not p.ignore_eos:
            self.finish = "stop"
            self.tokens.pop()  # not part of the text; still counted in the usage
            self._detokenize(final=True)
            self.tokens.append(token)
        else:
            self._detokenize()
            if p.stop:
                cut = min((i for i in (self.text.find(s, max(0, self.sent - len(s)))
                                       for s in p.stop) if i >= 0), default=-1)
                if cut >= 0:
                    self.text = self.text[:cut]
                    self.finish = "stop"
            if self.finish is None and (len(self.tokens) >= p.max_tokens or
                                        len(self.req.prompt_ids) + len(self.tokens) >= self.max_len):
                self.finish = "length"
                self._detokenize(final=True)
        upto = len(self.text) if self.finish else max(self.sent, len(self.text) - self.holdback)
        if upto > self.sent:
            self.req.emit(Event("text", self.text[self.sent:upto]))
            self.sent = upto
        if self.finish:
            self.req.emit(Event("done", finish_reason=self.finish,
                                prompt_tokens=len(self.req.prompt_ids),
                                completion_tokens=len(self.tokens), token_ids=list(self.tokens)))

    def _detokenize(self, final: bool = False) -> None:
        # decode a short window (TGI's scheme): text is final once it does not end in a
        # partial UTF-8 character, or when the row ends
        ids = self.tokens
        before = self.tok.decode(ids[self.prefix : self.read], skip_special_tokens=True)
        after = self.tok.decode(ids[self.prefix :], skip_special_tokens=True)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(ids)


# ----------------------------------------------------------------------------------------
# the engine
# ----------------------------------------------------------------------------------------


class Engine:
    """Owns the model; :meth:`submit` from any thread."""

    def __init__(self, model, tokenizer, *, max_rows: int = 64, max_len: int | None = None,
                 prefill_tokens: int = 4096):
        # its own tokenizer: a fast tokenizer used from two threads at once (the HTTP
        # thread encoding prompts, this one decoding) can fail with "Already borrowed"
        self.model, self.tok = model, copy.deepcopy(tokenizer)
        cfg = model.config
        self.max_len = int(max_len or getattr(cfg, "max_position_embeddings", 2048))
        self.max_rows, self.prefill_tokens = max_rows, prefill_tokens
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos = eos
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dtype = next(model.parameters()).dtype
        self.kv = KVSlots(cfg.num_hidden_layers, heads, head_dim, dtype, max_rows)
        self.layers = VariantLayers(model)
        self.rows: list[_Row] = []
        self.waiting: deque[Request] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self.stats = {"steps": 0, "prefills": 0, "tokens": 0, "requests": 0, "errors": 0,
                      "max_running": 0, "decode_tokens": 0, "decode_seconds": 0.0,
                      "prefill_seconds": 0.0}
        self._thread = threading.Thread(target=self._loop, name="gym-serve-engine", daemon=True)
        self._thread.start()

    # -- public ----------------------------------------------------------------------

    def submit(self, req: Request) -> None:
        with self._cv:
            self.waiting.append(req)
            self._cv.notify()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=30)
        self.layers.remove()

    def load(self) -> dict:
        with self._cv:
            return {"running": len(self.rows), "waiting": len(self.waiting),
                    "kv_cache_bytes": self.kv.nbytes, **self.stats}

    # -- the loop --------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                if not self.waiting and not self.rows:
                    self.layers.forget()  # idle: hold no variant any more
                while not self._stop and not self.waiting and not self.rows:
                    self._cv.wait()
                if self._stop:
                    break
                new = self._admit()
            try:
                self._drop_cancelled()
                if new:
                    t0 = time.perf_counter()
                    self._prefill(new)
                    self.stats["prefill_seconds"] += time.perf_counter() - t0
                if self.rows:
                    t0 = time.perf_counter()
                    self.stats["decode_tokens"] += len(self.rows)
                    self._decode()
                    self.stats["decode_seconds"] += time.perf_counter() - t0
            except Exception as exc:  # never let one bad step take the server down
                log.exception("engine step failed")
                self.stats["errors"] += 1
                for row in self.rows:
                    row.req.emit(Event("error", text=f"the engine failed: {exc}"))
                for req in new:
                    if not any(r.req is req for r in self.rows):
                        req.emit(Event("error", text=f"the engine failed: {exc}"))
                self.rows = []
                self.kv.release()
            finally:
                self.layers.clear()

    def _admit(self) -> list[Request]:
        new, tokens = [], 0
        while self.waiting and len(self.rows) + len(new) < self.max_rows:
            req = self.waiting[0]
            if new and tokens + len(req.prompt_ids) > self.prefill_tokens:
                break
            self.waiting.popleft()
            if req.cancelled.is_set():
                continue
            new.append(req)
            tokens += len(req.prompt_ids)
        return new

    def _drop_cancelled(self) -> None:
        for slot in range(len(self.rows) - 1, -1, -1):
            if self.rows[slot].req.cancelled.is_set():
                self._leave(slot)

    def _leave(self, slot: int) -> None:
        self.kv.remove(slot)
        last = self.rows.pop()
        if slot < len(self.rows):
            self.rows[slot] = last

    def _forward(self, variants, spans, **inputs):
        chosen, groups = row_groups(variants, spans)
        self.layers.set(chosen, groups)
        try:
            return self.model(**inputs, use_cache=True, logits_to_keep=1)
        finally:
            self.layers.clear()

    def _prefill(self, reqs: list[Request]) -> None:
        self.stats["prefills"] += 1
        lengths = [len(r.prompt_ids) for r in reqs]
        width = max(lengths)
        ids = torch.full((len(reqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(reqs), width, dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, width - lengths[i]:] = torch.tensor(r.prompt_ids)
            mask[i, width - lengths[i]:] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        spans = [(i * width + width - n, (i + 1) * width) for i, n in enumerate(lengths)]
        cache = DynamicCache()
        out = self._forward([r.variant for r in reqs], spans, input_ids=ids, attention_mask=mask,
                            position_ids=positions, cache=cache)
        logits = out.logits[:, -1].float()
        new_rows = [_Row(r, self.tok, self.eos, self.max_len) for r in reqs]
        tokens = self._sample(new_rows, logits)
        for i, (row, token) in enumerate(zip(new_rows, tokens)):
            self.stats["requests"] += 1
            row.push(token)
            if row.finish or row.req.cancelled.is_set():
                continue
            n = lengths[i]
            keys = [layer.keys[i, :, width - n:] for layer in cache.layers]
            values = [layer.values[i, :, width - n:] for layer in cache.layers]
            self.kv.add(keys, values, n)
            self.rows.append(row)

    def _decode(self) -> None:
        self.stats["steps"] += 1
        self.stats["max_running"] = max(self.stats["max_running"], len(self.rows))
        cache, mask, positions = self.kv.step_inputs()
        ids = torch.tensor([[row.tokens[-1]] for row in self.rows], dtype=torch.long)
        spans = [(i, i + 1) for i in range(len(self.rows))]
        out = self._forward([row.req.variant for row in self.rows], spans, input_ids=ids,
                            attention_mask=mask, position_ids=positions, cache=cache)
        self.kv.advance()
        tokens = self._sample(self.rows, out.logits[:, -1].float())
        for slot in range(len(self.rows) - 1, -1, -1):
            row = self.rows[slot]
            row.push(tokens[slot])
            if row.finish or row.req.cancelled.is_set():
                self._leave(slot)

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """Each row's next token with its own parameters: greedy rows by argmax, sampled
        rows grouped by (temperature, top_p), each drawing from its own generator
        (gym_core.sampling.generation's sampler), so a row's tokens never depend on its batch."""
        constrained = [row.req.params.grammar is not None for row in rows]
        if any(constrained):  # response_format: what the grammar forbids gets -inf
            from gym_core.sampling import structured

            eos = self.tok.eos_token_id
            for row, c in zip(rows, constrained):
                if c and row.matcher is None:
                    row.matcher = structured.new_matcher(self.tok, row.req.params.grammar,
                                                         logits.shape[-1])
            logits = structured.mask_logits([r.matcher for r in rows], logits, eos)
        out = logits.argmax(dim=-1)
        groups: dict[tuple[float, float], list[int]] = {}
        for i, row in enumerate(rows):
            if row.sampling.do_sample:
                groups.setdefault((row.sampling.temperature, row.sampling.top_p), []).append(i)
        for (_, _), idx in groups.items():
            s = rows[idx[0]].sampling
            out[idx] = next_tokens(logits[idx], s, [rows[i].generator for i in idx])
        self.stats["tokens"] += len(rows)
        tokens = out.tolist()
        if any(constrained):
            for row, t in zip(rows, tokens):
                structured.consume(row.matcher, t, eos)
        return tokens
