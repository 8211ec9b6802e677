"""Stage 3: the adapter corrected for the emulator/original mismatch, lambda chosen on held-out data."""
