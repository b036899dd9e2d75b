"""SFT: the loss against a hand computation and TRL's own code, the tokens it trains on
for each data shape, packing (a packed forward equals separate ones, values and
gradients), and end-to-end runs on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from gym_core.api import GymError, StepTotals
from gym_core.data.batching import encode_sequences
from gym_core.data.tasks import arithmetic_task, render_completion, render_prompts, render_turns
from gym_core.model.policy import load_policy, tiny_tokenizer
from gym_core.train.job import run_job
from gym_sft.sft import SFT, sft_loss
from tests.conftest import compose


def offline(overrides):
    return [o for o in overrides if not o.startswith("algorithm.")]


def tiny_sft(*overrides):
    cfg = compose(["model=tiny", "algorithm=sft", *overrides])
    policy = load_policy(cfg.model, torch.device("cpu"), system_prompt=cfg.data.system_prompt)
    return SFT(cfg.algorithm, policy), cfg


class StubPolicy:
    def __init__(self, logp):
        self.logp = logp

    def logprobs(self, batch, *, reference=False, detached=None):
        return self.logp


# ----------------------------------------------------------------------------------------
# the loss
# ----------------------------------------------------------------------------------------


def test_loss_by_hand():
    # two sequences: target log-probs -1, -2 and -0.5 (the zeros are not targets)
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert sft_loss(logp, mask, 3).item() == pytest.approx((1 + 2 + 0.5) / 3)
    # a step of two micro-batches (this one and one with 3 more tokens): its share
    assert sft_loss(logp, mask, 6).item() == pytest.approx(3.5 / 6)


def test_loss_matches_trl_one_micro_batch():
    pytest.importorskip("trl")
    from tests.trl_stubs import trl_sft_loss

    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(5, 9, generator=g) * 6
    mask = (torch.rand(5, 9, generator=g) > 0.3).long()
    batch = type("B", (), {"target_mask": mask})()
    algo = SFT.__new__(SFT)
    algo.policy = StubPolicy(logp)
    ours, _ = algo.loss(batch, StepTotals(sequences=5, tokens=int(mask.sum()), micro_batches=1))
    assert ours.item() == pytest.approx(trl_sft_loss(logp, mask), abs=1e-6)


def test_step_loss_matches_trl_over_micro_batches_and_ranks():
    """TRL divides each micro-batch's summed NLL by num_items_in_batch (the step's target
    tokens over every micro-batch and process) and multiplies by the process count,
    which DDP's averaging undoes: the step's loss is the token mean of the global batch
    (docs/algorithms.md §7.2). gym's shares (sum over micro-batches, ranks summed by the
    core's world-size scaling) give the same number."""
    pytest.importorskip("trl")
    from tests.trl_stubs import trl_sft_loss

    g = torch.Generator().manual_seed(2)
    # 2 ranks x 2 micro-batches of different widths and token counts
    parts = [(-torch.rand(3, w, generator=g) * 4, (torch.rand(3, w, generator=g) > 0.4).long())
             for w in (5, 8, 6, 7)]
    total = sum(int(m.sum()) for _, m in parts)
    totals = StepTotals(sequences=12, tokens=total, micro_batches=4)
    algo = SFT.__new__(SFT)
    ours = 0.0
    for lp, m in parts:
        algo.policy = StubPolicy(lp)
        ours += algo.loss(type("B", (), {"target_mask": m})(), totals)[0].item()
    # TRL: each rank's micro-batch loss (times P = 2); DDP averages the ranks' gradients
    theirs = sum(trl_sft_loss(lp, m, num_items_in_batch=total, num_processes=2)
                 for lp, m in parts) / 2
    assert ours == pytest.approx(theirs, abs=1e-6)
    token_mean = -sum(float((lp * m).sum()) for lp, m in parts) / total
    assert ours == pytest.approx(token_mean, rel=1e-6)


# ----------------------------------------------------------------------------------------
# which tokens are trained
# ----------------------------------------------------------------------------------------


def trained_text(batch, tok, row=0):
    ids, mask = batch.input_ids[row], batch.target_mask[row].bool()
    return tok.decode(ids[mask])


def test_prompt_completion_trains_on_the_completion_tokenised_as_everywhere_else():
    """The default task's rows: prompt rendered with the chat template (as evaluation
    renders it), the `chosen` answer ("3 + 4 = 7") as the assistant's reply; the loss on
    the reply only, end-of-turn included. Tokens equal policy.encode's prompt and
    completion, so SFT trains on what GRPO samples and evaluation reads."""
    algo, cfg = tiny_sft("data.system_prompt=Be brief.")
    tok = algo.policy.tokenizer
    ex = arithmetic_task(cfg.data).train[0]
    batch = algo.collate([ex])
    prompt = render_prompts(tok, [ex["prompt"]], "Be brief.")[0]
    completion = render_completion(tok, ex["prompt"], ex["chosen"], "Be brief.")
    assert trained_text(batch, tok) == completion == f"{ex['chosen']}<|im_end|>\n"
    enc = algo.policy.encode([ex["prompt"]], [[ex["chosen"]]], max_prompt_length=512,
                             max_completion_length=512)
    whole = batch.input_ids[0][batch.segment[0] == 0].tolist()
    assert whole == enc.prompt_ids[0].tolist() + enc.completion_ids[0].tolist()
    assert tok.decode(whole) == prompt + completion
    # the whole-sequence switch trains on everything but the first token
    algo.cfg.completion_only_loss = False
    every = algo.collate([ex])
    assert int(every.target_mask.sum()) == len(whole) - 1


def test_conversation_trains_on_assistant_turns_only():
    algo, _ = tiny_sft()
    tok = algo.policy.tokenizer
    messages = [{"role": "system", "content": "You add."},
                {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
                {"role": "user", "content": "and 2+2?"}, {"role": "assistant", "content": "4"}]
    batch = algo.collate([{"messages": messages, "prompt": messages[:4]}])
    assert trained_text(batch, tok) == "2<|im_end|>\n4<|im_end|>\n"
    full = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(batch.input_ids[0][batch.segment[0] == 0]) == full
    pieces = render_turns(tok, messages)
    assert "".join(text for text, _ in pieces) == full
    assert [text for text, i in pieces if i is not None] == ["2<|im_end|>\n", "4<|im_end|>\n"]


def test_assistant_turns_inside_a_prompt_are_context():
    """A prompt-completion row whose prompt is a conversation: only the completion is an
    answer to learn (TRL's completion_only_loss masks the whole prompt)."""
    algo, _ = tiny_sft()
    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
              {"role": "user", "content": "1+2?"}]
    batch = algo.collate([{"prompt": prompt, "completion": "3"}])
    assert trained_text(batch, algo.policy.tokenizer) == "3<|im_end|>\n"


def test_plain_text_trains_on_every_token_and_ends_with_eos():
    algo, _ = tiny_sft()
    tok = algo.policy.tokenizer
    batch = algo.collate([{"text": "abc", "prompt": "abc"}])
    assert tok.decode(batch.input_ids[0][batch.segment[0] == 0]) == "abc<|im_end|>"
    assert trained_text(batch, tok) == "bc<|im_end|>"  # the first token is never a target


def test_rows_too_long_for_max_length_are_refused_up_front():
    algo, cfg = tiny_sft("algorithm.max_length=20")
    with pytest.raises(GymError, match=r"algorithm.max_length=20 tokens leave training row 0"):
        algo.check_data(arithmetic_task(cfg.data).train)


def test_undesirable_rows_are_refused():
    algo, _ = tiny_sft()
    with pytest.raises(GymError, match="label false"):
        algo.check_data([{"prompt": "p", "completion": "c", "label": False}])


# ----------------------------------------------------------------------------------------
# packing
# ----------------------------------------------------------------------------------------


def test_best_fit_decreasing_layout():
    tok = tiny_tokenizer()  # byte-level: one token per character
    rows = [[("a" * n, True)] for n in (5, 3, 6, 2, 4)]
    batch = encode_sequences(tok, rows, max_length=10, packing=True, device=torch.device("cpu"))
    # longest first into the fullest bin that fits: [6, 4], [5, 3, 2]
    assert batch.input_ids.shape == (2, 10)
    members = [sorted({int(s) for s in row if s >= 0}) for row in batch.segment]
    assert members == [[2, 4], [0, 1, 3]]
    # positions restart for every sequence
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]


def packed_and_single_grads(policy, rows, packing):
    policy.model.zero_grad()
    batch = policy.encode_sequences(rows, max_length=128, packing=packing)
    logp = policy.logprobs(batch)
    per_seq = batch.per_sequence(logp)
    per_seq.sum().backward()
    grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.requires_grad}
    return batch, logp, per_seq.detach(), grads


def test_a_packed_forward_equals_separate_forwards_values_and_gradients():
    """Sequences packed into one row attend only within themselves: each one's token
    log-probs and the gradients of their sum equal those of separate forward passes
    (a row per sequence; and each sequence alone)."""
    algo, _ = tiny_sft()
    policy = algo.policy
    # non-zero LoRA B so the adapter's gradients are not trivially zero
    torch.manual_seed(0)
    for n, p in policy.model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    rows = [[("What is 1 + 2?", False), ("1 + 2 = 3", True)],
            [("hi", False), ("hello there", True)],
            [("a long-ish plain text to learn", True)]]
    packed, lp_packed, seq_packed, g_packed = packed_and_single_grads(policy, rows, True)
    assert packed.input_ids.shape[0] == 1  # all three in one row
    padded, lp_padded, seq_padded, g_padded = packed_and_single_grads(policy, rows, False)
    assert padded.input_ids.shape[0] == 3
    torch.testing.assert_close(seq_packed, seq_padded, rtol=1e-5, atol=1e-5)
    for n in g_packed:
        torch.testing.assert_close(g_packed[n], g_padded[n], rtol=1e-4, atol=1e-6)
    # each sequence's token log-probs, in order, against the sequence scored alone
    for i, row in enumerate(rows):
        alone = policy.encode_sequences([row], max_length=128)
        lp_alone = policy.logprobs(alone)[alone.target_mask.bool()].detach()
        mine = packed.segment == i
        torch.testing.assert_close(
            lp_packed.detach()[mine & packed.target_mask.bool()], lp_alone,
            rtol=1e-5, atol=1e-5)
    assert any(float(g.abs().sum()) > 0 for g in g_packed.values())


def test_a_shared_prefix_runs_once_and_changes_nothing():
    """Rows that begin with the same untrained tokens (a chat template's system prompt):
    the prefix runs once, its KV cache repeated for each row; log-probs and gradients
    equal a plain forward of the rows (here: the packed layout, which shares nothing)."""
    algo, _ = tiny_sft()
    policy = algo.policy
    torch.manual_seed(1)
    for n, p in policy.model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    head = ("<|im_start|>system\nYou add.<|im_end|>\n<|im_start|>user\nWhat is ", False)
    rows = [[head, ("1 + 2?", False), ("3", True)],
            [head, ("10 + 20?", False), ("30 it is", True)],
            [head, ("5 + 5?", False), ("10", True)]]
    shared, lp_shared, seq_shared, g_shared = packed_and_single_grads(policy, rows, False)
    head_tokens = policy.tokenizer(head[0], add_special_tokens=False).input_ids
    assert shared.shared_prefix == len(head_tokens)
    plain, lp_plain, seq_plain, g_plain = packed_and_single_grads(policy, rows, True)
    assert plain.shared_prefix == 0
    torch.testing.assert_close(seq_shared, seq_plain, rtol=1e-5, atol=1e-5)
    for n in g_shared:
        torch.testing.assert_close(g_shared[n], g_plain[n], rtol=1e-4, atol=1e-6)
    for i in range(len(rows)):
        torch.testing.assert_close(
            lp_shared.detach()[(shared.segment == i) & shared.target_mask.bool()],
            lp_plain.detach()[(plain.segment == i) & plain.target_mask.bool()],
            rtol=1e-5, atol=1e-5)
    # the arithmetic task's chat-rendered rows do share their system prompt
    algo2, cfg = tiny_sft()
    batch = algo2.collate(arithmetic_task(cfg.data).train[:4])
    assert batch.shared_prefix > 20


def test_packing_does_not_change_a_run(tmp_path, tiny_overrides):
    """Packing only changes the layout of a micro-batch: the same rows, the same loss
    and the same updates (up to float reduction order)."""
    def metrics(packing):
        run = tmp_path / f"p{packing}"
        run_job(compose([*offline(tiny_overrides), "algorithm=sft", "algorithm.lr=1e-2",
                         f"algorithm.packing={packing}", "trainer.max_steps=3",
                         "trainer.batch_size=4", "trainer.eval_before=false"]), run_dir=run)
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]

    plain, packed = metrics(False), metrics(True)
    for a, b in zip(plain, packed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["target_tokens"] == b["target_tokens"]


# ----------------------------------------------------------------------------------------
# runs
# ----------------------------------------------------------------------------------------


def test_sft_learns_its_rows_on_the_tiny_model(tmp_path, tiny_overrides):
    """Four conversations (one of two turns) as both train and test, all weights trained:
    the NLL of the assistant turns falls step after step."""
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Say {w}"},
                          {"role": "assistant", "content": w}]} for w in ("red", "blue", "green")]
    rows.append({"messages": [{"role": "user", "content": "Count"},
                              {"role": "assistant", "content": "1 2 3"},
                              {"role": "user", "content": "Again"},
                              {"role": "assistant", "content": "1 2 3"}]})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = run_job(compose([*offline(tiny_overrides), "algorithm=sft", "algorithm.lr=3e-3",
                         "model.finetune=full",
                         "data=jsonl", f"data.train_file={data}", f"data.test_file={data}",
                         "trainer.max_steps=8", "trainer.batch_size=4", "trainer.warmup_steps=0"]),
                run_dir=tmp_path / "run")
    assert s["eval"]["metric"] is None  # nothing to verify: the loss tells
    nll = [json.loads(x)["nll"] for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert nll[-1] < 0.7 * nll[0]
    assert sum(b < a for a, b in zip(nll, nll[1:])) >= 6


def test_a_bad_row_stops_the_command_line_with_one_line(tmp_path):
    from tests.conftest import run_cli

    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "no reply"}]}) + "\n")
    proc = run_cli(["model=tiny", "algorithm=sft", "data=jsonl", f"data.train_file={data}",
                    "run.name=bad"], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("gym: error")]
    assert len(errors) == 1 and f"{data}:2: field 'messages' has no assistant turn" in errors[0]
