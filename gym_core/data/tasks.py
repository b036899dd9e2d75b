"""Tasks (train / test examples), chat rendering and a resumable, seeded sampler."""

from __future__ import annotations

import json
import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gym_core.base.errors import GymError


@dataclass
class Task:
    name: str
    train: list[dict[str, Any]]
    test: list[dict[str, Any]]
    metric: str | None = "accuracy"  # the reward that scores held-out answers (None: none)


def arithmetic_task(cfg) -> Task:
    """Additions over all operand pairs in [min_value, max_value]; the test pairs are a
    seeded random subset and never appear in train.

    Each example also carries a preference pair (``chosen``: the right answer written as
    the model writes it; ``rejected``: a plausible wrong one, off by one or by a missed
    carry), so preference methods (DPO, KTO) train on the same task."""
    # operands, test_size and template checked by ArithmeticConfig.validate
    values = range(cfg.min_value, cfg.max_value + 1)
    pairs = [(a, b) for a in values for b in values]
    rng = random.Random(cfg.seed)
    rng.shuffle(pairs)

    def example(a: int, b: int) -> dict[str, Any]:
        wrong = a + b + rng.choice([-10, -2, -1, 1, 2, 10])
        if wrong < 0:
            wrong = a + b + 1
        return {
            "prompt": cfg.template.format(a=a, b=b),
            "answer": str(a + b),
            "chosen": f"{a} + {b} = {a + b}",
            "rejected": f"{a} + {b} = {wrong}",
        }

    test = [example(a, b) for a, b in pairs[: cfg.test_size]]
    train = [example(a, b) for a, b in pairs[cfg.test_size :]]
    return Task("arithmetic", train, test)


def arithmetic_labels_task(cfg) -> Task:
    """The arithmetic task as unpaired, labelled completions (for KTO): each training
    pair becomes a desirable and an undesirable row, shuffled (as TRL's
    ``unpair_preference_dataset``). The test split keeps its pairs for preference
    accuracy."""
    paired = arithmetic_task(cfg)
    rows = [r for ex in paired.train for r in unpair(ex)]
    random.Random(cfg.seed + 1).shuffle(rows)
    return Task("arithmetic_labels", rows, paired.test)


def unpair(ex: dict[str, Any]) -> list[dict[str, Any]]:
    """A preference pair as two labelled rows (the chosen desirable, the rejected not)."""
    base = {k: v for k, v in ex.items() if k not in ("chosen", "rejected")}
    return [{**base, "completion": ex["chosen"], "label": True},
            {**base, "completion": ex["rejected"], "label": False}]


def read_jsonl(path: str | Path, required: list[str], *, with_lines: bool = False) -> list:
    """Rows of a JSONL file; a bad row is an error naming the file, line and field.
    ``with_lines``: (line number, row) pairs, for errors found later."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise GymError(f"data file {str(path)!r} is a directory ({p.resolve()}); name the "
                       "JSONL file itself")
    if not p.is_file():
        if p.exists():  # /dev/null, a FIFO, a socket: nothing a run can read rows from
            raise GymError(f"data file {str(path)!r} is not a regular file ({_kind(p)}); "
                           "name a JSONL file")
        raise GymError(f"data file {str(path)!r} does not exist (looked in {p.resolve()})")
    rows = []
    with p.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a BOM is fine
            except UnicodeDecodeError as exc:
                raise GymError(f"{p}:{lineno}: not UTF-8 text (byte {raw[exc.start]:#04x} at "
                               f"column {exc.start + 1}); JSONL files are UTF-8: re-encode "
                               "it (e.g. iconv -f latin1 -t utf-8)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise GymError(f"{p}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise GymError(f"{p}:{lineno}: expected a JSON object, got {type(row).__name__}")
            for key in required:
                if key not in row:
                    raise GymError(
                        f"{p}:{lineno}: missing field '{key}' (the row has: "
                        f"{', '.join(sorted(row)) or 'nothing'})"
                    )
            rows.append((lineno, row) if with_lines else row)
    if not rows:
        raise GymError(f"data file {p} holds no rows")
    return rows


JSONL_FORMATS = {
    "answer": ["prompt", "answer"],  # verifiable tasks (GRPO, evaluation)
    "pairs": ["prompt", "chosen", "rejected"],  # preference pairs (DPO, ORPO)
    "labels": ["prompt", "completion", "label"],  # unpaired labels (KTO)
    # TRL's SFT dataset shapes (docs/algorithms.md §7)
    "completion": ["prompt", "completion"],  # prompt-completion
    "messages": ["messages"],  # conversational: the loss on assistant turns
    "text": ["text"],  # plain language modelling
}


def jsonl_task(cfg) -> Task:
    """A user's JSONL file(s): ``{"prompt", "answer"}``, ``{"prompt", "chosen",
    "rejected"}``, ``{"prompt", "completion", "label"}``, or for SFT ``{"prompt",
    "completion"}``, ``{"messages"}`` or ``{"text"}`` per line (``data.format``, ``auto``
    picks by the first row's fields). Prompts and completions may be strings or chat
    message lists, as TRL's conversational datasets use; a pair without a ``prompt``
    takes the messages its chosen and rejected conversations share. A ``messages`` row's
    prompt is the conversation before its last assistant turn; a ``text`` row's prompt
    is its text (used only where a prompt is needed, such as BitDelta's calibration)."""
    fmt = cfg.format  # auto or a key of JSONL_FORMATS (the schema's JsonlFormat)

    def load(path):
        nonlocal fmt
        rows = read_jsonl(path, [], with_lines=True)
        if fmt == "auto":
            fmt = _detect_format(rows[0][1], cfg, path)
        fields = list(JSONL_FORMATS[fmt])
        if fmt == "answer":
            fields = [cfg.prompt_field, cfg.answer_field]
        elif fmt == "completion":
            fields = [cfg.prompt_field, "completion"]
        out, same = [], 0
        for lineno, row in rows:
            if fmt == "pairs" and cfg.prompt_field not in row and "chosen" in row:
                row = _split_implicit_prompt(row, path, lineno)
            missing = [f for f in fields if f not in row]
            if missing:
                raise GymError(f"{path}:{lineno}: missing field '{missing[0]}' for "
                               f"data.format={fmt} (the row has: {', '.join(sorted(row))})")
            where = f"{path}:{lineno}"
            if fmt == "answer":
                answer = row[cfg.answer_field]
                if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or (
                        isinstance(answer, float) and not math.isfinite(answer)):
                    raise GymError(f"{where}: field '{cfg.answer_field}' must be a string or a "
                                   f"finite number, got {_describe(answer)}")
                row = {**row, "prompt": row[cfg.prompt_field], "answer": str(answer)}
            elif fmt in ("completion", "messages", "text"):
                row = _sft_row(fmt, row, cfg.prompt_field, f"{path}:{lineno}")
            elif fmt == "pairs":
                for key in ("chosen", "rejected"):
                    if not isinstance(row[key], (str, list)):
                        raise GymError(f"{where}: field '{key}' must be a string or a list of "
                                       f"messages, got {_describe(row[key])}")
                row = {**row, "prompt": row[cfg.prompt_field]}
                if row["chosen"] == row["rejected"]:
                    same += 1
                    continue
            else:
                label = row["label"]
                if not isinstance(label, bool) and label not in (0, 1):
                    raise GymError(f"{where}: field 'label' must be true or false (a JSON "
                                   f"boolean), got {_describe(label)}")
                row = {**row, "prompt": row[cfg.prompt_field], "label": bool(label)}
            out.append(row)
        if same:
            warnings.warn(f"{path}: skipped {same} rows whose chosen and rejected are "
                          "identical (they carry no preference)", stacklevel=2)
        if not out:
            raise GymError(f"{path} holds no usable rows")
        return out

    train = load(cfg.train_file)
    if cfg.test_file:
        test = load(cfg.test_file)
    else:
        rows = list(train)
        random.Random(cfg.seed).shuffle(rows)
        n_test = max(1, int(len(rows) * cfg.test_fraction))
        if n_test >= len(rows):
            raise GymError(
                f"{cfg.train_file} has {len(rows)} rows: too few to hold out "
                f"data.test_fraction={cfg.test_fraction}; give data.test_file instead"
            )
        test, train = rows[:n_test], rows[n_test:]
    return Task("jsonl", train, test, metric="accuracy" if fmt == "answer" else None)


def _describe(value: Any) -> str:
    """A JSON value as an error names it: its kind, and short values themselves."""
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    return f"{type(value).__name__} {value}"


def _kind(p: Path) -> str:
    import stat

    mode = p.stat().st_mode
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a file"


#: the JSONL format each of TRL's dataset types is read as (gym_core.data.formats): a
#: prompt-only row is a verifiable one, whose answer the held-out accuracy checks
FORMAT_OF_TYPE = {"prompt_only": "answer", "preference": "pairs",
                  "unpaired_preference": "labels", "prompt_completion": "completion"}


def _detect_format(row: dict, cfg, path) -> str:
    """``data.format=auto``: the format of the first row: a prompt with an answer is a
    verifiable row; any other by its TRL dataset type
    (:func:`gym_core.data.formats.detect_type`, the one that ``data=hf`` uses), the
    fields ``data.prompt_field`` and ``data.answer_field`` read as prompt and answer."""
    from gym_core.data.formats import detect_type

    rename = {cfg.prompt_field: "prompt", cfg.answer_field: "answer"}
    columns = {rename.get(k, k) for k in row}
    if "prompt" in columns and "answer" in columns:
        # a verifiable row, whatever else it holds: the held-out accuracy checks its
        # answer, and a method that trains on its completion or pair still reads those
        return "answer"
    kind = detect_type(columns)
    if kind == "language_modeling":
        return "messages" if "messages" in columns else "text"
    if kind is not None and (kind != "prompt_only" or "answer" in columns):
        return FORMAT_OF_TYPE[kind]
    raise GymError(
        f"{path}: line 1 fits no data format (fields: {', '.join(sorted(row))}); expected "
        f"{cfg.prompt_field}+{cfg.answer_field}, prompt+chosen+rejected, "
        "prompt+completion+label, prompt+completion, messages or text (or set data.format)"
    )


def _sft_row(fmt: str, row: dict, prompt_field: str, where: str) -> dict:
    """A supervised row checked (``where`` is file:line): a non-empty completion, a
    conversation in turn order with an assistant turn, a non-empty text."""
    if fmt == "text":
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise GymError(f"{where}: field 'text' is empty or not a string")
        return {**row, "prompt": row["text"]}
    if fmt == "messages":
        messages = row["messages"]
        check_conversation(messages, where, "messages")
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return {**row, "prompt": messages[:last]}
    completion = row["completion"]
    if isinstance(completion, list):
        check_conversation(completion, where, "completion", reply=True)
    elif not isinstance(completion, str) or not completion.strip():
        raise GymError(f"{where}: field 'completion' is empty; every row needs the answer "
                       "to train on (a string, or assistant messages)")
    return {**row, "prompt": row[prompt_field]}


ROLES = ("system", "user", "assistant", "tool")


def check_conversation(messages: Any, where: str, field: str, *, reply: bool = False) -> None:
    """Raise :class:`GymError` naming ``where`` and ``field`` unless ``messages`` is a
    conversation in turn order: ``{"role", "content"}`` dicts, a system message only
    first, then a user turn, no two user (or assistant) turns in a row, and at least one
    assistant turn with content (or tool calls: a tool-use trace). ``reply``: the messages answer a prompt (they start
    with an assistant turn)."""
    if not isinstance(messages, list) or not messages:
        raise GymError(f"{where}: field '{field}' must be a non-empty list of messages")
    previous = "user" if reply else None
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise GymError(f"{where}: field '{field}' message {i} is not a "
                           '{"role": ..., "content": "..."} object')
        role = m["role"]
        if role not in ROLES:
            raise GymError(f"{where}: field '{field}' message {i} has role {role!r}, not one "
                           f"of {', '.join(ROLES)}")
        wrong = None
        if role == "system" and (i > 0 or reply):
            wrong = "a system message may only come first"
        elif role == "assistant" and previous not in ("user", "tool"):
            wrong = "an assistant turn must answer a user (or tool) turn"
        elif role == "user" and previous == "user":
            wrong = "two user turns in a row"
        elif role == "tool" and previous not in ("assistant", "tool"):
            wrong = "a tool message must follow an assistant turn"
        if wrong:
            raise GymError(f"{where}: field '{field}' is out of turn order at message {i} "
                           f"(role {role!r} after {previous or 'the start'}): {wrong}")
        if role == "assistant" and not m["content"].strip() and not m.get("tool_calls"):
            raise GymError(f"{where}: field '{field}' message {i} is an empty assistant turn")
        previous = role
    if not any(m["role"] == "assistant" for m in messages):
        raise GymError(f"{where}: field '{field}' has no assistant turn, so there is nothing "
                       "to train on (supervised fine-tuning learns the assistant's replies)")


def _split_implicit_prompt(row: dict, path, lineno: int) -> dict:
    """TRL's implicit-prompt pairs: chosen and rejected are whole conversations; the
    prompt is the messages they share, the completions what follows."""
    chosen, rejected = row["chosen"], row["rejected"]
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise GymError(f"{path}:{lineno}: missing field 'prompt'")
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise GymError(f"{path}:{lineno}: no 'prompt', and chosen and rejected share "
                       "no leading messages to take it from")
    return {**row, "prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def chat_messages(prompt: Any, system_prompt: str | None) -> list[dict[str, str]]:
    """A prompt as chat messages: a plain string becomes one user turn; a list of
    ``{"role", "content"}`` dicts (conversational data) is used as it is."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        messages = list(prompt)
    else:
        raise GymError(f"a prompt must be a string or a list of messages, got {prompt!r:.80}")
    if system_prompt and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def template_kwargs(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict]:
    """Messages as the chat template takes them, and its extra arguments: a ``tools``
    list riding on a message (a dataset's ``tools`` column, gym_core/data/formats.py)
    is passed as ``tools=...`` and removed from the messages."""
    tools = None
    clean = []
    for m in messages:
        if isinstance(m, dict) and "tools" in m:
            tools = m["tools"]
            m = {k: v for k, v in m.items() if k != "tools"}
        clean.append(m)
    return clean, ({"tools": tools} if tools else {})


def apply_template(tokenizer, messages: list[dict[str, Any]], **kwargs) -> str:
    """``tokenizer.apply_chat_template`` with the tools a conversation carries."""
    clean, extra = template_kwargs(messages)
    return tokenizer.apply_chat_template(clean, **kwargs, **extra)


def render_completion(tokenizer, prompt: Any, completion: Any, system_prompt: str | None) -> str:
    """The text that follows the rendered prompt when the assistant answers
    ``completion`` (a string or assistant messages), end-of-turn tokens included."""
    messages = chat_messages(prompt, system_prompt)
    reply = ([{"role": "assistant", "content": completion}] if isinstance(completion, str)
             else list(completion))
    prefix = apply_template(tokenizer, messages, tokenize=False, add_generation_prompt=True)
    full = apply_template(tokenizer, messages + reply, tokenize=False)
    if not full.startswith(prefix):
        raise GymError("the chat template renders the prompt differently when an answer "
                       "follows; cannot split prompt and completion")
    return full[len(prefix):]


def render_turns(tokenizer, messages: list[dict[str, str]]) -> list[tuple[str, int | None]]:
    """A conversation rendered with the chat template, cut where turns begin and end:
    ``(text, i)`` for assistant message i's reply (its content and end-of-turn tokens),
    ``(text, None)`` for everything else (other messages, the assistant header the
    template writes before a reply). The pieces concatenate to the whole rendering.

    Rendered turn by turn (a template without ``{% generation %}`` markers, such as
    SmolLM2's ChatML, cannot say which tokens are the assistant's otherwise): each
    prefix of the conversation must render as the start of the next one."""
    pieces: list[tuple[str, int | None]] = []
    done = ""

    def extend(text: str, tag: int | None) -> None:
        nonlocal done
        if not text.startswith(done):
            raise GymError(
                "the chat template renders a conversation's earlier turns differently once "
                "later turns follow, so its assistant turns cannot be told apart turn by turn")
        if len(text) > len(done):
            pieces.append((text[len(done):], tag))
        done = text

    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            extend(apply_template(tokenizer, messages[:i], tokenize=False,
                                                 add_generation_prompt=True), None)
            extend(apply_template(tokenizer, messages[: i + 1], tokenize=False), i)
        else:
            extend(apply_template(tokenizer, messages[: i + 1], tokenize=False), None)
    return pieces


def render_prompts(tokenizer, prompts: list[Any], system_prompt: str | None) -> list[str]:
    """Prompts rendered with the model's chat template, ready for generation."""
    return [
        apply_template(tokenizer,
            chat_messages(p, system_prompt), tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]


class Sampler:
    """Seeded epochs over the training examples; its position is saved in checkpoints so a
    resumed run sees the same examples an uninterrupted one would."""

    #: above this many rows an epoch's order is a numpy permutation, made once per epoch
    #: (a Python list of millions of ints would cost hundreds of MB at every step)
    LARGE = 1_000_000

    def __init__(self, n: int, seed: int, position: int = 0):
        if n == 0:
            raise GymError("the training split is empty")
        self.n, self.seed, self.position = n, seed, position
        self._epoch: tuple[int, Any] = (-1, None)

    def _order(self, epoch: int):
        if self.n > self.LARGE:
            if self._epoch[0] != epoch:
                import numpy as np

                rng = np.random.default_rng(self.seed * 1_000_003 + epoch)
                self._epoch = (epoch, rng.permutation(self.n))
            return self._epoch[1]
        order = list(range(self.n))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            epoch, offset = divmod(self.position, self.n)
            order = self._order(epoch)
            chunk = [int(i) for i in order[offset : offset + k - len(out)]]
            out.extend(chunk)
            self.position += len(chunk)
        return out
