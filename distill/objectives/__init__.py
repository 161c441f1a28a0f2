"""Training objectives plugged into the one loop of distill.training."""
