"""``python -m gym_core.export run=runs/<name> format=hf|gguf|lora|delta``: turn a
finished run into files other tools load.

    python -m gym_core.export run=runs/first                          # merged HF folder
    python -m gym_core.export run=runs/first format=gguf gguf.outtype=q8_0
    python -m gym_core.export run=runs/first format=lora              # PEFT / vLLM adapter
    python -m gym_core.export run=runs/first format=hf source=delta   # base + quantized delta

- ``hf``: a Hugging Face folder (safetensors, config, generation config, tokenizer) that
  ``AutoModelForCausalLM.from_pretrained`` loads without gym; ``hf.dtype`` picks the
  saved precision (the merge itself is fp32).
- ``gguf``: one GGUF file for llama.cpp (Llama-architecture models), ``gguf.outtype``
  f32 / f16 / bf16 / q8_0, tokenizer and chat template included.
- ``lora``: the adapter folder as PEFT and vLLM load it, pointing at its base model.
- ``delta``: the run's packed delta file (``source=final``: the exact fp32 delta instead).

``source=final`` takes the trained weights from ``final/`` (the adapter, or the full
model); ``source=delta`` rebuilds them from the quantized delta (what BitDelta /
DeltaQuant kept). Outputs go to ``out`` (default ``<run>/export/...``), written to a
temporary name and renamed into place, so a failed export leaves nothing half-written.
Start-up imports no torch.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from omegaconf import MISSING, DictConfig, OmegaConf

from gym_core.base.files import atomic_path, write_json

FORMATS = ("hf", "gguf", "lora", "delta")
# Written into folder exports (hf, lora): what the folder holds and where it came from;
# its presence also marks a folder a later export may replace.
RECORD = "gym_export.json"
HF_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class HfExportConfig:
    dtype: str = "float32"  # float32 | bfloat16 | float16: the saved weights' precision


@dataclass
class GgufExportConfig:
    # llama.cpp's convert_hf_to_gguf.py --outtype: f32 | f16 | bf16 | q8_0 (2-D weights;
    # norms stay f32)
    outtype: str = "f16"


@dataclass
class ExportAppConfig:
    run: str = MISSING  # a run directory: runs/<run.name>
    format: str = "hf"  # hf | gguf | lora | delta
    # final: the trained weights in final/ (adapter or full model), exact;
    # delta: base + the run's quantized delta. null: final (delta for format=delta)
    source: str | None = None
    out: str | None = None  # null: <run>/export/<format...>
    overwrite: bool = False  # replace an existing out= (an earlier export); else refused
    hf: HfExportConfig = field(default_factory=HfExportConfig)
    gguf: GgufExportConfig = field(default_factory=GgufExportConfig)


@dataclass
class Written:
    path: Path
    bytes: int
    note: str = ""


@dataclass
class ExportResult:
    format: str
    source: str
    out: Path
    what: str  # one line: what the export holds
    files: list[Written] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files)


def _check_options(cfg) -> None:
    from gym_core.base.errors import GymError
    from gym_core.deltas.merge import SOURCES

    if OmegaConf.is_missing(cfg, "run"):
        raise GymError("run= is required: the run directory to export, e.g. run=runs/first")
    if cfg.format not in FORMATS:
        raise GymError(f"format={cfg.format!r} is not one of {', '.join(FORMATS)}")
    if cfg.source is not None and cfg.source not in SOURCES:
        raise GymError(f"source={cfg.source!r} is not one of {', '.join(SOURCES)} (final: the "
                       "adapter or model in final/; delta: base + the run's quantized delta)")
    if cfg.hf.dtype not in HF_DTYPES:
        raise GymError(f"hf.dtype={cfg.hf.dtype!r} is not one of {', '.join(HF_DTYPES)}")
    from gym_core.deltas.gguf_file import OUTTYPES

    if cfg.gguf.outtype not in OUTTYPES:
        raise GymError(f"gguf.outtype={cfg.gguf.outtype!r} is not one of "
                       f"{', '.join(OUTTYPES)} (llama.cpp's --outtype names)")


def default_out(run, fmt: str, source: str, outtype: str) -> Path:
    root = run.path / "export"
    tag = "" if source == "final" else f"-{run.quant}"
    if fmt == "hf":
        return root / f"hf{tag}"
    if fmt == "gguf":
        return root / f"{run.name}{tag}-{outtype}.gguf"
    if fmt == "lora":
        return root / "lora"
    return root / ("delta-none.safetensors" if source == "final" else f"delta-{run.quant}.safetensors")


def _check_out(out: Path, run, is_dir: bool, overwrite: bool = False) -> None:
    """Refuse outputs that would replace the run's own files or something that is not an
    earlier export of the same kind."""
    from gym_core.base.errors import GymError

    target, run_dir = out.resolve(), run.path.resolve()
    protected = [run_dir / p for p in ("final", "delta", "checkpoints", ".hydra")]
    if target == run_dir or run_dir.is_relative_to(target) or \
            any(target == p or target.is_relative_to(p) for p in protected):
        raise GymError(f"out={out} would overwrite the run's own files in {run_dir}; pick "
                       "another out= (the default is under <run>/export/)")
    if not out.exists():
        return
    if is_dir:
        if not out.is_dir() or (any(out.iterdir()) and not (out / RECORD).is_file()):
            raise GymError(f"out={out} exists and was not written by gym export (no {RECORD} "
                           "in it); remove it or pick another out= (an earlier export there "
                           "would be replaced)")
    elif out.is_dir():
        raise GymError(f"out={out} is a directory; format needs a file name here, e.g. "
                       f"out={out / 'model.gguf'}")
    if not overwrite:
        raise GymError(f"out={out} already exists: add overwrite=true to replace it, or "
                       "pick another out=")


def _check_weights(run) -> None:
    """Each weights file in the run's ``final/`` opens (its header parses and covers the
    file: a file cut short or edited fails here, before anything is written)."""
    from safetensors import safe_open

    from gym_core.base.errors import GymError

    for file in sorted(run.final.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception as exc:  # SafetensorError, or an OSError reading it
            raise GymError(f"{file} is damaged ({exc}): it was cut short or edited; export "
                           "another run, or train this one again under a new run.name"
                           ) from None


@contextlib.contextmanager
def _writing(out: Path, run):
    """One line for what fails while an export reads the run and writes ``out``: a folder
    it cannot write in, a damaged (truncated) weights file in the run."""
    from gym_core.base.errors import GymError, disk_full, no_space

    try:
        yield
    except OSError as exc:
        if disk_full(exc):
            raise no_space(out.parent) from None
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                             errno.EISDIR, errno.EEXIST):
            raise
        raise GymError(f"cannot write out={out} ({exc.strerror}): pick another out= or make "
                       f"{out.parent} writable") from None
    except Exception as exc:
        from safetensors import SafetensorError

        if not isinstance(exc, SafetensorError) and "safetensors" not in type(exc).__module__:
            raise
        raise GymError(f"the run {run.path} holds a damaged weights file ({exc}): it was "
                       "cut short or edited; export another run, or train this one again "
                       "under a new run.name") from None


def _folder_files(folder: Path, final: Path) -> list[Written]:
    return [Written(final / p.relative_to(folder), p.stat().st_size)
            for p in sorted(folder.rglob("*")) if p.is_file()]


def export(cfg: Any, plugins) -> ExportResult:
    """Run one export (``cfg``: an :class:`ExportAppConfig`); returns what it wrote."""
    from gym_core.base.errors import GymError
    from gym_core.deltas.merge import TrainedRun, describe
    from gym_core.model.stages import base_identity

    _check_options(cfg)
    run = TrainedRun.open(cfg.run)
    fmt = cfg.format
    source = cfg.source or ("delta" if fmt == "delta" else "final")
    if fmt == "lora":
        if not run.lora:
            raise GymError(f"the run {run.path} trained the full model (model.finetune=full), "
                           "so it has no adapter to export; use format=hf")
        if source != "final":
            raise GymError("format=lora exports the run's adapter; a quantized delta is not an "
                           "adapter: use format=hf source=delta for base + delta")
    if source == "delta":
        run.delta_file()  # a missing delta fails before any model loads
    else:
        _check_weights(run)  # a damaged file fails here, for every format (lora copies it)
    out = Path(cfg.out).expanduser() if cfg.out else default_out(run, fmt, source, cfg.gguf.outtype)
    is_dir = fmt in ("hf", "lora")
    _check_out(out, run, is_dir, bool(cfg.get("overwrite", False)))
    from gym_core.base.files import check_can_create

    check_can_create(out, "out=")  # before any model loads
    writer = {"hf": _export_hf, "gguf": _export_gguf, "lora": _export_lora,
              "delta": _export_delta}[fmt]
    new_parent = not out.parent.exists()
    try:
        # written beside the target and renamed into place (gym_core.base.files): a failed
        # export leaves nothing, an earlier one stays until the new one is complete
        with _writing(out, run), atomic_path(out, folder=is_dir) as tmp:
            what, notes = writer(cfg, run, source, tmp, out, plugins)
            if is_dir:
                record = {"format": fmt, "source": source, "run": str(run.path.resolve()),
                          "base": describe(run),
                          # what gym_core.eval checks a folder's base model against
                          "base_model": base_identity(run.model),
                          "quant": run.quant if source == "delta" else None,
                          **({"dtype": cfg.hf.dtype} if fmt == "hf" else {})}
                write_json(tmp / RECORD, record)
            files = (_folder_files(tmp, out) if is_dir
                     else [Written(out, tmp.stat().st_size, notes)])
    finally:
        if new_parent and out.parent.is_dir() and not any(out.parent.iterdir()):
            out.parent.rmdir()  # a failed first export leaves no empty export/ behind
    return ExportResult(fmt, source, out, what, files)


def _describe_source(run, source: str) -> str:
    from gym_core.deltas.merge import describe

    base = describe(run)
    if source == "delta":
        return f"{base} + the {run.quant} delta ({run.delta_file()})"
    if run.lora:
        return f"{base} + the LoRA adapter in {run.final}, merged in fp32"
    return f"the fully fine-tuned model in {run.final}"


def _export_hf(cfg, run, source, tmp: Path, out: Path, plugins):
    import torch

    from gym_core.deltas.merge import load_merged

    model, tok = load_merged(run, source, plugins)
    model.to(getattr(torch, cfg.hf.dtype))
    model.save_pretrained(tmp)  # safetensors, config.json, generation_config.json
    tok.save_pretrained(tmp)
    return f"Hugging Face folder ({cfg.hf.dtype}) of {_describe_source(run, source)}", ""


def _export_gguf(cfg, run, source, tmp: Path, out: Path, plugins):
    from gym_core.deltas.gguf_file import tensor_types, write_gguf
    from gym_core.deltas.merge import describe, load_merged

    model, tok = load_merged(run, source, plugins)
    write_gguf(model, tok, tmp, cfg.gguf.outtype, name=run.name, base_name=describe(run))
    counts: dict[str, int] = {}
    for kind in tensor_types(tmp).values():
        counts[kind] = counts.get(kind, 0) + 1
    notes = "tensors: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    return f"GGUF {cfg.gguf.outtype} of {_describe_source(run, source)}", notes


def _export_lora(cfg, run, source, tmp: Path, out: Path, plugins):
    from gym_core.deltas.merge import base_model, describe

    for p in run.final.iterdir():
        if p.is_file() and p.name != "gym.json":
            shutil.copyfile(p, tmp / p.name)
    base = run.base_path()
    note = ""
    if base is None:
        # A base built in code (model=tiny) has no folder to point at: write it next to
        # the adapter, so PEFT's AutoPeftModelForCausalLM and vLLM find one.
        model, tok = base_model(run)
        model.save_pretrained(tmp / "base")
        tok.save_pretrained(tmp / "base")
        base = out.resolve() / "base"
        note = f"; {describe(run)} is built in code, so its weights are in {out / 'base'}"
    config_file = tmp / "adapter_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = str(base)
    config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return f"LoRA adapter (PEFT) for the base model {base}{note}", ""


def _export_delta(cfg, run, source, tmp: Path, out: Path, plugins):
    from gym_core.deltas.delta import FullPrecision, load_packed, save_packed
    from gym_core.deltas.merge import exact_delta, read_run_delta

    if source == "delta":
        src = run.delta_file()
        read_run_delta(src, plugins)  # a damaged file fails here, not in the user's hands
        shutil.copyfile(src, tmp)
        what = f"the run's {run.quant} delta ({src})"
    else:
        save_packed(FullPrecision(None).quantize(exact_delta(run)), tmp)
        what = f"the exact fp32 delta (quantizer none) of {run.final}"
    packed = load_packed(tmp)
    notes = (f"{packed.meta.get('quantizer')}, {packed.bits_per_weight:.4f} bits/weight, "
             f"{packed.num_params} weights")
    return what, notes


def human(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def report(result: ExportResult) -> str:
    lines = [f"gym export: format={result.format} source={result.source}: {result.what}"]
    for f in result.files:
        lines.append(f"  wrote {f.path}  {human(f.bytes)} ({f.bytes} bytes)"
                     + (f"  [{f.note}]" if f.note else ""))
    if len(result.files) > 1:
        lines.append(f"  total {human(result.total_bytes)} in {len(result.files)} files "
                     f"in {result.out}")
    return "\n".join(lines)


@hydra.main(version_base=None, config_path="pkg://gym_core.conf", config_name="export")
def main(cfg: DictConfig) -> None:
    import warnings

    from gym_core.base.errors import exit_on_user_error
    from gym_core.plugin.startup import bootstrap

    # raised inside peft/transformers on every LoRA model; not ours to fix
    warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated",
                            FutureWarning)
    # the export lists what it wrote; transformers' per-shard progress bars add nothing
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    with exit_on_user_error():
        result = export(cfg, bootstrap())
    print(report(result))


def entry() -> None:
    from hydra.core.config_store import ConfigStore

    from gym_core.base.errors import exit_on_user_error
    from gym_core.plugin.startup import bootstrap

    with exit_on_user_error():
        bootstrap()
        ConfigStore.instance().store(name="export_schema", node=ExportAppConfig)
        main()


if __name__ == "__main__":
    sys.exit(entry())
