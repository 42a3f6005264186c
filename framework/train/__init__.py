"""The training engine: one step (:mod:`~framework.train.step`), the epoch loop every stage shares
(:func:`framework.train.engine.fit`), optimizers and schedules, checkpoints and exact resumes."""
