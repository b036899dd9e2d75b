"""Tool-use SFT traces for env=calculator: arithmetic questions of data=arithmetic's
TRAINING split, each answered by a call to the calculator tool, the tool's result and a
final answer the calculator environment scores 1 (docs/agents.md, "SFT on tool-use
traces"). The held-out questions are never written: the script checks each row
against the held-out split of the same data settings.

    python docs/examples/calculator_traces.py --n 300 --out traces.jsonl
    python -m gym_core algorithm=sft data=jsonl data.train_file=traces.jsonl
    python -m gym_core env=calculator model.init=runs/<the sft run>

The data settings (--min-value, --max-value, --test-size, --data-seed) must be the ones
the env=calculator run uses (data=arithmetic's defaults by default), or its held-out
questions are another set.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from omegaconf import OmegaConf

from gym_core.config.schema import ArithmeticConfig
from gym_core.data.tasks import arithmetic_task
from gym_core.env.builtin import Calculator, calculator
from gym_core.env.config import EnvConfig
from gym_core.env.tools import Action, tool_schema

# final answers, in wordings the calculator environment reads (its last number)
ANSWERS = ("{a} + {b} = {v}", "The answer is {v}.", "{a} + {b} = {v}, so the answer is {v}.")


def traces(n: int, draw_seed: int = 0, **data) -> list[dict]:
    """``n`` traces from the training split of ``data=arithmetic`` with the settings
    ``data`` (ArithmeticConfig fields: min_value, max_value, test_size, seed), drawn
    with ``draw_seed``."""
    task = arithmetic_task(OmegaConf.structured(ArithmeticConfig(**data)))
    held_out = {ex["prompt"] for ex in task.test}
    pool = [ex for ex in task.train if ex["prompt"] not in held_out]
    if n > len(pool):
        raise SystemExit(f"--n {n}: the training split holds {len(pool)} questions; ask for "
                         "fewer or widen --min-value/--max-value")
    rng = random.Random(draw_seed)
    schema = tool_schema(calculator)
    rows = []
    for ex in rng.sample(pool, n):
        a, b = _operands(ex)
        expression = f"{a} + {b}"
        result = calculator(expression)
        final = rng.choice(ANSWERS).format(a=a, b=b, v=result)
        rows.append({"messages": [
            {"role": "user", "content": ex["prompt"]},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                "name": "calculator", "arguments": {"expression": expression}}}]},
            {"role": "tool", "content": result},
            {"role": "assistant", "content": final}], "tools": [schema]})
    _check(rows, held_out, task)
    return rows


def _operands(ex: dict) -> tuple[int, int]:
    """The operands of an arithmetic row, read back from its preference pair
    (``chosen`` is "a + b = a+b")."""
    left = ex["chosen"].split("=")[0]
    a, b = (int(x) for x in left.split("+"))
    return a, b


def _check(rows: list[dict], held_out: set[str], task) -> None:
    """Every trace asks a training question and its final answer scores 1."""
    answers = {ex["prompt"]: ex["answer"] for ex in task.train}
    env = Calculator(OmegaConf.structured(EnvConfig(name="calculator")))
    for row in rows:
        question = row["messages"][0]["content"]
        assert question not in held_out, question
        env.reset({"prompt": question, "answer": answers[question]})
        final = row["messages"][-1]["content"]
        assert env.step(Action(final, [], [], None))[1] == 1.0, final


def main(argv: list[str] | None = None) -> None:
    defaults = ArithmeticConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=300, help="how many traces (default 300)")
    p.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    p.add_argument("--seed", type=int, default=0, help="which questions and wordings")
    p.add_argument("--min-value", type=int, default=defaults.min_value)
    p.add_argument("--max-value", type=int, default=defaults.max_value)
    p.add_argument("--test-size", type=int, default=defaults.test_size)
    p.add_argument("--data-seed", type=int, default=defaults.seed,
                   help="data.seed of the run (which pairs are held out)")
    args = p.parse_args(argv)
    rows = traces(args.n, args.seed, min_value=args.min_value, max_value=args.max_value,
                  test_size=args.test_size, seed=args.data_seed)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} traces -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
