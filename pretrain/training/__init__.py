"""The training loop and what it keeps: trainer, checkpoints, optimizer, metrics."""
