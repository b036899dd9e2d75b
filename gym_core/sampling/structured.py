"""Constrained decoding: completions that follow a JSON schema (or are any JSON object),
for OpenAI's ``response_format`` in ``gym_core.serve`` and for callers of the sampler
(training-free GRPO's lesson LLM asks for its library-operations schema).

The grammar library is llguidance (docs/algorithms.md §8.5 says why: a Rust matcher with
no torch dependency, JSON schema support, and a mask per token computed in tens of
microseconds for a vocabulary of SmolLM2's size). Each constrained row has its own
matcher; before a row's token is drawn, the tokens its grammar does not allow at that
point get logit -inf (:meth:`JsonConstraint.apply`), and the drawn token advances the
matcher (:meth:`JsonConstraint.advance`). Once the grammar is complete only EOS is
allowed, so a row ends as soon as its JSON does. JSON is emitted without optional
whitespace (a small model could otherwise emit whitespace until ``max_tokens``).

A row that runs out of ``max_tokens`` before its JSON is complete stops there, as
OpenAI's API does (its ``finish_reason`` is ``length``): give the request room, or
bound the schema's strings and arrays (``maxLength``, ``maxItems``).
"""

from __future__ import annotations

import json
import threading
from typing import Any

import torch

from gym_core.base.errors import GymError

#: the grammar of ``response_format={"type": "json_object"}``: any JSON object
ANY_OBJECT = {"type": "object"}
_OPTIONS = {"whitespace_flexible": False}
_tokenizers: dict[tuple[int, int], Any] = {}
_lock = threading.Lock()


def _llg():
    try:
        import llguidance
    except ImportError:  # pragma: no cover - an optional extra
        raise GymError("structured output needs the llguidance package: "
                       "pip install 'gym[structured]'") from None
    return llguidance


def grammar(schema: dict[str, Any]) -> str:
    """The llguidance grammar of a JSON schema; a schema it cannot compile is a
    :class:`GymError` naming the problem."""
    llg = _llg()
    try:
        text = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=_OPTIONS)
    except (ValueError, TypeError) as exc:
        raise GymError(f"the JSON schema is not usable: {exc}") from None
    error = llg.LLMatcher.validate_grammar(text)
    if error:
        raise GymError(f"the JSON schema is not usable: {error.splitlines()[0][:300]}")
    return text


def ll_tokenizer(tokenizer, n_vocab: int):
    """llguidance's view of a Hugging Face fast tokenizer (built once, ~1 s, then cached)."""
    key = (id(tokenizer), n_vocab)
    with _lock:
        if key not in _tokenizers:
            from llguidance.hf import from_tokenizer

            try:
                _tokenizers[key] = from_tokenizer(tokenizer, n_vocab=n_vocab)
            except ValueError as exc:
                raise GymError(f"structured output needs a fast tokenizer: {exc}") from None
        return _tokenizers[key]


def new_matcher(tokenizer, grammar_text: str, n_vocab: int):
    """A fresh matcher of ``grammar_text`` for one row."""
    return _llg().LLMatcher(ll_tokenizer(tokenizer, n_vocab), grammar_text, log_level=0)


def mask_logits(matchers: list[Any], logits: torch.Tensor, eos: int) -> torch.Tensor:
    """``logits`` [len(matchers), V] with what each row's matcher forbids at -inf (rows
    whose matcher is None are left alone). A matcher in an error state allows only EOS."""
    index = [i for i, m in enumerate(matchers) if m is not None]
    if not index:
        return logits
    vocab = logits.shape[-1]
    bitmask = torch.zeros(len(index), (vocab + 31) // 32, dtype=torch.int32)
    for j, i in enumerate(index):
        m = matchers[i]
        if m.is_error():
            bitmask[j, eos // 32] = 1 << (eos % 32)
            continue
        row = bitmask[j]  # (llguidance.torch's helper would import torch.compile: 15 s)
        m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
    bits = torch.arange(32, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).view(len(index), -1)[:, :vocab].bool()
    logits = logits.clone()
    sel = torch.tensor(index, device=logits.device)
    logits[sel] = logits[sel].masked_fill(~allowed.to(logits.device), float("-inf"))
    return logits


def consume(matcher, token: int, eos: int) -> None:
    """The row drew ``token``: its matcher takes it (EOS and tokens after the grammar
    stopped end the row instead)."""
    if matcher is not None and token != eos and not matcher.is_stopped():
        matcher.consume_token(token)


class JsonConstraint:
    """Per-row constraints for :func:`gym_core.sampling.generation.generate`'s
    ``logits_mask``: ``grammars[i]`` (from :func:`grammar`) constrains output row ``i``;
    None leaves the row free."""

    def __init__(self, tokenizer, grammars: list[str | None]) -> None:
        self.tokenizer, self.grammars = tokenizer, grammars
        self.eos = tokenizer.eos_token_id
        self.matchers: list[Any] | None = None

    def _start(self, n_vocab: int) -> None:
        self.matchers = [None if g is None else new_matcher(self.tokenizer, g, n_vocab)
                         for g in self.grammars]

    def apply(self, rows: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [len(rows), V] of the output rows ``rows`` with every token the
        rows' grammars forbid at -inf."""
        if self.matchers is None:
            self._start(logits.shape[-1])
        return mask_logits([self.matchers[r] for r in rows.tolist()], logits, self.eos)

    def advance(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """The rows drew ``tokens``: their matchers consume them."""
        for r, t in zip(rows.tolist(), tokens.tolist()):
            consume(self.matchers[r], t, self.eos)


def json_masks(tokenizer, schema: dict[str, Any] | None, rows: int) -> JsonConstraint:
    """``rows`` output rows that all follow ``schema`` (None: any JSON object)."""
    g = grammar(schema if schema is not None else ANY_OBJECT)
    return JsonConstraint(tokenizer, [g] * rows)
