"""The hook specifications: gym's whole plugin contract.

A plugin is a module (or object) holding functions decorated with
:data:`gym_core.hookimpl` whose names match the specs below. gym finds plugins through
the ``gym_core`` entry-point group (built-in plugins use the same group)::

    # pyproject.toml of a plugin distribution
    [project.entry-points."gym_core"]
    myalgo = "gym_myalgo"

Registration hooks receive a *registry* and call ``registry.add(...)`` on it (as tox's
``tox_register_tox_env`` does) instead of returning values that gym would have to merge.
Every component registered this way becomes a Hydra config-group option named after it:
``algorithm=<name>``, ``quant=<name>``, ``experience_store=<name>``, ``data=<name>``,
``llm=<name>``.

Registration hooks run while gym starts, before any heavy import: keep the module that
holds them cheap to import (no torch at module level) and point ``registry.add`` at the
implementation lazily with a ``"module:attribute"`` string.

Lifecycle hooks are called by the core training loop, on the main process only (rank 0
under ``torchrun``); every implementation is called and return values are ignored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from gym_core.registry import Registry

#: The pluggy project name, also the entry-point group plugins are declared in.
PROJECT = "gym_core"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ----------------------------------------------------------------------------------------
# Registration: called once per process, when gym starts (``gym_core.bootstrap``)
# ----------------------------------------------------------------------------------------


@hookspec
def gym_add_algorithms(registry: Registry) -> None:
    """Register training algorithms (the *trainer* family).

    Called once at start-up, before Hydra composes the configuration.

    :param registry: call ``registry.add(name, config, impl)`` for each algorithm.
        ``name`` becomes the option ``algorithm=<name>``; ``config`` is a dataclass
        deriving from :class:`gym_core.config.AlgorithmConfig` (online methods from
        :class:`gym_core.config.OnlineAlgorithmConfig`, whose rollout fields the core
        reads) and is stored in Hydra's ConfigStore as the option's schema; ``impl`` is
        a subclass of :class:`gym_core.algorithm.Algorithm`, or a ``"module:Class"``
        string resolved only when a run selects it.

    All implementations are called; registering a name twice is an error that names
    both plugins.
    """


@hookspec
def gym_add_quantizers(registry: Registry) -> None:
    """Register delta quantizers (the *quantizer* family).

    Called once at start-up.

    :param registry: call ``registry.add(name, config, impl)``. ``config`` derives from
        :class:`gym_core.config.QuantConfig`; ``impl`` implements
        :class:`gym_core.delta.Quantizer`: ``quantize(delta) -> PackedDelta`` with real
        bit packing and ``dequantize(packed) -> delta``.

    All implementations are called; a duplicate name is an error.
    """


@hookspec
def gym_add_experience_stores(registry: Registry) -> None:
    """Register experience stores (text experience libraries for training-free methods).

    Called once at start-up.

    :param registry: call ``registry.add(name, config, impl)``. ``config`` derives from
        :class:`gym_core.config.ExperienceStoreConfig`; ``impl`` subclasses
        :class:`gym_core.experience.ExperienceStore` (``impl(cfg, path, writer)``): it
        opens, lists, retrieves and applies batches of ADD / UPDATE / DELETE / NONE
        operations, persisting each applied batch atomically with a version per step so
        that nothing is lost on a crash and a run can resume from any step.
        :mod:`gym_core.contracts.experience_store` is the test suite every store passes.

    All implementations are called; a duplicate name is an error.
    """


@hookspec
def gym_add_llms(registry: Registry) -> None:
    """Register chat models that methods call for their own reasoning (e.g. the
    summarising and lesson-extracting model of training-free GRPO).

    Called once at start-up.

    :param registry: call ``registry.add(name, config, impl)``. ``name`` becomes the
        option ``llm=<name>``; ``config`` derives from :class:`gym_core.config.LLMConfig`;
        ``impl(cfg, policy)`` builds a :class:`gym_core.llm.ChatLLM` whose
        ``chat(conversations) -> list[str]`` answers a batch of message lists. Secrets
        (API keys) are read from the environment by the implementation, never stored in
        the config.

    All implementations are called; a duplicate name is an error.
    """


@hookspec
def gym_add_rewards(registry: Registry) -> None:
    """Register reward functions by name.

    Called once at start-up.

    :param registry: call ``registry.add(name, None, impl)``. ``impl`` is a callable
        ``impl(prompts, completions, examples) -> list[float]``: ``prompts`` and
        ``completions`` are lists of strings of equal length and ``examples`` the data
        rows (dicts) the prompts came from, so a verifier can read ``example["answer"]``.
        Algorithms name the rewards they use in their config (``algorithm.rewards``).

    All implementations are called; a duplicate name is an error.
    """


@hookspec
def gym_add_datasets(registry: Registry) -> None:
    """Register datasets / tasks.

    Called once at start-up.

    :param registry: call ``registry.add(name, config, impl)``. ``name`` becomes the
        option ``data=<name>``; ``config`` derives from
        :class:`gym_core.config.DataConfig`; ``impl(cfg)`` returns a
        :class:`gym_core.data.Task` with ``train`` and ``test`` lists of example dicts
        (each with at least ``prompt``; ``answer`` where a verifier needs it).

    All implementations are called; a duplicate name is an error.
    """


@hookspec
def gym_add_aggregators(registry: Registry) -> None:
    """Register delta aggregation rules (DeltaSoup: merging many contributors' deltas).

    Called once at start-up. ``name`` becomes the option ``soup=<name>`` of the soup app
    (``python -m gym_core.soup soup=<name> soup.inputs=[a,b,c]``).

    :param registry: call ``registry.add(name, config, impl)``. ``config`` derives from
        :class:`gym_core.config.SoupConfig` (inputs, weights, clipping and DP noise are
        its shared fields); ``impl`` subclasses :class:`gym_core.aggregate.Aggregator`:
        ``aggregate(deltas, weights, generator) -> Aggregate`` on the contributors'
        flattened fp32 deltas, and ``sensitivity(clip_norm, weights)`` for DP noise.

    All implementations are called; a duplicate name is an error.
    """


# ----------------------------------------------------------------------------------------
# Run lifecycle: called by the core loop on the main process, in this order
# ----------------------------------------------------------------------------------------


@hookspec
def gym_run_start(cfg: Any, run_dir: str, start_step: int) -> None:
    """A run is about to train.

    Called after the model is loaded and the starting policy evaluated, before the
    first step (also when a run resumes).

    :param cfg: the composed, resolved configuration (an OmegaConf ``DictConfig``).
    :param run_dir: the run's directory.
    :param start_step: ``0`` for a new run, the checkpoint's step when resuming.

    All implementations are called; return values are ignored.
    """


@hookspec
def gym_step_end(step: int, metrics: dict[str, float]) -> None:
    """An optimizer step finished.

    :param step: the number of optimizer steps taken so far (1 after the first).
    :param metrics: the step's metrics as plain floats (``loss``, ``reward_mean``,
        ``kl``, ``clip_fraction``, ``tokens_per_second``, ... whatever the algorithm
        and the core report); the same row is written to ``metrics.jsonl``.

    All implementations are called; return values are ignored.
    """


@hookspec
def gym_checkpoint_saved(step: int, path: str) -> None:
    """A checkpoint was written completely and atomically.

    :param step: the step it holds.
    :param path: its directory (``<run_dir>/checkpoints/step-<step>``).

    All implementations are called; return values are ignored.
    """


@hookspec
def gym_run_end(summary: dict[str, Any], run_dir: str) -> None:
    """The run finished and ``summary.json`` was written.

    :param summary: the summary's content (the same keys as the file).
    :param run_dir: the run's directory.

    All implementations are called; return values are ignored.
    """
