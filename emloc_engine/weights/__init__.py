"""Weights on disk: safetensors shards read one tensor at a time, peft adapter folders, the emulator's low-rank format."""
