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


class _Accelerator:
    """What the trainers' loss code asks of accelerate, for one process."""

    num_processes = 1
    device = torch.device("cpu")
    sync_gradients = True

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x

    def unwrap_model(self, m):
        return m


def _group_policy_stub(logp, *, beta, eps_low, eps_high, ga):
    """A trainer object with what GRPO-style ``_compute_loss`` reads; ``logp`` is what the
    stubbed log-prob pass returns (a leaf with gradients)."""
    st = SimpleNamespace()
    st._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.ones_like(logp), None)
    st.top_entropy_quantile, st.off_policy_mask_threshold = 1.0, None
    st.beta, st.epsilon_low, st.epsilon_high = beta, eps_low, eps_high
    st.model = SimpleNamespace(training=True)
    st.current_gradient_accumulation_steps = ga
    st.accelerator, st.aux_loss_enabled, st._entropy_bonus_enabled = _Accelerator(), False, False
    st._metrics = {"train": defaultdict(list)}
    return st


def _inputs(mask, adv, old, ref):
    b = mask.shape[0]
    out = {"prompt_ids": torch.zeros(b, 2, dtype=torch.long), "prompt_mask": torch.ones(b, 2),
           "completion_ids": torch.zeros(mask.shape, dtype=torch.long), "completion_mask": mask,
           "advantages": adv}
    if old is not None:
        out["old_per_token_logps"] = old
    if ref is not None:
        out["ref_per_token_logps"] = ref
    return out


def trl_grpo_loss(logp, old, ref, adv, mask, *, loss_type, level="token", beta=0.0,
                  delta=None, eps=0.2, eps_high=None, bias_correction_kl=True, ga=1,
                  steps_per_generation=None, num_items=None, max_completion_length=8,
                  sapo=(1.0, 1.05), vespo=(2.0, 3.0, 3.0, 2.0)):
    """TRL 1.16's ``GRPOTrainer._compute_loss`` on one micro-batch: (loss, d loss / d logp).
    ``num_items``: the generation batch's active tokens (dapo, cispo, vespo)."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    lp = logp.detach().clone().requires_grad_(True)
    st = _group_policy_stub(lp, beta=beta, eps_low=eps,
                            eps_high=eps if eps_high is None else eps_high, ga=ga)
    st.importance_sampling_level, st.loss_type, st.use_vllm = level, loss_type, False
    st.vllm_importance_sampling_correction = False
    st.max_completion_length = max_completion_length
    st.args = SimpleNamespace(
        use_bias_correction_kl=bias_correction_kl, delta=delta, sapo_temperature_pos=sapo[0],
        sapo_temperature_neg=sapo[1], vespo_k_pos=vespo[0], vespo_lambda_pos=vespo[1],
        vespo_k_neg=vespo[2], vespo_lambda_neg=vespo[3],
        steps_per_generation=ga if steps_per_generation is None else steps_per_generation)
    st.get_gamma_weights = GRPOTrainer.get_gamma_weights
    inputs = _inputs(mask, adv, old, ref)
    inputs["num_items_in_batch"] = torch.tensor(
        float(mask.sum() if num_items is None else num_items))
    loss = GRPOTrainer._compute_loss(st, None, inputs)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad


def trl_gmpo_loss(logp, old, ref, adv, mask, *, beta=0.0, eps=0.4, eps_high=None, ga=1):
    """TRL 1.16's ``GMPOTrainer._compute_loss`` (trl.experimental.gmpo) on one micro-batch."""
    from trl.experimental.gmpo.gmpo_trainer import GMPOTrainer

    lp = logp.detach().clone().requires_grad_(True)
    st = _group_policy_stub(lp, beta=beta, eps_low=eps,
                            eps_high=eps if eps_high is None else eps_high, ga=ga)
    loss = GMPOTrainer._compute_loss(st, None, _inputs(mask, adv, old, ref))
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad


def trl_rloo_loss(logp, old, adv, mask, *, eps=0.2, eps_high=None):
    """TRL 1.16's ``RLOOTrainer._compute_loss`` on one micro-batch (``old``: per-token
    log-probs of the sampling policy, summed over the mask as TRL stores them)."""
    from trl.trainer.rloo_trainer import RLOOTrainer

    lp = logp.detach().clone().requires_grad_(True)
    st = _group_policy_stub(lp, beta=0.0, eps_low=eps,
                            eps_high=eps if eps_high is None else eps_high, ga=1)
    inputs = _inputs(mask, adv, None, None)
    inputs["old_logps"] = (old * mask).sum(1)
    loss = RLOOTrainer._compute_loss(st, None, inputs)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad


def trl_dpo_token_loss(lp, ref, mask, *, beta, loss_types, loss_weights=None,
                       label_smoothing=0.0, f_divergence_type="reverse_kl",
                       f_alpha_divergence_coef=0.5, discopop_tau=0.05, ld_alpha=None):
    """TRL 1.16's ``DPOTrainer._compute_loss`` on one micro-batch, from per-token
    log-probs: ``lp``, ``ref`` and ``mask`` are [2B, T] in TRL's layout (the B chosen
    rows, then the B rejected rows; ``lp`` is 0 outside the mask, as TRL's fused head
    leaves it). The reference is scored by a stub reference model inside the loss, as
    TRL does without precomputed reference log-probs. Returns (loss, d loss / d lp)."""
    import contextlib

    import trl.trainer.dpo_trainer as dpo_module
    from trl import DPOTrainer

    lp = lp.detach().clone().requires_grad_(True)

    def out(x):
        z = torch.zeros_like(x)
        return SimpleNamespace(log_probs=x, entropy=z, mean_logits=z, is_top1=z.bool(),
                               aux_loss=None)

    n = mask.shape[0]
    t = DPOTrainer.__new__(DPOTrainer)
    t.model, t.accelerator = SimpleNamespace(training=True), _Accelerator()
    t.args = SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None)
    t.aux_loss_enabled, t.ld_alpha, t.precompute_ref_logps = False, ld_alpha, False
    t.f_divergence_type, t.f_alpha_divergence_coef = f_divergence_type, f_alpha_divergence_coef
    t.loss_types = list(loss_types)
    t.loss_weights = list(loss_weights or [1.0] * len(loss_types))
    t.beta, t.label_smoothing, t.use_weighting = beta, label_smoothing, False
    t._metrics, t._total_train_tokens, t._tp_size = defaultdict(lambda: defaultdict(list)), 0, 1
    t.ref_model = lambda **kw: out(ref)
    inputs = {"input_ids": torch.zeros(n, mask.shape[1] + 1, dtype=torch.long),
              "attention_mask": torch.ones(n, mask.shape[1] + 1, dtype=torch.long),
              "completion_mask": torch.cat([torch.zeros(n, 1), mask], dim=1).long()}
    saved = dpo_module.is_peft_model, dpo_module.disable_gradient_checkpointing
    dpo_module.is_peft_model = lambda m: False
    dpo_module.disable_gradient_checkpointing = lambda *a, **k: contextlib.nullcontext()
    try:
        loss = t._compute_loss(lambda **kw: out(lp), inputs, return_outputs=False)
    finally:
        dpo_module.is_peft_model, dpo_module.disable_gradient_checkpointing = saved
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad


def trl_rloo_advantages(rewards_per_func, reward_weights, old, ref, lengths, *, k, beta,
                        reward_clip_range=None, normalize_advantages=False):
    """The advantages TRL 1.16's ``RLOOTrainer._generate_and_score_completions`` computes
    for one process: ``rewards_per_func`` [N, F] (NaN where a function returned None), the
    sampling policy's and the reference's per-token log-probs [N, T] and each
    completion's length (its tokens come first in the row). Generation, the log-prob
    passes and the reward functions are stubs returning these tensors."""
    import contextlib

    import trl.trainer.rloo_trainer as rloo_module
    from trl.trainer.rloo_trainer import RLOOTrainer

    n, width = old.shape
    st = SimpleNamespace()
    st.accelerator = _Accelerator()
    st.accelerator.process_index = 0
    st.model = SimpleNamespace(training=True)
    ref_model = object()
    st.ref_model = ref_model
    st._generate = lambda prompts: ([[1, 2]] * n, [[5] * int(m) for m in lengths],
                                    ["x"] * n)
    st._tokenizer = SimpleNamespace(pad_token_id=0)
    st.pad_to_multiple_of, st.mask_truncated_completions = None, False
    st.args = SimpleNamespace(per_device_train_batch_size=n, gradient_checkpointing_kwargs=None)
    st._get_per_token_logps_and_entropies = (
        lambda model, *a, **kw: (ref if model is ref_model else old, None, None))
    st._calculate_rewards = lambda *a: rewards_per_func
    st.reward_weights = torch.tensor(reward_weights, dtype=torch.float32)
    st.reward_func_names = [f"r{i}" for i in range(rewards_per_func.shape[1])]
    st.num_generations, st.beta = k, beta
    st.reward_clip_range, st.normalize_advantages = reward_clip_range, normalize_advantages
    st._metrics = {"train": defaultdict(list)}
    st._logs = {"prompt": [], "completion": [], "rewards": defaultdict(list), "advantages": [],
                "extra": defaultdict(list), "images": []}
    st._pending_extra_logs, st._pending_metrics, st.log_multimodal = {}, {}, False
    saved = rloo_module.disable_gradient_checkpointing
    rloo_module.disable_gradient_checkpointing = lambda *a, **kw: contextlib.nullcontext()
    try:
        out = RLOOTrainer._generate_and_score_completions(st, [{"prompt": "q"}] * n)
    finally:
        rloo_module.disable_gradient_checkpointing = saved
    return out["advantages"]
