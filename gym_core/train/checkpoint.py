"""Checkpoints: ``<run_dir>/checkpoints/step-<N>/`` holding the trainable weights
(safetensors) and the trainer state (optimizer, scheduler, RNG, step, data position).

Written into a temporary directory and renamed into place, so a crash never leaves a
half-written checkpoint where resume would look; the trainer state is read back with
``torch.load(weights_only=True)``, which unpickles tensors and plain containers only.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from gym_core.base.errors import GymError
from gym_core.base.files import TMP_MARK, atomic_path

WEIGHTS = "trainable.safetensors"
STATE = "trainer_state.pt"
INFO = "checkpoint.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (temporary directories are ignored)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / INFO).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy(), *n[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


HEADS_PREFIX = "gym_heads."  # the policy's heads (gym_core.model.policy.Policy.add_head)


def trainable_params(model: torch.nn.Module, heads: torch.nn.Module | None = None
                     ) -> dict[str, torch.nn.Parameter]:
    """The model's trainable parameters by name, and the heads' under ``gym_heads.``."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if heads is not None:
        named.update({HEADS_PREFIX + n: p for n, p in heads.named_parameters() if p.requires_grad})
    return named


def trainable_state(model: torch.nn.Module, heads: torch.nn.Module | None = None
                    ) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in trainable_params(model, heads).items()}


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler,
    extra: dict[str, Any],
    keep_last: int,
    heads: torch.nn.Module | None = None,
    protect: set[int] | frozenset[int] = frozenset(),
    gathered: tuple[dict, dict | None] | None = None,
) -> Path:
    """``gathered``: (trainable weights, optimizer state) already gathered from the
    shards of an FSDP run (:mod:`gym_core.train.fsdp`), written instead of the model's
    and optimizer's own, in the same layout."""
    final = checkpoints_dir(run_dir) / f"step-{step:06d}"
    # re-saving the same step (the end of a resumed, finished run) replaces it
    with atomic_path(final, folder=True) as tmp:
        weights, optimizer_state = gathered if gathered is not None else (
            trainable_state(model, heads), optimizer.state_dict() if optimizer else None)
        save_file(weights, str(tmp / WEIGHTS))
        state = {"rng": rng_state(), **extra}
        if optimizer is not None:
            state["optimizer"] = optimizer_state
            state["scheduler"] = scheduler.state_dict()
        # through a Python file object, so that a full disk surfaces as the OS error
        # (torch's own writer reports only "unexpected pos")
        with open(tmp / STATE, "wb") as fh:
            torch.save(state, fh)
        # the checksums of both files, checked before a resume reads them (a flipped bit
        # in the weights would otherwise train on silently)
        (tmp / INFO).write_text(json.dumps({"step": step, **{
            k: v for k, v in extra.items() if isinstance(v, (int, float, str))},
            "sha256": {n: file_sha256(tmp / n) for n in (WEIGHTS, STATE)}}))
    # ``protect``: steps kept whatever keep_last says (trainer.keep_best's checkpoint)
    kept = [(s, p) for s, p in list_checkpoints(run_dir) if s not in protect]
    for _, old in kept[:-keep_last] if keep_last > 0 else []:
        # renamed out of the listing first: a kill during the removal leaves a temporary
        # (cleared at the next start), never a half-deleted checkpoint that looks whole
        doomed = old.with_name(f".{old.name}{TMP_MARK}{os.getpid()}-pruned")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: Path) -> None:
    """The checkpoint's files match the checksums written with them (checkpoints from
    before gym 0.3 have none and are read as they are)."""
    try:
        info = json.loads((path / INFO).read_text(encoding="utf-8"))
        sums = info.get("sha256") if isinstance(info, dict) else None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise GymError(f"checkpoint {path} is unreadable ({path / INFO}: {exc}). Delete that "
                       "directory to resume from the one before it, or start a new run with "
                       "another run.name.") from None
    for name, want in (sums or {}).items():
        try:
            got = file_sha256(path / name)
        except OSError as exc:
            got = f"unreadable ({exc.strerror})"
        if got != want:
            raise GymError(
                f"checkpoint {path} is damaged: {name} does not match the checksum written "
                "with it (a bit flipped on disk, or the file was edited). Delete that "
                "directory to resume from the one before it, or start a new run with "
                "another run.name.")


def _unreadable(path: Path, exc: Exception) -> GymError:
    return GymError(f"checkpoint {path} is unreadable ({exc}). Delete that directory to "
                    "resume from the one before it, or start a new run with another run.name.")


def _name_mismatch(file: Path, missing: list[str], unexpected: list[str]) -> str:
    """The part of a message that says which tensor names ``file`` lacks and which it
    holds that the run has not (three of each at most, then how many more)."""
    def some(names):
        shown = ", ".join(repr(n) for n in names[:3])
        return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    parts = [f"holds {some(unexpected)} (not a trainable parameter of this run)"] \
        if unexpected else []
    parts += [f"lacks {some(missing)}"] if missing else []
    return f"{file} " + " and ".join(parts)


def check_checkpoint(path: Path, model: torch.nn.Module, heads: torch.nn.Module | None = None,
                     *, setup_checked: bool = False) -> None:
    """Refuse, in one line, a checkpoint this run cannot resume from: files that do not
    match their checksums, a weights file that does not open, tensor names or shapes that
    are not this run's trainable parameters'. Reads only the weights file's header, so a
    start can call it before it writes anything (gym_core.train.job). ``setup_checked``:
    the run's model and adapter settings were found equal to the ones its checkpoints were
    written with (run.json), so names that do not match can only be a damaged file."""
    from safetensors import safe_open

    verify(path)
    try:
        with safe_open(str(path / WEIGHTS), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:
        raise _unreadable(path, exc) from None
    params = trainable_params(model, heads)
    trainable = set(params)
    if set(shapes) != trainable:
        names = _name_mismatch(path / WEIGHTS, sorted(trainable - set(shapes)),
                               sorted(set(shapes) - trainable))
        if setup_checked:
            raise GymError(
                f"checkpoint {path} is damaged: {names}, although the run's model and "
                "model.lora settings are the ones it was written with (run.json), so the file "
                "was damaged or edited. Delete that directory to resume from the one before "
                "it, or start a new run with another run.name.")
        raise GymError(
            f"checkpoint {path} does not fit this run: {names}. Either the file is damaged "
            "(delete that directory to resume from the one before it) or it was written with "
            "another model or model.lora settings (use a new run.name for a different setup).")
    wrong = [(n, theirs, tuple(params[n].shape)) for n, theirs in shapes.items()
             if theirs != tuple(params[n].shape)]
    if wrong:
        n, theirs, ours = wrong[0]
        raise GymError(
            f"checkpoint {path} holds '{n}' of shape {list(theirs)} where this run's model "
            f"has {list(ours)}{f' (and {len(wrong) - 1} more)' if len(wrong) > 1 else ''}: "
            "it was written for a model of another shape; use a new run.name for a "
            "different model")


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler,
                    heads: torch.nn.Module | None = None, sharded=None, *,
                    checked: bool = False) -> dict[str, Any]:
    """Restore weights (the model's and the heads'), optimizer, scheduler and RNG; returns
    the saved extras. ``sharded``: the FSDP-sharded policy's
    :class:`gym_core.train.fsdp.Sharded` (every rank reads the full checkpoint and keeps
    its shards). ``checked``: the caller has run :func:`check_checkpoint` on it already
    (otherwise it runs here)."""
    if not checked:
        check_checkpoint(path, model, heads)
    try:
        weights = load_file(str(path / WEIGHTS))
        state = torch.load(path / STATE, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise _unreadable(path, exc) from exc
    params = trainable_params(model, heads)
    if sharded is not None:
        sharded.load_trainable(weights, HEADS_PREFIX)
    else:
        with torch.no_grad():
            for n, t in weights.items():
                params[n].copy_(t.to(params[n].device))
    if optimizer is not None:
        if sharded is not None:
            sharded.load_optimizer_state(optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return {k: v for k, v in state.items() if k not in ("optimizer", "scheduler", "rng")}
