"""What a plugin implementing one of this plugin's families imports: the experience-store
and chat-model base classes, their config bases, and the operation semantics every store
shares. (The core's contract is :mod:`gym_core.api`; these families belong to
training-free GRPO.)"""

from __future__ import annotations

from gym_cl_grpo import ExperienceStoreConfig, LLMConfig
from gym_cl_grpo.experience import (
    OPERATIONS,
    ApplyResult,
    Experience,
    ExperienceStore,
    Operation,
    apply_operations,
    as_library,
    clean_text,
    labels,
)
from gym_cl_grpo.llm import ChatLLM, LLMError, Message

__all__ = [
    "OPERATIONS", "ApplyResult", "ChatLLM", "Experience", "ExperienceStore",
    "ExperienceStoreConfig", "LLMConfig", "LLMError", "Message", "Operation",
    "apply_operations", "as_library", "clean_text", "labels",
]
