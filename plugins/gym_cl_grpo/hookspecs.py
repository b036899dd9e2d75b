"""The hook specs of the two families this plugin declares (``gym_add_families``): the
experience stores and the chat models of training-free GRPO. Third-party plugins
implement them like the core's registration hooks, with ``gym_core.api.hookimpl``; their
base classes are in :mod:`gym_cl_grpo.api`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gym_core.api import hookspec

if TYPE_CHECKING:
    from gym_core.api import Registry


@hookspec
def gym_add_experience_stores(registry: Registry) -> None:
    """Register experience stores (text experience libraries for training-free methods).

    Called once at start-up, after ``gym_cl_grpo`` declared the family.

    :param registry: call ``registry.add(name, config, impl)``; ``name`` becomes the
        option ``experience_store=<name>`` (in the config with ``algorithm=cl_grpo``).
        ``config`` derives from ``ExperienceStoreConfig``; ``impl`` subclasses
        ``ExperienceStore`` (both from ``gym_cl_grpo.api``).

    All implementations are called; a duplicate name is an error.

    A store is built as ``impl(cfg, path, writer)`` and persists what
    ``gym_cl_grpo.api.apply_operations`` decides (the meaning of ADD / UPDATE / DELETE /
    NONE is fixed there, once for every store). What gym calls:

    - class attributes ``Config`` (the schema), ``default_filename`` (the file under
      ``<run_dir>/experiences/`` when ``cfg.path`` is None) and classmethod
      ``recognizes(path) -> bool`` (does this file look like this store's, for
      ``python -m gym_cl_grpo.experience show``);
    - ``list()`` (the library now, in key order), ``retrieve(prompt)`` (the entries to
      show for one prompt; default all), ``last_step()`` (the newest recorded step, 0
      for a new library), ``at_step(step)`` (the library as it stood after that step);
    - ``apply(ops, step) -> ApplyResult``: one atomic, durable batch recorded as
      ``step``; a step at or below ``last_step()`` raises ``ValueError``, and a file that
      is not a library raises ``GymError`` when opened and is left untouched;
    - ``rewind(step)`` (forget later steps, for a run resumed from an older checkpoint),
      ``close()``.

    ``gym_cl_grpo.contracts.ExperienceStoreContract`` is the pytest suite every store
    passes: subclass it and provide ``store_class`` (and optionally ``store_config``) as
    fixtures.
    """


@hookspec
def gym_add_llms(registry: Registry) -> None:
    """Register chat models that methods call for their own reasoning (the summarising
    and lesson-extracting model of training-free GRPO).

    Called once at start-up, after ``gym_cl_grpo`` declared the family.

    :param registry: call ``registry.add(name, config, impl)``. ``name`` becomes the
        option ``llm=<name>`` (in the config with ``algorithm=cl_grpo``); ``config``
        derives from ``LLMConfig``; ``impl(cfg, policy)`` builds a ``ChatLLM`` (both from
        ``gym_cl_grpo.api``) whose ``chat(conversations, *, schema=None,
        max_new_tokens=None) -> list[str]`` answers a batch of message lists (``schema``:
        the JSON schema a structured reply follows, which a back-end may ignore;
        ``max_new_tokens``: this call's limit). Secrets (API keys) are read from the environment by the
        implementation, never stored in the config.

    All implementations are called; a duplicate name is an error.
    """


@hookspec
def gym_add_policies(registry: Registry) -> None:
    """Register where training-free GRPO's rollouts and held-out answers come from
    (``policy=<name>``, in the config with ``algorithm=cl_grpo``): ``local`` (the loaded
    model) and ``api`` (an OpenAI-compatible endpoint) are built in.

    Called once at start-up, after ``gym_cl_grpo`` declared the family.

    :param registry: call ``registry.add(name, config, impl)``; ``config`` derives from
        ``gym_cl_grpo.PolicyConfig``; ``impl`` (see ``gym_cl_grpo.policy``) is built as
        ``impl(cfg, ledger)`` and answers ``answer(messages_list, max_tokens,
        temperature, seeds) -> list[Reply]``, or is the local model (``local = True``).

    All implementations are called; a duplicate name is an error.
    """
