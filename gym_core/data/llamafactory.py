"""LLaMA-Factory's dataset registry: ``data.dataset_info`` (its ``dataset_info.json``, or
the folder holding it) and ``data.dataset`` (an entry's name), so datasets registered for
LLaMA-Factory train in gym unchanged.

An entry names its data (``file_name``: a file or folder beside the json;
``hf_hub_url``: a hub id, read from the local cache), its ``formatting`` (``alpaca``,
the default, or ``sharegpt``), ``ranking`` (preference pairs), ``columns`` (which of the
data's columns hold what) and, for sharegpt, ``tags`` (the message keys and role
names). Rows become TRL-type examples:

- alpaca: ``instruction`` + ``input`` (joined by a newline) is the prompt, after the
  ``history`` pairs as earlier turns; ``output`` the completion (prompt-completion), or
  ``chosen``/``rejected`` with ``ranking``, or a ``kto_tag`` label (unpaired preference).
- sharegpt: the ``conversations`` messages (``from``/``value``, roles ``human``,
  ``gpt``, ``observation``, ``function_call``, ``system``) as a conversation (language
  modelling); with ``ranking`` the conversation is the prompt and ``chosen``/``rejected``
  single assistant messages; with ``kto_tag`` the last message is the completion.
- a ``system`` column and a ``tools`` column are passed on as everywhere in ``data=hf``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gym_core.base.errors import GymError

ALPACA = {"prompt": "instruction", "query": "input", "response": "output", "history": None,
          "system": None, "tools": None, "chosen": "chosen", "rejected": "rejected",
          "kto_tag": None}
SHAREGPT = {"messages": "conversations", "system": None, "tools": None, "chosen": "chosen",
            "rejected": "rejected", "kto_tag": None}
TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human",
        "assistant_tag": "gpt", "observation_tag": "observation",
        "function_tag": "function_call", "system_tag": "system"}


def read_registry(path: str) -> tuple[Path, dict[str, Any]]:
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "dataset_info.json"
    if not p.is_file():
        raise GymError(f"data.dataset_info={path}: no such file (looked for {p.resolve()})")
    try:
        info = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise GymError(f"data.dataset_info={path}: not valid JSON ({exc})") from None
    if not isinstance(info, dict):
        raise GymError(f"data.dataset_info={path}: expected an object of named datasets")
    return p, info


def load_registered(src, cfg, label: str, source: str | None):
    import datasets

    from gym_core.data.hf import Rows, _explain, _hold_out, _limit

    path, info = read_registry(src.dataset_info)
    name = src.dataset
    if not name or name not in info:
        raise GymError(f"{label}.dataset={name!r} is not in {path} (it lists "
                       f"{', '.join(sorted(info)) or 'nothing'})")
    entry = info[name]
    where = f"{path}:{name}"
    fmt = entry.get("formatting", "alpaca")
    if fmt not in ("alpaca", "sharegpt"):
        raise GymError(f"{where}: formatting {fmt!r} is not alpaca or sharegpt")
    columns = {**(ALPACA if fmt == "alpaca" else SHAREGPT), **entry.get("columns", {})}
    tags = {**TAGS, **entry.get("tags", {})}
    ranking = bool(entry.get("ranking", False))
    kwargs: dict[str, Any] = {"cache_dir": cfg.cache_dir} if cfg.cache_dir else {}
    try:
        if entry.get("file_name"):
            target = path.parent / entry["file_name"]
            if target.is_dir():
                files = sorted(str(f) for f in target.iterdir() if f.is_file())
            elif target.is_file():
                files = [str(target)]
            else:
                raise GymError(f"{where}: file_name {entry['file_name']!r} does not exist "
                               f"(looked in {target.resolve()})")
            from gym_core.data.hf import BUILDERS

            builder = BUILDERS.get(Path(files[0]).suffix.lower()) if files else None
            if builder is None:
                raise GymError(f"{where}: cannot read {entry['file_name']!r} (json, jsonl, "
                               "csv, parquet or arrow)")
            loaded = datasets.load_dataset(builder, data_files={"train": files}, **kwargs)
            split = "train"
        elif entry.get("hf_hub_url"):
            loaded = datasets.load_dataset(entry["hf_hub_url"], entry.get("subset"), **kwargs)
            split = entry.get("split", "train")
        else:
            raise GymError(f"{where}: the entry names no file_name or hf_hub_url")
    except GymError:
        raise
    except Exception as exc:
        raise GymError(f"{where}: {_explain(exc, src)}") from None
    if split not in loaded:
        raise GymError(f"{where}: no split {split!r} (it has {', '.join(loaded)})")
    ds = _limit(loaded[split], cfg)
    need = ([columns["prompt"]] if fmt == "alpaca" else [columns["messages"]])
    need += [columns["chosen"], columns["rejected"]] if ranking else (
        [columns["response"]] if fmt == "alpaca" else [])
    missing = [c for c in need if c and c not in ds.column_names]
    if missing:
        raise GymError(f"{where}: missing column(s) {', '.join(missing)} for {fmt}"
                       f"{' ranking' if ranking else ''} data (the data has: "
                       f"{', '.join(ds.column_names)}); fix the entry's \"columns\"")
    if len(ds) == 0:
        raise GymError(f"{where}: the data holds no rows")
    if columns.get("kto_tag"):
        kind = "unpaired_preference"
    elif ranking:
        kind = "preference"
    else:
        kind = "prompt_completion" if fmt == "alpaca" else "language_modeling"
    convert = _alpaca if fmt == "alpaca" else _sharegpt

    def transform(row: dict, at: str) -> dict:
        return convert(row, columns, tags, ranking, at)

    skip, test = _hold_out(ds, src, cfg, where)
    rows = (Rows(ds, kind, where, source, transform, skip=skip),
            Rows(test, kind, where, source, transform))
    rows[0][0]
    return rows


def _common(row, columns, out):
    if columns.get("system") and row.get(columns["system"]):
        out["system"] = row[columns["system"]]
    if columns.get("tools") and row.get(columns["tools"]):
        out["tools"] = row[columns["tools"]]
    return out


def _alpaca(row, columns, tags, ranking, where) -> dict:
    text = row.get(columns["prompt"])
    if not isinstance(text, str) or not text.strip():
        raise GymError(f"{where}: column {columns['prompt']!r} (the instruction) is empty")
    query = row.get(columns["query"]) if columns.get("query") else None
    if isinstance(query, str) and query.strip():
        text = f"{text}\n{query}"
    prompt: Any = text
    history = row.get(columns["history"]) if columns.get("history") else None
    if history:
        turns = []
        for pair in history:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise GymError(f"{where}: column {columns['history']!r} must hold "
                               "[question, answer] pairs")
            turns += [{"role": "user", "content": str(pair[0])},
                      {"role": "assistant", "content": str(pair[1])}]
        prompt = [*turns, {"role": "user", "content": text}]
    out: dict[str, Any] = {"prompt": prompt}
    if ranking:
        out["chosen"], out["rejected"] = row[columns["chosen"]], row[columns["rejected"]]
    else:
        out["completion"] = row[columns["response"]]
    if columns.get("kto_tag"):
        out["label"] = row.get(columns["kto_tag"])
    return _common(row, columns, out)


def _sharegpt(row, columns, tags, ranking, where) -> dict:
    roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant",
             tags["observation_tag"]: "tool", tags["function_tag"]: "assistant",
             tags["system_tag"]: "system"}

    def message(m, i):
        if not isinstance(m, dict) or tags["role_tag"] not in m or tags["content_tag"] not in m:
            raise GymError(f"{where}: message {i} is not an object with "
                           f"{tags['role_tag']!r} and {tags['content_tag']!r}")
        role = roles.get(m[tags["role_tag"]])
        if role is None:
            raise GymError(f"{where}: message {i} has role {m[tags['role_tag']]!r}, not one "
                           f"of {', '.join(roles)} (set the entry's \"tags\")")
        return {"role": role, "content": str(m[tags["content_tag"]])}

    raw = row.get(columns["messages"])
    if not isinstance(raw, list) or not raw:
        raise GymError(f"{where}: column {columns['messages']!r} must be a non-empty list of "
                       "messages")
    messages = [message(m, i) for i, m in enumerate(raw)]
    out: dict[str, Any] = {}
    if ranking:
        out["prompt"] = messages
        out["chosen"] = [message(row[columns["chosen"]], "chosen")]
        out["rejected"] = [message(row[columns["rejected"]], "rejected")]
    elif columns.get("kto_tag"):
        out["prompt"], out["completion"] = messages[:-1], [messages[-1]]
        out["label"] = row.get(columns["kto_tag"])
    else:
        out["messages"] = messages
    return _common(row, columns, out)
