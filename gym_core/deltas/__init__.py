"""Deltas and export: fine-tuned minus base, packed forms, sign bits, soups, merging a run, GGUF."""
