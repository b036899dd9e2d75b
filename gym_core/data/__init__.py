"""Data: tasks and their rendering, the built-in verifier reward, batches of given completions."""
