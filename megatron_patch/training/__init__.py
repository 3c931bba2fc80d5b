"""Training: arguments, loop, optimizer and schedule, checkpointing, metrics."""
