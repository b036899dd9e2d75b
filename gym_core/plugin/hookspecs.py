"""The hook specifications: gym's plugin contract.

A plugin is a module (or object) holding functions decorated with
:data:`gym_core.api.hookimpl` whose names match the specs below. gym finds plugins
through the ``gym_core`` entry-point group (built-in plugins use the same group)::

    # pyproject.toml of a plugin distribution
    [project.entry-points."gym_core"]
    myalgo = "gym_myalgo"

Registration hooks receive a *registry* and call ``registry.add(...)`` on it (as tox's
``tox_register_tox_env`` does) instead of returning values that gym would have to merge.
Every component registered this way becomes a Hydra config-group option named after it:
``algorithm=<name>``, ``quant=<name>``, ``data=<name>``, ``soup=<name>``, ``env=<name>``. A plugin may
declare families of its own (:func:`gym_add_families`), with their own hook specs and
config group, as gym's training-free GRPO plugin does for its experience stores.

Registration hooks run while gym starts, before any heavy import: keep the module that
holds them cheap to import (no torch at module level) and point ``registry.add`` at the
implementation lazily with a ``"module:attribute"`` string.

Lifecycle hooks are called by the core training loop, on the main process only (rank 0
under ``torchrun``); every implementation is called and return values are ignored.

The "Hook reference" of docs/plugins.md is generated from these docstrings
(``python -m gym_core.plugin.hookdocs``); a test fails when the two differ.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from gym_core.plugin.manager import Families
    from gym_core.plugin.registry import Registry

#: The pluggy project name, also the entry-point group plugins are declared in.
PROJECT = "gym_core"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ----------------------------------------------------------------------------------------
# Registration: called once per process, when gym starts (gym_core.plugin.startup.bootstrap)
# ----------------------------------------------------------------------------------------


@hookspec
def gym_add_families(families: Families) -> None:
    """Declare new families of components, each with its own registration hook and
    config group (as pytest's ``pytest_addhooks`` adds hook specs).

    Called once at start-up, before any registration hook.

    :param families: call ``families.add(name, hook=..., specs=...)`` for each family:
        ``name`` becomes a config group (``name=<option>`` on the command line), ``hook``
        is the name of its registration hook and ``specs`` the module (or class) holding
        that hook's spec, decorated with ``gym_core.api.hookspec``. Other plugins then
        implement ``hook`` exactly like the core's registration hooks.

    All implementations are called; declaring a family name twice is an error.

    A family's group is not in every run's config: an option that uses it pulls it in
    with a Hydra defaults list in its config dataclass, so the family's key appears only
    when that option is selected::

        @dataclass
        class JudgedConfig(OnlineAlgorithmConfig):
            defaults: list[Any] = field(
                default_factory=lambda: [{"/judge@_global_.judge": "exact"}, "_self_"])
            name: str = "judged"

    ``python -m gym_core algorithm=judged judge=fuzzy`` then selects the ``fuzzy``
    option of the ``judge`` family; with another algorithm, ``judge=...`` is an error
    that names the plugin owning the group. gym's ``cl_grpo`` plugin declares its
    ``experience_store`` and ``llm`` families this way (``gym_cl_grpo/hookspecs.py``).
    """


@hookspec
def gym_add_algorithms(registry: Registry) -> None:
    """Register training algorithms (the *trainer* family).

    Called once at start-up, before Hydra composes the configuration.

    :param registry: call ``registry.add(name, config, impl)`` for each algorithm.
        ``name`` becomes the option ``algorithm=<name>``; ``config`` is a dataclass
        deriving from ``OfflineAlgorithmConfig`` (learns from given completions),
        ``OnlineAlgorithmConfig`` (learns from its own samples; the rollout engine reads
        its sampling fields and ``rewards``) or ``GroupPolicyConfig`` (group
        policy-gradient methods); ``impl`` subclasses ``Algorithm`` (or
        ``GroupPolicyGradient``), or is a ``"module:Class"`` string resolved only when a
        run selects it. All of these come from ``gym_core.api``.

    All implementations are called; registering a name twice is an error that names
    both plugins.

    The algorithm holds the method's math only; the core loop owns the optimizer,
    schedule, accumulation, clipping, DDP, checkpoints and logging. What the core calls,
    in order:

    - ``check_data(train)`` once, before the slow work: raise ``GymError`` when the
      examples cannot serve the method.
    - ``setup(cfg, run_dir, plugins)`` once: open what the method needs from other
      config groups.
    - per step, for each micro-batch: online methods get a ``Rollout`` from the core's
      rollout engine (``num_generations`` samples per prompt from one batched, KV-cached
      call, rewards applied); offline methods build their batch in ``collate(examples)``,
      usually with ``policy.encode(prompts, completions, ...)``, which renders prompts
      exactly as rollouts and evaluation do (chat template, ``data.system_prompt``) and
      returns a ``CompletionBatch``. Then ``prepare(batch)`` without gradients
      (advantages, old and reference log-probs).
    - ``prepare_step(batches)`` once per step, without gradients, with all of this
      rank's batches: statistics over the whole step (a batch-wide std, advantage
      whitening), reduced over ranks with ``sum_over_ranks``.
    - ``step_totals(batches)``: counts over the whole step that step-level normalisers
      divide by (the default counts ``len(batch)`` sequences and
      ``batch.completion_mask`` tokens).
    - ``step(batches, totals, updater)``: one optimizer step. The default runs
      ``updates_per_step`` updates, each ``updater.update(batches, loss_fn)`` with
      ``loss_fn(batch) = self.loss(batch, totals)`` returning this micro-batch's share of
      the step's loss and its metrics. A training-free method (``trains_weights =
      False``: no optimizer, ``updater`` is ``None``) overrides ``step`` to learn its
      own way and returns its metrics.

    Log-probabilities come from ``self.policy.logprobs(batch, reference=False)`` only:
    under ``torchrun`` it runs through DDP, so gradients are all-reduced. Calling the
    model or a log-prob function yourself would train each rank on its own gradients; gym
    refuses that with an error (a raw log-prob call with gradients on a distributed
    run), and checks after every step that the ranks' weights are identical. Online
    methods' log-probs are of the sampling distribution, softmax(logits /
    ``algorithm.temperature``). A method that needs more than log-probs from the same
    pass (a value head) adds a trainable module with ``policy.add_head(name, module)``
    in ``__init__``: it reads the final hidden states, and ``policy.logprobs(batch,
    heads=True)`` returns ``(logprobs, {name: output})``; its parameters are trained,
    checkpointed and all-reduced with the policy's.
    """


@hookspec
def gym_add_quantizers(registry: Registry) -> None:
    """Register delta quantizers (the *quantizer* family).

    Called once at start-up.

    :param registry: call ``registry.add(name, config, impl)``; ``name`` becomes
        ``quant=<name>``. ``config`` derives from ``QuantConfig`` (or
        ``MatrixQuantConfig``); ``impl`` subclasses ``Quantizer`` (or, for schemes that
        compress each matrix on its own, ``MatrixQuantizer``, which selects the target
        matrices, stores everything else exactly and records shapes and the quantizer's
        name). All of these come from ``gym_core.api``.

    All implementations are called; a duplicate name is an error.

    ``quantize(delta) -> PackedDelta`` gets the fine-tune's delta (fp32 tensors keyed like
    the base model's parameters) and returns the tensors to store plus string metadata
    naming the quantizer, so that a file is only ever decoded by its own quantizer;
    ``dequantize(packed) -> delta`` rebuilds fp32 tensors and refuses a file whose
    tensors do not have the sizes and dtypes its metadata promises. Pack bits for real:
    the stated bits per weight is measured from the safetensors file.
    ``calibrate(packed, ctx)`` may improve the packed delta with data (BitDelta's scale
    distillation; the default does nothing) and ``stats()`` adds facts to the run's
    ``summary.json``. ``map_tensors(fn, delta)`` spreads per-matrix work over the cores.
    ``operators(packed)`` serves the delta (``python -m gym_core.serve``): each matrix as
    a ``DeltaOperator`` applied to activations; the default decodes one matrix per call,
    a fast one works on the packed form (BitDelta's).
    """


@hookspec
def gym_add_rewards(registry: Registry) -> None:
    """Register reward functions by name.

    Called once at start-up.

    :param registry: call ``registry.add(name, None, impl)``. ``impl`` is a ``Reward``:
        ``impl(prompts, completions, examples) -> list[float | None]``, where ``prompts``
        and ``completions`` are lists of strings of equal length and ``examples`` the data
        rows (dicts) the prompts came from, so a verifier can read ``example["answer"]``.
        ``None`` marks a completion the function does not apply to. Online algorithms
        name their rewards in ``algorithm.rewards`` (weights in
        ``algorithm.reward_weights``); each is logged as ``rewards/<name>``.

    All implementations are called; a duplicate name is an error.
    """


@hookspec
def gym_add_datasets(registry: Registry) -> None:
    """Register datasets / tasks.

    Called once at start-up.

    :param registry: call ``registry.add(name, config, impl)``. ``name`` becomes the
        option ``data=<name>``; ``config`` derives from ``DataConfig``; ``impl(cfg)``
        returns a ``Task`` with ``train`` and ``test`` lists of example dicts (each with
        at least ``prompt``, a string or a list of chat messages; ``answer`` where a
        verifier needs it; ``chosen``/``rejected`` or ``completion``/``label`` for
        preference methods; ``completion``, ``messages`` or ``text`` for supervised
        fine-tuning) and the reward that scores held-out answers. Read files from paths
        in the config; never download at run time.

    All implementations are called; a duplicate name is an error.
    """


@hookspec
def gym_add_aggregators(registry: Registry) -> None:
    """Register delta aggregation rules (DeltaSoup: merging many contributors' deltas).

    Called once at start-up. ``name`` becomes the option ``soup=<name>`` of the soup app
    (``python -m gym_core.soup soup=<name> soup.inputs=[a,b,c]``).

    :param registry: call ``registry.add(name, config, impl)``. ``config`` derives from
        ``SoupConfig`` (inputs, weights, clipping and DP noise are its shared fields);
        ``impl`` subclasses ``Aggregator``: ``aggregate(deltas, weights, generator) ->
        Aggregate`` on the contributors' flattened fp32 deltas (one row each), saying
        which contributors the rule left out, and ``sensitivity(clip_norm, weights)``,
        the bound on one contributor's influence that the DP noise is scaled to.

    All implementations are called; a duplicate name is an error.
    """


@hookspec
def gym_add_environments(registry: Registry) -> None:
    """Register multi-turn, tool-using environments (the *env* family, docs/agents.md).

    Called once at start-up.

    :param registry: call ``registry.add(name, config, impl)``. ``name`` becomes the
        option ``env=<name>``; ``config`` derives from ``EnvConfig`` (the per-episode
        limits: ``max_turns``, ``max_tokens``, ``max_seconds``, ``max_observation_tokens``,
        ``gamma``, ``tool_timeout``); ``impl`` subclasses ``Environment`` (or is a
        ``"module:Class"`` string). All of these come from ``gym_core.api``.

    All implementations are called; a duplicate name is an error.

    With ``env=<name>`` an online algorithm's rollouts are episodes: the core makes one
    ``impl(cfg)`` per episode, ``reset(row) -> Observation`` (chat messages and the tools
    offered: typed Python functions whose JSON schemas come from their signatures and
    docstrings), then ``step(action) -> (observation, reward, done, info)`` after each
    model turn. The environment's replies are appended to the model's context as tokens
    and are not trained on; rewards are the environment's, per turn. An environment that
    raises or returns the wrong types ends its episode with a recorded error, never the
    run. ``gym_core.contracts.environment.EnvironmentContract`` checks an implementation.
    """


@hookspec
def gym_add_loggers(registry: Registry) -> None:
    """Register experiment trackers (the *logger* family): where a run's metrics, config,
    summary and final artifacts go besides its folder.

    Called once at start-up. ``name`` becomes an option of ``logger``, a list:
    ``logger=[tensorboard,wandb]`` selects several at once (the default is
    ``[tensorboard]``, ``logger=[]`` none), each configured under ``logger.<name>``.

    :param registry: call ``registry.add(name, config, impl)``. ``config`` derives from
        ``LoggerConfig``; ``impl`` subclasses ``Tracker`` (both from ``gym_core.api``),
        usually as a ``"module:Class"`` string so that the tracker's library is imported
        only when a run selects it. gym calls, on the main process:
        ``start(cfg, run_dir, start_step)`` before the first step,
        ``log_metrics(step, metrics)`` after each step (the row metrics.jsonl gets,
        finite numbers only), ``log_summary(summary, artifacts)`` once summary.json is
        written (``artifacts``: the ``summary``, ``final`` and ``delta`` paths that exist)
        and ``close(ok)`` at the end (``ok=False``: the run failed or was interrupted).

    All implementations are called; a duplicate name is an error. gym's own trackers:
    ``tensorboard`` (the core), ``wandb`` and ``mlflow`` (plugins ``gym_wandb`` and
    ``gym_mlflow``, their libraries in the extras of the same names).
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
def gym_step_end(step: int, metrics: dict[str, float], run_dir: str) -> None:
    """An optimizer step finished.

    :param step: the number of optimizer steps taken so far (1 after the first).
    :param metrics: the step's metrics as plain floats (``loss``, ``reward_mean``,
        ``kl``, ``grad_norm``, ``tokens_per_second``, ``step_seconds``, and
        ``generate_seconds`` for online methods or ``collate_seconds`` for offline ones,
        ... whatever the algorithm and the core report); the same row is written to
        ``metrics.jsonl``.
    :param run_dir: the run's directory.

    All implementations are called; return values are ignored. A logger plugin is this
    hook alone::

        @hookimpl
        def gym_step_end(step, metrics):
            print(step, metrics["loss"])
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
