"""A run's life around a trainer: the session (start, W&B and TensorBoard mirrors, end), forks,
sweeps and their jobs, requeue on a cluster, the Optuna search."""
