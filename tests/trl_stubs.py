"""Run TRL's own loss code on given log-probs: its trainers compute the losses inside
``_compute_loss`` from a model's outputs, so a stub model returns the log-probs we choose
and a trainer object is made without its heavy constructor. Test-only; TRL is a test
extra, never a dependency of gym."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import torch


def _spread(totals, lengths, width):
    """Per-token log-probs [N, width] summing to ``totals`` over each row's length."""
    lp = torch.zeros(len(totals), width)
    for i, (tot, n) in enumerate(zip(totals.tolist(), lengths.tolist())):
        lp[i, : int(n)] = tot / int(n)
    return lp


def _accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x,
                           gather=lambda x: x, unwrap_model=lambda m: m)


def trl_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, len_chosen, len_rejected, *,
                 beta, loss_type, label_smoothing=0.0) -> float:
    from trl import DPOTrainer

    b = chosen.shape[0]
    t_len = int(max(len_chosen.max(), len_rejected.max())) + 1
    lp = _spread(torch.cat([chosen, rejected]), torch.cat([len_chosen, len_rejected]), t_len - 1)
    mask = torch.zeros(2 * b, t_len, dtype=torch.long)
    for i, n in enumerate(torch.cat([len_chosen, len_rejected]).tolist()):
        mask[i, 1 : int(n) + 1] = 1
    t = DPOTrainer.__new__(DPOTrainer)
    t.model, t.accelerator, t.args = SimpleNamespace(training=True), _accelerator(), SimpleNamespace()
    t.aux_loss_enabled, t.ld_alpha, t.precompute_ref_logps = False, None, True
    t.f_divergence_type, t.loss_types, t.loss_weights = "reverse_kl", [loss_type], [1.0]
    t.beta, t.label_smoothing, t.use_weighting = beta, label_smoothing, False
    t._metrics, t._total_train_tokens, t._tp_size = defaultdict(lambda: defaultdict(list)), 0, 1
    z = torch.zeros_like(lp)
    outputs = SimpleNamespace(log_probs=lp, entropy=z, mean_logits=z, is_top1=z.bool())
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask),
              "completion_mask": mask, "ref_chosen_logps": ref_chosen,
              "ref_rejected_logps": ref_rejected}
    return float(t._compute_loss(lambda **kw: outputs, inputs, return_outputs=False))


def trl_kto_loss(logps, ref_logps, kl_logps, ref_kl_logps, labels, *, beta,
                 desirable_weight=1.0, undesirable_weight=1.0) -> float:
    """TRL's KTOTrainer loss for given summed log-probs of the rows [N] and of their
    mismatched (KL) pairs [N]; ``labels`` bool [N]."""
    from trl import KTOTrainer

    n, t_len = logps.shape[0], 4
    t = KTOTrainer.__new__(KTOTrainer)
    t.model, t.accelerator, t.args = SimpleNamespace(training=True), _accelerator(), SimpleNamespace()
    t.aux_loss_enabled, t.precompute_ref_logps, t.calculate_KL = False, True, True
    t.loss_type, t.beta = "kto", beta
    t.desirable_weight, t.undesirable_weight = desirable_weight, undesirable_weight
    t._metrics, t._total_train_tokens, t._tp_size = defaultdict(lambda: defaultdict(list)), 0, 1
    t._compute_kl_logps = lambda model, batch: kl_logps
    lp = _spread(logps, torch.full((n,), float(t_len - 1)), t_len - 1)
    z = torch.zeros_like(lp)
    outputs = SimpleNamespace(log_probs=lp, entropy=z, mean_logits=z)
    inputs = {"input_ids": torch.zeros(n, t_len, dtype=torch.long),
              "attention_mask": torch.ones(n, t_len, dtype=torch.long),
              "completion_mask": torch.ones(n, t_len, dtype=torch.long),
              "label": labels, "ref_logps": ref_logps, "ref_KL_logps": ref_kl_logps}
    return float(t._compute_loss(lambda **kw: outputs, inputs, return_outputs=False))


def trl_sft_loss(logps, label_mask, *, num_items_in_batch=None, num_processes=1) -> float:
    """TRL's SFTTrainer.compute_loss for given per-token log-probs [B, T] of the labels
    (the fused LM head's output: zero where the label is -100) and the label mask."""
    from trl import SFTTrainer

    t = SFTTrainer.__new__(SFTTrainer)
    t.model = SimpleNamespace(training=True)
    t.accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x,
                                    parallelism_config=None, num_processes=num_processes)
    t.args = SimpleNamespace(loss_type="nll", average_tokens_across_devices=True)
    t.aux_loss_enabled, t.compute_loss_func, t.label_smoother = False, None, None
    t.get_tp_size = lambda: 1
    t._metrics, t._total_train_tokens, t._tp_size = defaultdict(lambda: defaultdict(list)), 0, 1
    mask = label_mask.bool()
    outputs = SimpleNamespace(log_probs=logps * mask, label_mask=mask,
                              entropy=torch.zeros_like(logps), is_top1=torch.zeros_like(mask))
    inputs = {"input_ids": torch.zeros(mask.shape, dtype=torch.long),
              "attention_mask": torch.ones(mask.shape, dtype=torch.long),
              "labels": torch.where(mask, 0, -100)}
    return float(t.compute_loss(lambda **kw: outputs, inputs,
                                num_items_in_batch=num_items_in_batch))


def trl_orpo_loss(logits, input_ids, attention_mask, labels, *, beta) -> tuple[float, dict]:
    """TRL's ORPOTrainer loss (trl.experimental.orpo) for given logits [2B, L, V] of the
    concatenated chosen (first B rows) and rejected sequences, with their input ids,
    attention masks and labels (-100 on the prompt and padding)."""
    from trl.experimental.orpo import ORPOTrainer

    b = logits.shape[0] // 2
    t = ORPOTrainer.__new__(ORPOTrainer)
    t.accelerator = _accelerator()
    t.is_encoder_decoder, t.padding_value, t.aux_loss_enabled, t.beta = False, 0, False, beta
    batch = {"chosen_input_ids": input_ids[:b], "chosen_attention_mask": attention_mask[:b],
             "chosen_labels": labels[:b], "rejected_input_ids": input_ids[b:],
             "rejected_attention_mask": attention_mask[b:], "rejected_labels": labels[b:]}
    loss, metrics = t.get_batch_loss_metrics(lambda *a, **kw: SimpleNamespace(logits=logits),
                                             batch)
    return float(loss), metrics
