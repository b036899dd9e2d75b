"""The policy: model loading, LoRA, the training forward, pipelines of runs (model.init)."""
