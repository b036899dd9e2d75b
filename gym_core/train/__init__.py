"""Training: the algorithm base classes, shared losses, the loop, checkpoints, the run folder, one job top to bottom."""
