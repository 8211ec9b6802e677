"""What a dataset is and how to turn it into training examples: :class:`DataConfig` and :data:`FORMATS`."""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from emloc_engine.core.errors import ConfigError

FORMATS: Mapping[str, str] = types.MappingProxyType({
    "messages": 'JSON/JSONL/CSV/Parquet rows with "messages": [{"role": "system|user|assistant|tool", '
                '"content": "..."}] (OpenAI / ChatML)',
    "sharegpt": 'rows with "conversations": [{"from": "system|human|gpt|tool", "value": "..."}] (ShareGPT)',
    "alpaca": 'rows with "instruction", optional "input", "output" (and optional "system") (Alpaca)',
    "prompt_completion": 'rows with "prompt" and "completion" (plain concatenation, loss on the completion)',
    "text": 'rows with "text" (plain documents, loss on every token)',
    "txt": "a plain text file, cut into pieces of about max_length tokens (loss on every token)",
})
"""Every record format the data pipeline reads, with a one-line description (shown in errors and the UI)."""

CANONICAL_FIELDS = ("messages", "conversations", "instruction", "input", "output", "system",
                    "prompt", "completion", "text")
"""Field names a ``column_map`` may map a file's columns onto."""

TRAIN_ON = ("assistant", "all")
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt", ".md", ".text")


@dataclass(frozen=True)
class DataConfig:
    """Where the dataset is and how to render it.

    Raises:
        ConfigError: a setting is out of range or names an unknown format, field or mode.
    """

    path: Path = field(metadata={"help": "Dataset file (.jsonl, .json, .csv, .tsv, .parquet, .txt), a Hugging Face "
                                         "datasets folder (save_to_disk) or Parquet/Arrow folder, or the name of a "
                                         "dataset in the local datasets cache (org/name)."})
    format: str = field(default="auto", metadata={"choices": ("auto", *FORMATS),
        "help": "Record format: auto (detected from the first record's fields), " + ", ".join(FORMATS) + "."})
    column_map: tuple[tuple[str, str], ...] = field(default=(), metadata={
        "help": "(field, column) pairs: read the canonical field (e.g. 'prompt') from that column of the "
                "file, for CSV/Parquet/JSON files with other names."})
    max_length: int = field(default=512, metadata={
        "help": "Tokens per training sequence; longer samples are truncated (plain text is cut into pieces)."})
    train_on: str = field(default="assistant", metadata={"choices": TRAIN_ON,
        "help": "'assistant': loss only on assistant replies / completions (default); 'all': every token."})
    eval_fraction: float = field(default=0.1, metadata={
        "help": "Share of samples held out for the eval loss (at least one when there are 2 or more; 0 = none)."})
    seed: int = field(default=0, metadata={"help": "Seed of the train/eval split."})
    packing: bool = field(default=False, metadata={
        "help": "Concatenate whole samples into sequences of up to max_length tokens (fewer padding tokens)."})
    max_samples: int | None = field(default=None, metadata={
        "help": "Read at most this many samples (for a quick try); None reads them all."})

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "column_map", tuple((str(a), str(b)) for a, b in self.column_map))
        problems: list[str] = []
        if self.format != "auto" and self.format not in FORMATS:
            problems.append(f"unknown data format {self.format!r}; use auto or one of: {', '.join(FORMATS)}")
        if self.max_length < 8:
            problems.append(f"max_length must be at least 8 tokens (got {self.max_length})")
        if self.train_on not in TRAIN_ON:
            problems.append(f"train_on must be 'assistant' or 'all' (got {self.train_on!r})")
        if not 0.0 <= self.eval_fraction < 1.0:
            problems.append(f"eval_fraction must be in [0, 1) (got {self.eval_fraction})")
        if self.max_samples is not None and self.max_samples < 1:
            problems.append(f"max_samples must be at least 1 or None (got {self.max_samples})")
        for canonical, column in self.column_map:
            if canonical not in CANONICAL_FIELDS:
                problems.append(f"column map {canonical}={column}: {canonical!r} is not a field; "
                                f"fields: {', '.join(CANONICAL_FIELDS)}")
            if not column:
                problems.append(f"column map {canonical}=: the column name is empty")
        if problems:
            raise ConfigError("Invalid data settings.", problems=problems)

    def column_for(self, canonical: str) -> str:
        """The file's column that holds ``canonical`` (the field's own name when not mapped)."""
        for name, column in self.column_map:
            if name == canonical:
                return column
        return canonical


DATA_DEFAULTS = DataConfig(path=Path("-"))
"""Every setting's default (the path is a placeholder): the CLI's options and the app's widgets start from these."""


def parse_column_map(items: list[str] | tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """``["prompt=question", "completion=answer"]`` -> ``(("prompt", "question"), ...)``.

    Raises:
        ConfigError: an item is not of the form ``field=column``.
    """
    out: list[tuple[str, str]] = []
    for item in items:
        canonical, sep, column = item.partition("=")
        if not sep or not canonical.strip() or not column.strip():
            raise ConfigError(f"Column map item {item!r} is not field=column.",
                              hint="Write e.g. --map prompt=question --map completion=answer.")
        out.append((canonical.strip(), column.strip()))
    return tuple(out)
