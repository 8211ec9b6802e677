"""Stage 4: merge, adapter and GGUF exports, each verified by loading it back."""
