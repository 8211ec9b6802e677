"""The machine: GPUs, RAM and where tensors go (one device resolution for every stage)."""
