"""The knobs of Stage 3 a user sets: pure data (no torch), so the CLI and the app read them cheaply."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from emloc_engine.core.errors import ConfigError

DEFAULT_GRID = (0.0, 0.5, 1.0, 3.0, math.inf)
EVAL_DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_lambda(value: float, what: str) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a number ≥ 0 or ∞."""
    if math.isnan(value) or value < 0:
        raise ConfigError(f"{what} must be a number ≥ 0 or inf (got {value}).",
                          hint="Use 0 (no correction), 3 (the paper's value), inf (exact) or auto.")


@dataclass(frozen=True, kw_only=True)
class CorrectionOptions:
    """The knobs of Stage 3 a user sets (``RunConfig.correct``)."""

    lambda_: float | None = field(default=None, metadata={
        "help": "Damping λ: None = chosen on held-out data; inf = exact correction; 0 = no correction."})
    lambda_grid: tuple[float, ...] = field(default=DEFAULT_GRID, metadata={
        "help": "Candidate λ values tried when λ is chosen automatically."})
    dtype: str = field(default="auto", metadata={"choices": EVAL_DTYPES,
        "help": "Dtype of the original model during evaluation: auto (bf16 on GPU, fp32 on CPU), float32, "
                "bfloat16, float16."})
    max_eval_batches: int = field(default=64, metadata={"help": "At most this many eval batches per λ."})
    eval_batch_size: int = field(default=1, metadata={
        "help": "Examples per eval batch; 1 keeps λ selection within the inference peak."})

    def __post_init__(self) -> None:
        if self.lambda_ is not None:
            check_lambda(float(self.lambda_), "λ (--lambda)")
        if not self.lambda_grid:
            raise ConfigError("The λ grid is empty.", hint="Give at least one λ, e.g. 0, 1, 3, inf.")
        for lam in self.lambda_grid:
            check_lambda(float(lam), "Every λ of the grid")
        if self.max_eval_batches < 1 or self.eval_batch_size < 1:
            raise ConfigError("max_eval_batches and eval_batch_size must be at least 1 "
                              f"(got {self.max_eval_batches}, {self.eval_batch_size}).")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"Unknown dtype {self.dtype!r}.", hint="Use auto, float32, bfloat16 or float16.")
