"""SFT: the mean negative log-likelihood of the trained tokens over the whole optimizer
step, L = -sum_t lp[t] / N, N the trained tokens of the step over every micro-batch and
rank (docs/algorithms.md §7.2, TRL's num_items_in_batch). Which tokens are trained:
§7.1 and the plugin's config; how sequences are laid out (padded or packed): §7.3."""

from __future__ import annotations

import torch

from gym_core.api import (
    Algorithm,
    GymError,
    StepTotals,
    chat_messages,
    render_turns,
    trace_segments,
)
from gym_sft import SFTConfig


def sft_loss(logp: torch.Tensor, target_mask: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """This micro-batch's share of the step's loss: -(sum of the log-probs of its target
    tokens) / the step's target tokens (``total_tokens``, at least 1)."""
    return -(logp * target_mask).sum() / max(total_tokens, 1)


def answer_of(ex: dict):
    """What a prompt-style row trains on: its ``completion``, else its ``chosen`` answer
    (a preference pair, or the arithmetic task's right answer written out, "3 + 4 = 7"),
    else its ``answer``; None for a conversation or a plain text."""
    for key in ("completion", "chosen", "answer"):
        if key in ex:
            return ex[key] if isinstance(ex[key], list) else str(ex[key])
    return None


class SFT(Algorithm):
    Config = SFTConfig
    online = False
    data_types = ("language_modeling", "prompt_completion")

    def segments(self, ex: dict) -> list[tuple[str, bool]]:
        """The example's text in pieces, each marked with whether the loss counts it."""
        every = not self.cfg.completion_only_loss
        tok = self.policy.tokenizer
        if "messages" in ex:  # a conversation: every assistant turn is an answer
            messages = chat_messages(ex["messages"], self.policy.system_prompt)
            tools = ex.get("tools") or None  # TRL's tools column: the JSON schemas
            if tools or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages):
                # a tool-use trace (docs/agents.md): rendered as episodes are, the
                # assistant turns (their tool calls included) trained, tool results not
                if isinstance(tools, str):
                    import json

                    tools = json.loads(tools)
                return [(text, every or on) for text, on in trace_segments(tok, messages, tools)]
            return [(text, every or i is not None) for text, i in render_turns(tok, messages)]
        answer = answer_of(ex)
        if answer is not None:
            prompt = chat_messages(ex["prompt"], self.policy.system_prompt)
            reply = ([{"role": "assistant", "content": answer}] if isinstance(answer, str)
                     else list(answer))
            # only the reply's assistant turns: any inside the prompt are context
            return [(text, every or (i is not None and i >= len(prompt)))
                    for text, i in render_turns(tok, prompt + reply)]
        text = ex["text"]
        if tok.eos_token and not text.endswith(tok.eos_token):
            text += tok.eos_token  # as TRL ends plain-text rows, so the model learns to stop
        return [(text, True)]

    def check_data(self, train):
        for ex in train:
            if ex.get("label") is False:
                raise GymError(
                    "algorithm=sft trains on every row's completion, but the training data "
                    "hold undesirable rows (label false): train them with algorithm=kto, or "
                    "keep only the desirable rows")
            if "messages" not in ex and answer_of(ex) is None and "text" not in ex:
                raise GymError(
                    "algorithm=sft needs rows with an answer to learn: prompt + completion "
                    "(or chosen, or answer), messages, or text; a training example has "
                    f"{', '.join(sorted(ex))}")
        # every row keeps a trained token within max_length (checked once, up front)
        for start in range(0, len(train), 256):
            chunk = train[start:start + 256]
            batch = self.policy.encode_sequences([self.segments(ex) for ex in chunk],
                                                 max_length=self.cfg.max_length)
            empty = (batch.target_mask.sum(-1) == 0).nonzero().flatten().tolist()
            if empty:
                ex = chunk[empty[0]]
                raise GymError(
                    f"algorithm.max_length={self.cfg.max_length} tokens leave training row "
                    f"{start + empty[0]} (prompt {str(ex.get('prompt'))[:60]!r}) nothing to "
                    "train on: its answer starts later. Raise algorithm.max_length")

    def collate(self, examples):
        return self.policy.encode_sequences(
            [self.segments(ex) for ex in examples], max_length=self.cfg.max_length,
            packing=self.cfg.packing, examples=examples)

    def step_totals(self, batches):
        return StepTotals(sequences=sum(len(b) for b in batches),
                          tokens=sum(int(b.target_mask.sum()) for b in batches),
                          micro_batches=len(batches))

    def loss(self, batch, totals):
        logp = self.policy.logprobs(batch)
        mask = batch.target_mask
        loss = sft_loss(logp, mask, totals.tokens)
        with torch.no_grad():
            n = int(mask.sum())
            metrics = {"nll": -float((logp * mask).sum()) / max(n, 1),  # this micro-batch
                       "target_tokens": float(n)}
        return loss, metrics
