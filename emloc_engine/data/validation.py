"""What is wrong with a dataset, where, and how bad: :class:`DataProblem`, :class:`DataReport`.

Problems are collected, never raised one at a time, so the user sees every problem of the file at
once. A *fatal* problem stops training (bad JSON, a missing field, an unknown role, no trainable
label in any sample, ...); a *warning* is reported and the sample is still used (truncated) or
skipped (no trainable label in that one sample).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from emloc_engine.core.errors import DataError

MAX_PROBLEMS_IN_ERROR = 200
"""A :class:`DataError` message lists at most this many problems (``report.problems`` has them all)."""

NO_LABEL_FIX = ("use --train-on all (loss on every token), or a model whose chat template marks "
                "assistant turns, or check that every sample has an assistant reply / completion "
                "that starts before max_length")


@dataclass(frozen=True)
class DataProblem:
    """One problem, located in the file.

    Attributes:
        file: the dataset file.
        line: 1-based line of the record (JSONL, CSV, JSON array item, .txt chunk start), or
            ``None`` when it concerns the whole file or has no line (Parquet rows).
        message: what is wrong and what to do.
        fatal: ``True`` stops training; ``False`` is a warning.
        item: 0-based record index for JSON arrays and Parquet rows, else ``None``.
        code: a short machine-readable kind (``bad_json``, ``missing_field``, ``empty_field``,
            ``unknown_role``, ``wrong_type``, ``truncated``, ``no_labels``, ``all_masked``,
            ``no_chat_template``, ``template_error``, ``empty_file``, ``unknown_format``,
            ``not_found``, ``no_samples``, ``too_large``, ``not_text``).
    """

    file: str
    line: int | None
    message: str
    fatal: bool
    item: int | None = None
    code: str = ""

    def where(self) -> str:
        """``file:line`` (``file: item 3 (line 12)`` for JSON arrays, ``file: row 3`` for Parquet)."""
        if self.line is not None and self.item is not None:
            return f"{self.file}:{self.line}: item {self.item}"
        if self.line is not None:
            return f"{self.file}:{self.line}"
        if self.item is not None:
            return f"{self.file}: row {self.item}"
        return self.file

    def __str__(self) -> str:
        kind = "error" if self.fatal else "warning"
        return f"{self.where()}: {kind}: {self.message}"


@dataclass(frozen=True)
class LengthStats:
    """Length statistics of the samples, in ``unit`` (``"tokens"`` or ``"chars"``); p95 is nearest-rank."""

    unit: str
    min: int
    mean: float
    p95: int
    max: int

    @classmethod
    def of(cls, lengths: list[int], unit: str) -> LengthStats | None:
        """Statistics of ``lengths`` (``None`` when empty)."""
        if not lengths:
            return None
        ordered = sorted(lengths)
        rank = max(1, math.ceil(0.95 * len(ordered)))  # nearest-rank percentile
        return cls(unit, ordered[0], sum(ordered) / len(ordered), ordered[rank - 1], ordered[-1])


@dataclass(frozen=True)
class DataReport:
    """The result of inspecting a dataset: counts, lengths, previews and every problem.

    Attributes:
        path: the dataset file.
        format: the record format used (detected or given); ``"unknown"`` if none fits.
        n_records: records parsed from the file (lines/rows/items; bad JSON not counted; .txt: chunks).
        n_samples: usable samples (for .txt with a tokenizer: pieces of ≤ max_length tokens).
        n_train, n_eval: samples in each split (before packing).
        token_stats: rendered token lengths before truncation (``None`` without a tokenizer).
        char_stats: character lengths of the sample text (always).
        n_truncated: samples longer than max_length (cut).
        n_no_labels: samples left without any trainable token (skipped).
        n_label_tokens: trainable tokens over all samples (after truncation); 0 without a tokenizer.
        rendered_examples: the first few samples as the model will see them.
        rendered_labels: for the same samples, the text the loss is computed on (spans joined by `` … ``).
        problems: every problem, in file order per kind.
        fingerprint: sha256 prefix of the file content and the settings (for the run manifest).
        tokenizer: name or path of the tokenizer used, ``None`` if structure only.
    """

    path: str
    format: str
    n_records: int
    n_samples: int
    n_train: int
    n_eval: int
    token_stats: LengthStats | None
    char_stats: LengthStats | None
    n_truncated: int
    n_no_labels: int
    n_label_tokens: int
    rendered_examples: list[str] = field(default_factory=list)
    rendered_labels: list[str] = field(default_factory=list)
    problems: list[DataProblem] = field(default_factory=list)
    fingerprint: str = ""
    tokenizer: str | None = None

    @property
    def fatal_problems(self) -> list[DataProblem]:
        """The problems that stop training."""
        return [p for p in self.problems if p.fatal]

    @property
    def warnings(self) -> list[DataProblem]:
        """The problems reported but not blocking."""
        return [p for p in self.problems if not p.fatal]

    @property
    def ok(self) -> bool:
        """``True`` when nothing fatal was found."""
        return not self.fatal_problems

    def raise_if_fatal(self) -> None:
        """Raise one :class:`DataError` listing every fatal problem.

        Raises:
            DataError: ``problems`` holds one ``file:line: error: message`` per fatal problem (at most
                :data:`MAX_PROBLEMS_IN_ERROR`, then a count of the rest); ``error.report`` is this report.
        """
        fatal = self.fatal_problems
        if not fatal:
            return
        lines = [str(p) for p in fatal[:MAX_PROBLEMS_IN_ERROR]]
        if len(fatal) > MAX_PROBLEMS_IN_ERROR:
            lines.append(f"... and {len(fatal) - MAX_PROBLEMS_IN_ERROR} more "
                         f"(run `emloc data {self.path}` to list them all)")
        codes = Counter(p.code for p in fatal)
        hint = _hint_for(codes)
        err = DataError(f"The dataset {self.path} cannot be used: {len(fatal)} problem(s).",
                        problems=lines, hint=hint)
        err.report = self  # type: ignore[attr-defined]
        raise err


def _hint_for(codes: Counter[str]) -> str:
    if codes.get("all_masked"):
        return NO_LABEL_FIX
    if codes.get("unknown_format"):
        return "pass --format (one of the formats listed) and --map field=column for other column names"
    if codes.get("not_found") or codes.get("empty_file"):
        return "point at a non-empty dataset file"
    return "fix the listed lines (or remove them) and run `emloc data` again"


class ProblemLog:
    """Collects problems for one file; counts them by code."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[DataProblem] = []
        self.counts: Counter[str] = Counter()

    def add(self, line: int | None, message: str, *, fatal: bool, code: str, item: int | None = None) -> None:
        """Record one problem."""
        self.problems.append(DataProblem(self.file, line, message, fatal, item, code))
        self.counts[code] += 1

    def error(self, line: int | None, message: str, code: str, item: int | None = None) -> None:
        """Record a fatal problem."""
        self.add(line, message, fatal=True, code=code, item=item)

    def warn(self, line: int | None, message: str, code: str, item: int | None = None) -> None:
        """Record a warning."""
        self.add(line, message, fatal=False, code=code, item=item)

    @property
    def has_fatal(self) -> bool:
        return any(p.fatal for p in self.problems)


def split_sizes(n: int, eval_fraction: float) -> tuple[int, int]:
    """``(n_train, n_eval)`` of the seeded split.

    ``n_eval = clamp(round(n·f), 1, n − 1)`` when ``n ≥ 2`` and ``f > 0``; no eval sample otherwise.
    """
    if n < 2 or eval_fraction <= 0.0:
        return n, 0
    n_eval = min(n - 1, max(1, round(n * eval_fraction)))
    return n - n_eval, n_eval
