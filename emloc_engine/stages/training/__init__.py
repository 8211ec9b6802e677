"""Stage 2: LoRA on the emulator (one process, or data-parallel), anchored to the original."""
