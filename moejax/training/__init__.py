"""Training: optimizer, train state placement, steps, checkpoints, and the loop."""
