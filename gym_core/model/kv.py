"""The key/value cache's name in transformers' model calls: ``cache=`` and ``out.cache``
since transformers 5.2x (``past_key_values`` is deprecated there, with a warning on every
call), ``past_key_values`` before. gym passes and reads it through these two helpers, so
it uses the current name of whichever transformers is installed."""

from __future__ import annotations

from typing import Any


def _current_name() -> str:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else \
        "past_key_values"


NAME = _current_name()


def cache_kw(cache: Any) -> dict[str, Any]:
    """``model(..., **cache_kw(cache))``."""
    return {NAME: cache}


def cache_of(out: Any) -> Any:
    """The cache a model call returned."""
    return getattr(out, NAME)
