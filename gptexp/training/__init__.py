"""The training loop and what it needs: the Trainer, the spike guard, optimizer and schedules,
scoring (validation loss, samples), runtime (device, RNG, signals), DDP / FSDP, MFU, speed
settings and the progress line."""
