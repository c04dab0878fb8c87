"""Training: the fine-tuning loop (one process, or DDP under torchrun)."""
