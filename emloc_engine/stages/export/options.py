"""What to export and how: pure data (no torch), so the CLI and the app read it cheaply."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from emloc_engine.core.errors import ConfigError

EXPORT_FORMATS = ("merged", "adapter", "gguf", "adapter-gguf", "ollama", "lmstudio")
# The formats a run exports unless told otherwise (Ollama and LM Studio only on request).
DEFAULT_FORMATS = ("merged", "adapter", "gguf")
# Merged-GGUF weight types. The first ones the ``gguf`` package writes itself (gguf.quants.quantize);
# the K-quants need llama.cpp's ``llama-quantize`` on PATH (:data:`K_QUANT_TYPES`).
PY_GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
K_QUANT_TYPES = ("q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "q3_k_m", "q3_k_s", "q3_k_l", "q2_k")
GGUF_TYPES = PY_GGUF_TYPES + K_QUANT_TYPES
DEFAULT_PROMPTS = ("The capital of France is", "def fibonacci(n):\n    ",
                   "Once upon a time, in a small village by the sea,")


@dataclass(frozen=True, kw_only=True)
class ExportOptions:
    """What to export and how (``RunConfig.export``); an empty ``formats`` means no export stage."""

    formats: tuple[str, ...] = field(default=DEFAULT_FORMATS, metadata={
        "help": "Any of merged (Hugging Face folder), adapter (portable peft adapter), gguf (one llama.cpp "
                "file, RUN/model.gguf), adapter-gguf (RUN/adapter.gguf: a llama.cpp/Ollama LoRA for the "
                "unchanged base GGUF), ollama (RUN/Modelfile; prints the `ollama create` command), lmstudio "
                "(copies the GGUF into LM Studio's models folder)."})
    gguf_type: str = field(default="f16", metadata={"choices": GGUF_TYPES, "help": (
        "GGUF weight type: f16, bf16, f32, q8_0, q5_1, q5_0, q4_1, q4_0 (written here), or a K-quant "
        "(q6_k, q5_k_m, q4_k_m, q3_k_m, q2_k...; needs llama.cpp's llama-quantize on PATH).")})
    ollama_name: str = field(default="", metadata={
        "help": "Model name for `ollama create` (default: the base model's name + '-emloc')."})
    verify: bool = field(default=True, metadata={
        "help": "Load every export back and compare its logits with original + adapter (needs RAM for the model)."})
    prompts: tuple[str, ...] = field(default=DEFAULT_PROMPTS, metadata={"help": "Prompts used to compare logits."})


    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            hint = ("Name formats from the list, e.g. --export merged,adapter,gguf (export = [\"merged\"] in a run "
                    "file)." if any(p.startswith("unknown export format") for p in problems) else "")
            raise ConfigError("Invalid export settings:", problems=problems, hint=hint)

    def _problems(self) -> list[str]:
        problems = []
        for name in (f for f in self.formats if f not in EXPORT_FORMATS):
            close = difflib.get_close_matches(name, EXPORT_FORMATS, n=1)
            guess = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"unknown export format {name!r} (--export): the formats are "
                            f"{', '.join(EXPORT_FORMATS)}{guess}")
        if self.gguf_type not in GGUF_TYPES:
            problems.append(f"gguf_type {self.gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")
        if self.verify and not self.prompts:
            problems.append("verification needs at least one prompt")
        return problems
