"""Guess the number: rows hold the secret in ``answer``. Each turn the model may call
``hint(guess)`` (higher / lower / right); a turn without a tool call is its final guess.
Per-turn rewards: -0.05 for each hint (so fewer hints pay), 1 for a right final guess."""

from __future__ import annotations

import re

from gym_core.api import Environment, GymError, Observation


class Guess(Environment):
    def check_row(self, row):
        if "answer" not in row or not str(row["answer"]).lstrip("-").isdigit():
            raise GymError(f"env=guess needs rows with an integer 'answer'; this row has "
                           f"{sorted(row)}")

    def reset(self, row):
        self.row, self.secret = row, int(row["answer"])
        cfg = self.cfg
        prompt = row.get("prompt") or f"Guess my number between {cfg.low} and {cfg.high}."
        return Observation([{"role": "user", "content": prompt}], self.tools())

    def tools(self):
        return [self.hint]  # the default step's tool loop calls these

    def hint(self, guess: int) -> str:
        """Say whether the secret number is higher or lower than a guess.

        Args:
            guess: the number to compare with the secret
        """
        if guess == self.secret:
            return "right"
        return "higher" if self.secret > guess else "lower"

    def step(self, action):
        obs, reward, done, info = super().step(action)  # the tool loop runs hint()
        if not done:
            return obs, -0.05 * len(action.tool_calls), False, info
        numbers = re.findall(r"-?\d+", action.content)
        right = bool(numbers) and int(numbers[-1]) == self.secret
        return None, 1.0 if right else 0.0, True, {"right": right}
