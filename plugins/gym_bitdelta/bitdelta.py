"""BitDelta: Delta_hat = alpha * Sign(Delta) per matrix, alpha = mean|Delta| (the
L2-optimal scale for fixed signs, docs/algorithms.md §9). Signs are packed 8 per byte,
and mean|Delta| summed in the same pass, by the core's 1-bit kernel
(:func:`gym_core.api.pack_signs`); matrices are spread over the cores by the matrix
quantizer shell."""

from __future__ import annotations

import json
import math

import torch

from gym_bitdelta import BitDeltaConfig
from gym_core.api import GymError, MatrixQuantizer, PackedDelta, pack_signs, unpack_signs


class BitDeltaQuantizer(MatrixQuantizer):
    Config = BitDeltaConfig

    def __init__(self, cfg):
        super().__init__(cfg)  # sign_of_zero is 1 or -1: BitDeltaConfig declares it
        # plain values: each OmegaConf attribute read costs microseconds, under the GIL
        self._sign_of_zero = int(cfg.sign_of_zero)
        self._stats: dict = {}

    def file_meta(self):
        return {"sign_of_zero": str(self._sign_of_zero)}

    def quantize_matrix(self, key, d):
        signs, sums = pack_signs(d, self._sign_of_zero)
        alpha = float(sums[0]) / d.numel()
        if not math.isfinite(alpha):
            raise GymError(
                f"delta tensor '{key}' has NaN or infinite entries (mean|D| = {alpha}): "
                "the fine-tuned weights diverged; quantize a checkpoint from before that"
            )
        return {"signs": signs, "scale": torch.tensor([alpha], dtype=torch.float32)}

    def part_specs(self, shape, meta):
        return {"signs": (torch.uint8, (math.prod(shape) + 7) // 8),
                "scale": (torch.float32, 1)}

    def dequantize_matrix(self, key, shape, parts, meta):
        bits = unpack_signs(parts["signs"], math.prod(shape)).view(shape)
        return parts["scale"].float() * (bits.float() * 2 - 1)

    def stats(self):
        return dict(self._stats)

    def operators(self, packed):
        """Serving: each sign matrix stays packed (one bit per weight) and is applied to
        activations by a C++ kernel working on the bits (gym_bitdelta/serving.cpp)."""
        from gym_bitdelta.serving import operators

        return operators(self.checked_parts(packed))

    def calibrate(self, packed, ctx):
        """Scale distillation (docs/algorithms.md §9): W = W_base + alpha * sign with signs and
        base frozen; AdamW (cosine schedule) on the fp32 alphas only, minimising the logit
        MSE to the fine-tuned model. Unlike the reference code, padding positions are
        masked out of the loss and nothing but the scales is trained."""
        cfg = self.cfg
        if cfg.distill_steps <= 0:
            return None
        if not ctx.prompts:
            raise GymError("quant.distill_steps > 0 needs training prompts, and the task has none")
        from torch.func import functional_call

        device = ctx.device
        model = ctx.load_base().requires_grad_(False)
        params = dict(model.named_parameters())
        shapes = json.loads(packed.meta["shapes"])
        weights, signs, scales = {}, {}, {}
        for key, shape in shapes.items():
            if key not in params:
                raise GymError(f"the delta has '{key}', which the base model does not have")
            if f"{key}.full" in packed.tensors:  # not sign-compressed: base + exact delta
                weights[key] = params[key].detach().float() + packed.tensors[f"{key}.full"].to(device)
                continue
            numel = int(torch.tensor(shape).prod())
            bits = unpack_signs(packed.tensors[f"{key}.signs"], numel).view(shape).to(device)
            signs[key] = bits.float() * 2 - 1
            scales[key] = torch.nn.Parameter(packed.tensors[f"{key}.scale"].float().clone().to(device))
        opt = torch.optim.AdamW(scales.values(), lr=cfg.distill_lr, weight_decay=0.0)
        steps = cfg.distill_steps
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        tok = ctx.tokenizer
        order = torch.randperm(len(ctx.prompts), generator=torch.Generator().manual_seed(cfg.distill_seed))
        losses = []
        for step in range(steps):
            idx = [order[(step * cfg.distill_batch_size + i) % len(order)].item()
                   for i in range(cfg.distill_batch_size)]
            enc = tok([ctx.prompts[i] for i in idx], return_tensors="pt", padding=True,
                      truncation=True, max_length=cfg.distill_max_length,
                      add_special_tokens=False).to(device)
            inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
            with torch.no_grad():
                target = ctx.teacher(**inputs).logits.float()
            current = dict(weights)
            for key, sign in signs.items():
                current[key] = params[key].detach().float() + scales[key] * sign
            logits = functional_call(model, current, args=(), kwargs=inputs).logits.float()
            mask = enc["attention_mask"].unsqueeze(-1).to(logits.dtype)
            loss = ((logits - target).square() * mask).sum() / (mask.sum() * logits.shape[-1])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        self._stats = {"distill_steps": steps, "distill_loss_first": losses[0],
                           "distill_loss_last": losses[-1]}
        tensors = dict(packed.tensors)
        for key, scale in scales.items():
            tensors[f"{key}.scale"] = scale.detach().float().cpu().reshape(1)
        return PackedDelta(tensors, dict(packed.meta, distill_steps=str(steps)), packed.num_params)
