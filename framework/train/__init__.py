"""The training engine: optimizers and schedules, the train/eval loops, checkpoints."""
