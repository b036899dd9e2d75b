"""Serving: ``python -m gym_core.serve`` runs an OpenAI-compatible server for a base model
and many variants of it (BitDelta / DeltaQuant deltas, LoRA adapters), each applied per
row in a shared forward pass from its compact form. See docs/serve.md."""
