"""The serving engine: one thread owns the model and runs continuous batching on gym's
decode engine (:class:`gym_core.sampling.fused.FusedDecoder`, the sampler's).

Every step, waiting requests are prefilled (their prompts in one pass) and join the
batch; then all running rows decode one token together; rows that finished, or whose
client left, leave the batch. Rows of different variants share each pass: the base
layer's matmul runs once for the whole batch and each variant's delta operators add their
term to their own rows (:class:`gym_core.sampling.fused.RowDeltas`, docs/serve.md).

The KV cache is the decode engine's: one row per running request, each at its own
length; a row joining writes its prompt's keys and values into the next free row, a row
leaving is replaced by the last row: neither touches the other rows. A model outside the
engine's table is served through its own forward, by the sampler's one fallback
(:class:`gym_core.sampling.fused.OwnForward`, the same rows; one warning).
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

from gym_core.sampling.fused import build_decoder
from gym_core.sampling.generation import Sampling, next_tokens, row_generators
from gym_core.serve.variants import Variant

log = logging.getLogger("gym.serve")


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
                 prefill_tokens: int = 4096, share: bool = True,
                 prefix_cache_bytes: int = 256 * 2**20):
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
        # the decode engine's rows (``share``: the model's q/k/v and gate/up weights then
        # views of its stacked matrices, held once; a model that trains on keeps its own),
        # or the model's own forward outside its table
        self.decoder = build_decoder(model, self.max_len, share=share)
        # automatic prefix caching (0: off): prompts that begin alike (a system prompt,
        # an evaluation's few-shot examples) run their common start once
        self.decoder.open_rows(max_rows, self.max_len, prefix_cache_bytes)
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

    def load(self) -> dict:
        with self._cv:
            return {"running": len(self.rows), "waiting": len(self.waiting),
                    "kv_cache_bytes": self.decoder.nbytes,
                    "prefix_cache_bytes": self.decoder.prefix_bytes,
                    **self.decoder.prefix_stats, **self.stats}

    # -- the loop --------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                if not self.waiting and not self.rows:
                    self.decoder.deltas.forget()  # idle: hold no variant any more
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
                self.decoder.release()

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
        self.decoder.leave(slot)
        last = self.rows.pop()
        if slot < len(self.rows):
            self.rows[slot] = last

    def _prefill(self, reqs: list[Request]) -> None:
        self.stats["prefills"] += 1
        logits = self.decoder.join([r.prompt_ids for r in reqs], [r.variant for r in reqs])
        new_rows = [_Row(r, self.tok, self.eos, self.max_len) for r in reqs]
        tokens = self._sample(new_rows, logits.float())
        first = len(self.rows)
        for row, token in zip(new_rows, tokens):
            self.stats["requests"] += 1
            row.push(token)
            self.rows.append(row)
        for slot in range(len(self.rows) - 1, first - 1, -1):
            row = self.rows[slot]
            if row.finish or row.req.cancelled.is_set():
                self._leave(slot)

    def _decode(self) -> None:
        self.stats["steps"] += 1
        self.stats["max_running"] = max(self.stats["max_running"], len(self.rows))
        ids = torch.tensor([row.tokens[-1] for row in self.rows], dtype=torch.long)
        logits = self.decoder.advance(ids, [row.req.variant for row in self.rows])
        tokens = self._sample(self.rows, logits.float())
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
