"""Checkpoints on disk: the file format and its manager (atomic save, manifest, retention,
verify), sharded DCP checkpoints, and loading a stored run's checkpoint."""
