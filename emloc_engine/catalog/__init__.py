"""The model catalog: models on disk (HF cache, added folders, LM Studio, Ollama), GGUF import, the demo."""
