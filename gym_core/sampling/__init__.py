"""Sampling: the fused decode engine, batched KV-cached generation, rollouts."""
