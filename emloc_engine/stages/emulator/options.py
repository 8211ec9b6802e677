"""The knobs of Stage 1 a user sets: pure data (no torch), so the CLI and the app read them cheaply."""

from __future__ import annotations

from dataclasses import dataclass, field

from emloc_engine.core.errors import ConfigError

ALLOCATIONS = ("uniform", "spectral")
SOLVERS = ("eigh", "randomized")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclass(frozen=True, kw_only=True)
class EmulatorOptions:
    """The knobs of Stage 1 a user sets (``RunConfig.emulator``); ρ itself is the run's (or the planner's)."""

    ratio_overrides: tuple[tuple[str, float], ...] = field(default=(), metadata={
        "help": "(pattern, ρ) on full module names (fnmatch; last match wins); ρ ≥ 1 keeps the module dense."})
    dense_patterns: tuple[str, ...] = field(default=(), metadata={
        "help": "Module name patterns (fnmatch on full names, e.g. '*.31.mlp.down_proj') kept dense."})
    rank_overrides: tuple[tuple[str, int], ...] = field(default=(), metadata={
        "help": "(pattern, k) fixing the rank of matching modules (clamped to min(out, in))."})
    compute_dtype: str = field(default="auto", metadata={"choices": ("auto", *COMPUTE_DTYPES),
        "help": "dtype of the block forward: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16, float64."})
    linalg_dtype: str = field(default="auto", metadata={"choices": ("auto", "float32", "float64"),
        "help": "dtype of the factorisation: auto (fp32 on CUDA, fp64 on CPU), float32 or float64."})
    solver: str = field(default="eigh", metadata={"choices": SOLVERS,
        "help": "eigh (exact) or randomized (subspace iteration; faster on big layers, slightly worse)."})
    chunk_tokens: int | None = field(default=None, metadata={
        "help": "Padded tokens per forward chunk (default: from the memory budget)."})
    min_calibration_tokens: int | None = field(default=None, metadata={
        "help": "Fewest real calibration tokens accepted (default: the model's hidden size)."})
    allocation: str = field(default="uniform", metadata={"choices": ALLOCATIONS,
        "help": "uniform: every module at k = floor(ρ·out·in/(out+in)). spectral: a first streamed pass measures "
                "each module's whitened spectrum and the same parameter budget is redistributed where it removes "
                "the most relative error (some modules become dense); better transfer at ρ ≥ 0.4, worse at 0.25. "
                "User settings combine: dense patterns and ρ ≥ 1 overrides stay dense and are outside the budget, "
                "rank overrides are kept as given and outside the budget, other ρ overrides set their module's "
                "share of the budget."})


    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ConfigError("Invalid emulator settings.", problems=problems)

    def _problems(self) -> list[str]:
        problems = [f"ratio override {p!r} must be > 0 (got {r})" for p, r in self.ratio_overrides if not r > 0]
        problems += [f"rank override {p!r} must be >= 1 (got {k})" for p, k in self.rank_overrides if k < 1]
        if self.compute_dtype != "auto" and self.compute_dtype not in COMPUTE_DTYPES:
            problems.append(f"compute_dtype must be auto or one of {', '.join(COMPUTE_DTYPES)} (got {self.compute_dtype!r})")
        if self.linalg_dtype not in ("auto", "float32", "float64"):
            problems.append(f"linalg_dtype must be auto, float32 or float64 (got {self.linalg_dtype!r})")
        if self.allocation not in ALLOCATIONS:
            problems.append(f"allocation must be one of {', '.join(ALLOCATIONS)} (got {self.allocation!r})")
        if self.solver not in SOLVERS:
            problems.append(f"solver must be one of {', '.join(SOLVERS)} (got {self.solver!r})")
        if self.chunk_tokens is not None and self.chunk_tokens < 1:
            problems.append("chunk_tokens must be >= 1")
        return problems
