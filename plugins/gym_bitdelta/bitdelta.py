"""BitDelta: Delta_hat = alpha * Sign(Delta) per matrix, alpha = mean|Delta| (the
L2-optimal scale for fixed signs, ALGORITHMS.md §5). Signs are packed 8 per byte, and
mean|Delta| summed in the same pass, by one fused numba kernel per matrix; matrices are
spread over the cores (:func:`gym_core.delta.map_tensors`)."""

from __future__ import annotations

import json
import math

import numba
import numpy as np
import torch

from gym_bitdelta import BitDeltaConfig
from gym_core.delta import PackedDelta, Quantizer, map_tensors, shapes_meta
from gym_core.errors import GymError


@numba.njit(nogil=True, cache=True, fastmath={"reassoc"})
def _sign_pack_l1(x, strict, out):
    """One pass over fp32 ``x``: the signs packed 8 per byte into ``out`` (bit k of byte
    j is entry 8 j + k, 1 for positive: ``x > 0`` when ``strict``, else ``x >= 0``; the
    tail zero-padded) and sum|x| accumulated in fp64, which it returns."""
    full = x.size // 8
    xs = x[: 8 * full]
    total = 0.0
    for b in range(full):  # `strict` is loop-invariant: LLVM moves the test out of the loop
        v = np.uint32(0)
        if strict:
            for k in range(8):
                total += np.float64(abs(xs[8 * b + k]))
                v |= np.uint32(xs[8 * b + k] > 0) << np.uint32(k)
        else:
            for k in range(8):
                total += np.float64(abs(xs[8 * b + k]))
                v |= np.uint32(xs[8 * b + k] >= 0) << np.uint32(k)
        out[b] = np.uint8(v)
    tail = x[8 * full :]
    if tail.size:
        v = np.uint32(0)
        for k in range(tail.size):
            total += np.float64(abs(tail[k]))
            v |= np.uint32(tail[k] > 0 or (not strict and tail[k] == 0)) << np.uint32(k)
        out[full] = np.uint8(v)
    return total


def pack_signs(d: torch.Tensor, sign_of_zero: int = 1) -> tuple[torch.Tensor, float]:
    """The signs of ``d`` (any shape) packed 8 per byte, little-endian within the byte
    (1 = positive; 0 counts as ``sign_of_zero``), and mean|d|, from one pass."""
    x = d.detach().float().contiguous().cpu().numpy().reshape(-1)
    out = np.empty((x.size + 7) // 8, np.uint8)
    total = _sign_pack_l1(x, sign_of_zero == -1, out)
    return torch.from_numpy(out), total / max(x.size, 1)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: the first ``numel`` bits as a bool tensor."""
    bits = np.unpackbits(packed.contiguous().cpu().numpy(), count=numel, bitorder="little")
    return torch.from_numpy(bits).bool()


class BitDeltaQuantizer(Quantizer):
    Config = BitDeltaConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.sign_of_zero not in (1, -1):
            raise GymError(f"quant.sign_of_zero={cfg.sign_of_zero} must be 1 or -1")

    def quantize(self, delta):
        # plain values: each OmegaConf attribute read costs microseconds, under the GIL
        targets, sign_of_zero = tuple(self.cfg.targets), int(self.cfg.sign_of_zero)

        def one(key, d):
            if not (d.dim() == 2 and d.numel() > 0 and key.endswith(targets)):
                return {f"{key}.full": d.detach().float().clone()}
            signs, alpha = pack_signs(d, sign_of_zero)
            if not math.isfinite(alpha):
                raise GymError(
                    f"delta tensor '{key}' has NaN or infinite entries (mean|D| = {alpha}): "
                    "the fine-tuned weights diverged; quantize a checkpoint from before that"
                )
            return {f"{key}.signs": signs, f"{key}.scale": torch.tensor([alpha], dtype=torch.float32)}

        tensors = {}
        for part in map_tensors(one, delta):
            tensors.update(part)
        meta = {"quantizer": "bitdelta", "shapes": shapes_meta(delta),
                "sign_of_zero": str(sign_of_zero)}
        return PackedDelta(tensors, meta, sum(d.numel() for d in delta.values()))

    def dequantize(self, packed):
        if packed.meta.get("quantizer") != "bitdelta":
            raise GymError(
                f"this delta was written by quantizer {packed.meta.get('quantizer')!r}, "
                "not bitdelta: select that one with quant=<name>"
            )
        shapes = json.loads(packed.meta["shapes"])
        out = {}
        for key, shape in shapes.items():
            if f"{key}.full" in packed.tensors:
                out[key] = packed.tensors[f"{key}.full"].float()
                continue
            numel = 1
            for s in shape:
                numel *= s
            bits = unpack_bits(packed.tensors[f"{key}.signs"], numel).view(shape)
            scale = packed.tensors[f"{key}.scale"].float()
            out[key] = scale * (bits.float() * 2 - 1)
        return out

    def operators(self, packed):
        """Serving: each sign matrix stays packed (one bit per weight) and is applied to
        activations by a C++ kernel working on the bits (gym_bitdelta/serving.cpp)."""
        if packed.meta.get("quantizer") != "bitdelta":
            raise GymError(
                f"this delta was written by quantizer {packed.meta.get('quantizer')!r}, "
                "not bitdelta"
            )
        from gym_bitdelta.serving import operators

        return operators(packed)

    def calibrate(self, packed, ctx):
        """Scale distillation (ALGORITHMS.md §5): W = W_base + alpha * sign with signs and
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
            bits = unpack_bits(packed.tensors[f"{key}.signs"], numel).view(shape).to(device)
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
        self.last_stats = {"distill_steps": steps, "distill_loss_first": losses[0],
                           "distill_loss_last": losses[-1]}
        tensors = dict(packed.tensors)
        for key, scale in scales.items():
            tensors[f"{key}.scale"] = scale.detach().float().cpu().reshape(1)
        return PackedDelta(tensors, dict(packed.meta, distill_steps=str(steps)), packed.num_params)
