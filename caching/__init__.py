"""Cache policies as hooks on a model. Knows nothing of solvers or training."""
