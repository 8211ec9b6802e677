"""Stage 1: the emulator, by activation-aware SVD, streamed one decoder block at a time."""
