"""The built-in environments: ``env=calculator``, ``env=python`` (countdown with a
sandboxed Python tool) and ``env=wordle``, and the tasks the latter two play."""

from __future__ import annotations

import ast
import operator
import random
import re
from typing import Any

from gym_core.base.errors import GymError
from gym_core.data.rewards import extract_answer
from gym_core.data.tasks import Task
from gym_core.env.base import Environment, Observation
from gym_core.env.tools import Action

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
        ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}


def evaluate(expression: str) -> float | int:
    """An arithmetic expression's value (numbers, + - * / // % **, parentheses) without
    ``eval``; ValueError for anything else."""
    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.operand))
        raise ValueError(f"not arithmetic: {ast.dump(node)[:60]}")

    if len(expression) > 200:
        raise ValueError("expression longer than 200 characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an expression: {exc.msg}") from None
    return walk(tree)


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: the expression, e.g. "12 * (3 + 4)"; numbers, + - * / // % ** and parentheses
    """
    try:
        value = evaluate(expression)
    except (ValueError, ZeroDivisionError, OverflowError) as exc:
        return f"error: {exc}"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _same_number(text: str | None, answer: str) -> bool:
    if text is None:
        return False
    try:
        return abs(float(text) - float(answer)) < 1e-6
    except ValueError:
        return text.strip() == answer.strip()


class Calculator(Environment):
    """Arithmetic (rows with ``prompt`` and ``answer``, e.g. data=arithmetic) where the
    model may call a calculator; the final answer (a turn without a tool call) scores 1
    when its last number is the answer."""

    def check_row(self, row):
        if "prompt" not in row or "answer" not in row:
            raise GymError(f"env={self.cfg.name} needs rows with 'prompt' and 'answer' (such "
                           f"as data=arithmetic); this row has {sorted(row)}")

    def tools(self):
        return [calculator]

    def score(self, action: Action) -> float:
        return 1.0 if _same_number(extract_answer(action.content), str(self.row["answer"])) \
            else 0.0


# ---------------------------------------------------------------------------- countdown


def countdown_task(cfg) -> Task:
    """Seeded countdown problems with a known solution: ``numbers`` and a ``target``
    some arithmetic expression of them reaches."""
    rng = random.Random(cfg.seed)
    if cfg.count < 2 or cfg.max_number < 2:
        raise GymError("data.count and data.max_number must be at least 2")
    seen, rows = set(), []
    while len(rows) < cfg.train_size + cfg.test_size:
        nums = [rng.randint(1, cfg.max_number) for _ in range(cfg.count)]
        a, *rest = nums
        expr, value = str(a), a
        for b in rest:
            op = rng.choice("+-*")
            expr, value = f"({expr} {op} {b})", evaluate(f"{value} {op} {b}")
        key = (tuple(sorted(nums)), value)
        if value <= 0 or key in seen:
            continue
        seen.add(key)
        rows.append({
            "prompt": (f"Using the numbers {nums}, each at most once, and + - * /, make "
                       f"{value}. You may run Python code with the python tool. End with "
                       "the expression alone on the last line."),
            "numbers": nums, "target": value, "answer": expr})
    return Task("countdown", rows[cfg.test_size:], rows[:cfg.test_size], metric=None)


def countdown_solves(expression: str, numbers: list[int], target: float) -> bool:
    """True when ``expression`` uses each of ``numbers`` at most once and equals
    ``target``."""
    used = [int(n) for n in re.findall(r"\d+", expression)]
    pool = list(numbers)
    for n in used:
        if n not in pool:
            return False
        pool.remove(n)
    try:
        return abs(evaluate(expression) - target) < 1e-6
    except (ValueError, ZeroDivisionError, OverflowError):
        return False


class PythonCountdown(Environment):
    """Countdown with a Python tool run in :class:`gym_core.env.sandbox.PythonSandbox`;
    the final answer's last line is the expression, 1 when it reaches the target."""

    def __init__(self, cfg):
        super().__init__(cfg)
        from gym_core.env.sandbox import PythonSandbox

        self.sandbox = PythonSandbox(cfg.cpu_seconds, cfg.memory_mb, cfg.wall_seconds,
                                     cfg.max_output_chars)

    def check_row(self, row):
        if not {"prompt", "numbers", "target"} <= set(row):
            raise GymError(f"env={self.cfg.name} needs rows with 'prompt', 'numbers' and "
                           f"'target' (data=countdown); this row has {sorted(row)}")

    def tools(self):
        sandbox = self.sandbox

        def python(code: str) -> str:
            """Run Python code in a sandbox (no network, no files outside its folder) and return what it prints.

            Args:
                code: the program; print what you want to see
            """
            return sandbox.run(code) or "(no output: print what you want to see)"

        return [python]

    def score(self, action: Action) -> float:
        lines = [ln.strip() for ln in action.content.splitlines() if ln.strip()]
        if not lines:
            return 0.0
        expr = lines[-1].split("=")[0]
        return 1.0 if countdown_solves(expr, self.row["numbers"], self.row["target"]) else 0.0


# ------------------------------------------------------------------------------- wordle

WORDS = ("apple", "brave", "crane", "drink", "eagle", "flame", "grape", "house", "input",
         "joker", "knife", "lemon", "mango", "night", "ocean", "piano", "queen", "river",
         "stone", "table", "uncle", "vivid", "water", "youth", "zebra", "bread", "chair",
         "dream", "earth", "frost", "ghost", "heart", "light", "music", "north", "plant",
         "radio", "smile", "tiger", "world")


def wordle_task(cfg) -> Task:
    words = list(WORDS)
    random.Random(cfg.seed).shuffle(words)
    if not 0 < cfg.test_size < len(words):
        raise GymError(f"data.test_size={cfg.test_size} must be between 1 and {len(words) - 1}")
    rows = [{"prompt": "Let's play Wordle.", "answer": w} for w in words]
    return Task("wordle", rows[cfg.test_size:], rows[:cfg.test_size], metric=None)


def wordle_feedback(guess: str, secret: str) -> str:
    """Per letter: G (right place), Y (in the word elsewhere), - (not in it), with
    repeated letters counted as Wordle counts them."""
    marks = ["-"] * 5
    left = list(secret)
    for i, (g, s) in enumerate(zip(guess, secret)):
        if g == s:
            marks[i], left[i] = "G", None
    for i, g in enumerate(guess):
        if marks[i] == "-" and g in left:
            marks[i] = "Y"
            left[left.index(g)] = None
    return "".join(marks)


class Wordle(Environment):
    """Guess a five-letter word in ``max_turns`` guesses; each guess (the last
    five-letter word of the turn) gets per-letter feedback. Reward 1 on the turn that
    finds the word, a small share for letters placed on the way."""

    RULES = ("Guess the secret five-letter English word. Answer each turn with one "
             "five-letter word. After each guess you get feedback per letter: G = right "
             "letter in the right place, Y = in the word elsewhere, - = not in the word.")

    def check_row(self, row):
        if not isinstance(row.get("answer"), str) or len(row["answer"]) != 5:
            raise GymError(f"env={self.cfg.name} needs rows with a five-letter 'answer' "
                           f"(data=wordle); this row has {sorted(row)}")

    def reset(self, row: dict[str, Any]) -> Observation:
        self.row, self.best = row, 0
        return Observation([{"role": "user", "content": self.RULES + " Your first guess?"}])

    def step(self, action: Action):
        words = re.findall(r"\b[a-zA-Z]{5}\b", action.content)
        if not words:
            return "Answer with one five-letter word.", 0.0, False, {"invalid": 1}
        guess, secret = words[-1].lower(), self.row["answer"].lower()
        if guess == secret:
            return None, 1.0, True, {"solved": 1}
        marks = wordle_feedback(guess, secret)
        greens = marks.count("G")
        shaped = 0.1 * max(0, greens - self.best)  # progress: new right places only
        self.best = max(self.best, greens)
        return f"{guess.upper()}: {marks}", shaped, False, {"solved": 0}


