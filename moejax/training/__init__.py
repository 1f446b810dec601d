"""Training: optimizer, train state placement, steps, checkpoints, the run directory
(``workdir``) and the ``Trainer``."""
