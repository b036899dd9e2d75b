"""What ``eval.models`` names, and how each is loaded or reached.

- ``base``: the base model of the config's ``model=`` option;
- a run folder (``runs/x``): its trained model (``final/``: the adapter merged into its
  base, or the fully fine-tuned weights); ``delta:runs/x``: base + the run's quantized
  delta (BitDelta / DeltaQuant), what the quantizer kept;
- a checkpoint (``runs/x/checkpoints/step-000010``): the run's base with that step's
  trainable weights; a run's ``checkpoints`` folder: every checkpoint in it (the run's
  learning curve);
- an exported folder (``python -m gym_core.export``: a Hugging Face model folder, or a
  PEFT adapter folder pointing at its base);
- ``served:NAME``: the model NAME (the base or a variant) of a running
  ``python -m gym_core.serve`` at ``eval.server``, through its OpenAI API.

Every model must sit on the base model of ``model=`` (:func:`check_base`): runs record
their base (``final/gym.json``, ``.hydra/config.yaml``), gym's exports theirs
(``gym_export.json``), an adapter folder names its base's folder, and the server's
``/v1/models`` cards carry theirs (``base.identity``).
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from gym_core.base.errors import GymError

_STEP = re.compile(r"^step-(\d+)$")
CONFIG = Path(".hydra") / "config.yaml"


@dataclass
class ModelRef:
    spec: str  # as given in eval.models
    kind: str  # base | run | delta | checkpoint | folder | served
    key: str  # the results store's model name
    run: str | None  # the run folder (for learning curves), or None
    step: int  # training step: 0 for a base model, -1 when not known
    path: Path | None = None
    name: str | None = None  # served: the model name on the server

    @property
    def label(self) -> str:
        return self.key if self.step < 0 or self.kind in ("base", "served", "folder") \
            else f"{self.key}@{self.step}"


def resolve(spec: str, model_cfg, server: str | None, api_key: str | None = None, *,
            same_base: bool = True) -> list[ModelRef]:
    """The models one ``eval.models`` entry names (a ``checkpoints`` folder: several),
    checked; a bad entry is a one-line error naming it. ``same_base``: refuse a model
    whose base model is not ``model_cfg``'s, or is not known (:func:`check_base`)."""
    spec = str(spec).strip()

    def verify(what: str, theirs: dict | None, why: str = "") -> None:
        if same_base:
            check_base(spec, what, theirs, model_cfg, why)

    if spec == "base":
        from gym_core.model.policy import describe

        return [ModelRef(spec, "base", f"base:{describe(model_cfg)}", None, 0)]
    if spec.startswith("served:"):
        name = spec.removeprefix("served:")
        if not server:
            raise GymError(f"eval.models entry {spec!r} needs eval.server=URL (the address "
                           "of a running python -m gym_core.serve, e.g. http://127.0.0.1:8000)")
        cards = served_models(server, api_key)  # answers, or a one-line error
        if name not in cards:
            raise GymError(f"eval.models entry {spec!r}: {server} serves no model {name!r} "
                           f"(it serves: {', '.join(cards)})")
        base = cards[name].get("base")
        verify(f"the served model {name!r}",
               base.get("identity") if isinstance(base, dict) else None,
               why=f"{server} does not report it in /v1/models (not a gym_core.serve, "
                       "or an older one)")
        return [ModelRef(spec, "served", f"served:{server.rstrip('/')}#{name}", None, -1,
                         name=name)]
    kind = "run"
    if spec.startswith("delta:"):
        kind, spec_path = "delta", spec.removeprefix("delta:")
    else:
        spec_path = spec
    path = Path(spec_path).expanduser()
    if not path.exists():
        raise GymError(f"eval.models entry {spec!r}: {path} does not exist (give base, a run "
                       "folder, a checkpoint, an exported folder or served:NAME)")
    path = path.resolve()
    if kind == "delta":
        from gym_core.deltas.merge import TrainedRun

        run = TrainedRun.open(path)
        run.delta_file()  # a missing delta is an error before any model loads
        verify(*run_base(path))
        return [ModelRef(spec, "delta", f"{path}#{run.quant}", str(path), _final_step(path))]
    if path.name == "checkpoints" and (path.parent / CONFIG).is_file():
        from gym_core.train.checkpoint import list_checkpoints

        found = list_checkpoints(path.parent)
        if not found:
            raise GymError(f"eval.models entry {spec!r}: {path} holds no complete checkpoint")
        refs = [_checkpoint(spec, p) for _, p in found]
        verify(*run_base(path.parent))
        return refs
    if _STEP.match(path.name) and path.parent.name == "checkpoints":
        ref = _checkpoint(spec, path)
        verify(*run_base(path.parent.parent))
        return [ref]
    if (path / CONFIG).is_file():
        from gym_core.deltas.merge import TrainedRun

        TrainedRun.open(path)  # finished, readable config
        verify(*run_base(path))
        return [ModelRef(spec, "run", str(path), str(path), _final_step(path), path=path)]
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        verify(*folder_base(path, model_cfg))
        return [ModelRef(spec, "folder", str(path), None, -1, path=path)]
    jobs = sorted(p.name for p in path.iterdir() if (p / CONFIG).is_file()) \
        if path.is_dir() else []
    if jobs:
        raise GymError(f"eval.models entry {spec!r} is a sweep folder; name its jobs, e.g. "
                       f"{path / jobs[0]} (jobs: {', '.join(jobs)})")
    raise GymError(f"eval.models entry {spec!r}: {path} is not a run folder (.hydra/config.yaml), "
                   "a checkpoint (checkpoints/step-N), an exported model folder (config.json "
                   "or adapter_config.json), nor a run's checkpoints folder")


def check_base(spec: str, what: str, theirs: dict | None, model_cfg, why: str = "") -> None:
    """Refuse a model whose base model (a :func:`gym_core.model.stages.base_identity`)
    is not the one this evaluation is configured for, or cannot be established."""
    from gym_core.model.stages import base_identity, describe_identity

    mine = base_identity(model_cfg)
    if theirs is None:
        raise GymError(f"eval.models entry {spec!r}: the base model of {what} cannot be "
                       f"established ({why or 'nothing records it'}), so it cannot be checked "
                       f"against this evaluation's base ({describe_identity(mine)}); evaluate "
                       "models of that base only")
    if theirs != mine:
        raise GymError(f"eval.models entry {spec!r}: {what} is of another base "
                       f"({describe_identity(theirs)}) than this evaluation's "
                       f"({describe_identity(mine)}); evaluate it in its own python -m "
                       "gym_core.eval with that base's model= settings")


def run_base(run: Path) -> tuple[str, dict | None, str]:
    """(what to call a run in an error, its base model, why that may be unknown)."""
    from gym_core.model.stages import recorded_base

    return f"the run {run}", recorded_base(run), f"no final/gym.json nor readable {CONFIG}"


def folder_base(path: Path, model_cfg) -> tuple[str, dict | None]:
    """(what to call a model folder in an error, its base model). A folder
    gym exported records its run's base (``gym_export.json``); an adapter folder names its
    base model's folder; any other model folder is its own base (``model=local``)."""
    from gym_core.export import RECORD
    from gym_core.model.stages import base_identity, recorded_base

    what = f"the model folder {path}"
    record = path / RECORD
    if record.is_file():
        try:
            got = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            got = {}
        if isinstance(got.get("base_model"), dict):
            return what, got["base_model"]
        if got.get("run") and Path(got["run"]).is_dir():  # an export older than base_model
            return what, recorded_base(Path(got["run"]))
        return what, None
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        try:
            base = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get(
                "base_model_name_or_path")
        except (OSError, ValueError):
            base = None
        if not base or not Path(base).expanduser().is_dir():
            return f"the adapter folder {path} (its base {base!r} is not a local folder)", None
        return f"the adapter folder {path}", \
            folder_base(Path(base).expanduser().resolve(), model_cfg)[1]
    if model_cfg.source == "smollm2":
        from gym_core.model.policy import cache_root

        if path == (cache_root(model_cfg.cache_dir) / "smollm2-135m-instruct").resolve():
            return what, base_identity(model_cfg)
    return what, {"source": "local", "path": str(path)}


def _checkpoint(spec: str, path: Path) -> ModelRef:
    from gym_core.train.checkpoint import INFO, WEIGHTS

    if not (path / INFO).is_file() or not (path / WEIGHTS).is_file():
        raise GymError(f"eval.models entry {spec!r}: {path} is not a complete checkpoint (no "
                       f"{INFO} / {WEIGHTS}: a save cut short?); pick another step")
    run = path.parent.parent
    if not (run / CONFIG).is_file():
        raise GymError(f"eval.models entry {spec!r}: {run / CONFIG} is missing, so the "
                       "checkpoint's model settings are unknown")
    step = int(json.loads((path / INFO).read_text(encoding="utf-8")).get("step",
               _STEP.match(path.name).group(1)))
    return ModelRef(spec, "checkpoint", str(run), str(run), step, path=path)


def _final_step(run: Path) -> int:
    """The step a finished run ended at (its summary, else its newest checkpoint)."""
    summary = run / "summary.json"
    if summary.is_file():
        try:
            return int(json.loads(summary.read_text(encoding="utf-8"))["steps"])
        except (ValueError, KeyError, TypeError):
            pass
    from gym_core.train.checkpoint import list_checkpoints

    found = list_checkpoints(run)
    return found[-1][0] if found else -1


def run_model_config(run: Path):
    """A run's model settings (its .hydra/config.yaml), completed by the schema."""
    from gym_core.config.schema import ModelConfig

    try:
        raw = OmegaConf.load(run / CONFIG)
        return OmegaConf.merge(OmegaConf.structured(ModelConfig), raw.model)
    except Exception as exc:
        raise GymError(f"{run / CONFIG} has no readable 'model' section: "
                       f"{str(exc).splitlines()[0]}") from None


def run_system_prompt(run: str | None) -> str | None:
    if run is None or not (Path(run) / CONFIG).is_file():
        return None
    return OmegaConf.select(OmegaConf.load(Path(run) / CONFIG), "data.system_prompt")


def load(ref: ModelRef, model_cfg, plugins):
    """(model, tokenizer) of a local model reference, in eval mode on the CPU (fp32 for
    trained models: a merged delta is lost to bf16 rounding)."""
    from gym_core.model.policy import load_base

    if ref.kind == "base":
        return load_base(model_cfg)
    if ref.kind in ("run", "delta"):
        from gym_core.deltas.merge import TrainedRun, load_merged

        return load_merged(TrainedRun.open(ref.run), "final" if ref.kind == "run" else "delta",
                           plugins)
    if ref.kind == "checkpoint":
        return _load_checkpoint(ref)
    if ref.kind == "folder":
        return _load_folder(ref.path)
    raise ValueError(f"{ref.kind} models are not loaded locally")


def _load_checkpoint(ref: ModelRef):
    import torch
    from safetensors.torch import load_file

    from gym_core.model.policy import load_policy
    from gym_core.train.checkpoint import HEADS_PREFIX, WEIGHTS, trainable_params

    cfg = run_model_config(Path(ref.run))
    cfg.dtype = "float32"
    policy = load_policy(cfg, torch.device("cpu"))
    try:
        weights = load_file(str(ref.path / WEIGHTS))
    except Exception as exc:
        raise GymError(f"checkpoint {ref.path} is unreadable ({str(exc).splitlines()[0]})"
                       ) from None
    weights = {k: v for k, v in weights.items() if not k.startswith(HEADS_PREFIX)}
    params = trainable_params(policy.model)
    missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    wrong = [k for k in set(params) & set(weights) if params[k].shape != weights[k].shape]
    if missing or extra or wrong:
        from gym_core.model.policy import describe

        raise GymError(f"checkpoint {ref.path} does not fit the model its run names "
                       f"({describe(cfg)}, model.finetune={cfg.finetune}): missing "
                       f"{missing[:2]}, unexpected {extra[:2]}, other shapes {wrong[:2]}; "
                       "it was written for a model of another base or other LoRA settings")
    with torch.no_grad():
        for k, t in weights.items():
            params[k].copy_(t)
    model = policy.model
    if policy.lora:
        model = model.merge_and_unload()
    return model.eval().requires_grad_(False), policy.tokenizer


def _load_folder(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gym_core.model.policy import _set_up

    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        from peft import PeftModel

        base = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get(
            "base_model_name_or_path")
        if not base or not (Path(base) / "config.json").is_file():
            raise GymError(f"{path} is an adapter whose base model {base!r} is not a local "
                           "model folder; export it with format=hf instead")
        try:
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise GymError(f"the adapter in {path} does not fit its base {base} (a model of "
                           f"another base?): {str(exc).splitlines()[0]}") from None
        tok_dir = path if (path / "tokenizer_config.json").is_file() else Path(base)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise GymError(f"could not load the model in {path}: "
                           f"{str(exc).splitlines()[0]}") from None
        tok_dir = path
    try:
        tok = _set_up(AutoTokenizer.from_pretrained(tok_dir))
    except (OSError, ValueError) as exc:
        raise GymError(f"could not load the tokenizer in {tok_dir}: {exc}") from None
    return model.eval(), tok


# ----------------------------------------------------------------------------------------
# served models: python -m gym_core.serve's OpenAI API
# ----------------------------------------------------------------------------------------


def _request(server: str, path: str, body: dict | None, api_key: str | None,
             timeout: float = 600):
    url = server.rstrip("/") + path
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers,
                                 method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except Exception:
            message = exc.reason
        raise GymError(f"eval.server={server}: {path} answered {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise GymError(f"eval.server={server} does not answer ({reason}); start it with "
                       "python -m gym_core.serve, or fix the address") from None


def served_models(server: str, api_key: str | None) -> dict[str, dict]:
    """The models a running server lists (its base and variants): {name: model card};
    gym_core.serve's cards say which base model they sit on (``base``)."""
    got = _request(server, "/v1/models", None, api_key, timeout=10)
    return {m["id"]: m for m in got.get("data", []) if isinstance(m, dict) and "id" in m}


def served_completions(server: str, name: str, messages: list[dict], *, n: int,
                       temperature: float, top_p: float, max_tokens: int, seed: int,
                       api_key: str | None) -> list[str]:
    """``n`` completions of one chat prompt from the served model ``name``."""
    body = {"model": name, "messages": messages, "n": n, "max_tokens": max_tokens,
            "temperature": temperature, "top_p": top_p, "seed": seed}
    got = _request(server, "/v1/chat/completions", body, api_key)
    choices = sorted(got["choices"], key=lambda c: c["index"])
    return [c["message"]["content"] or "" for c in choices]
