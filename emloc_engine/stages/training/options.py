"""The knobs of Stage 2 a user sets: pure data (no torch), so the CLI and the app read them cheaply."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from emloc_engine.core.errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant")
TRAIN_DTYPES = ("auto", "bfloat16", "float16", "float32")
ANCHORS = ("auto", "blocks", "linears", "none")


@dataclass(frozen=True, kw_only=True)
class TrainOptions:
    """The knobs of LoRA training a user sets (each field's ``help`` is the CLI help and the app's tooltip).

    :class:`TrainConfig` adds where the run lives and what it reads; ``RunConfig.train`` holds these alone.
    """

    rank: int = field(default=16, metadata={"help": "LoRA rank r; adapter and optimizer memory grow linearly with it."})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha; the update is scaled by alpha/r (alpha/√r with rsLoRA)."})
    dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input during training."})
    target_modules: tuple[str, ...] = field(default=(), metadata={
        "help": "Modules that get LoRA (leaf names like q_proj or full names); empty = every linear layer of the blocks."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA: scale alpha/√r instead of alpha/r."})
    steps: int = field(default=100, metadata={"help": "Optimizer steps to train."})
    lr: float = field(default=2e-4, metadata={"help": "Peak learning rate of AdamW."})
    batch_size: int = field(default=4, metadata={"help": "Samples per micro-batch; lower it if memory runs out."})
    grad_accum: int = field(default=1, metadata={
        "help": "Micro-batches per optimizer step (effective batch = batch_size × grad_accum)."})
    warmup_steps: int = field(default=10, metadata={
        "help": "Linear warmup steps (if not fewer than steps, a tenth of the steps is used)."})
    schedule: str = field(default="cosine", metadata={"choices": SCHEDULES, "help": "Learning-rate decay after warmup: cosine, linear or constant."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on the LoRA weights."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the gradient norm to this (0 = no clipping)."})
    grad_checkpointing: bool = field(default=True, metadata={
        "help": "Recompute block activations in the backward pass: much less memory, about 30% slower."})
    eval_every: int = field(default=25, metadata={"help": "Eval loss every N steps (0 = only at the end)."})
    max_eval_batches: int = field(default=32, metadata={"help": "At most this many eval micro-batches per evaluation."})
    save_every: int = field(default=25, metadata={"help": "Checkpoint every N steps (0 = only at the end or on cancel)."})
    keep_checkpoints: int = field(default=2, metadata={"help": "How many of the newest checkpoints to keep."})
    dtype: str = field(default="auto", metadata={"choices": TRAIN_DTYPES,
        "help": "Weights/compute dtype: auto (bf16 on GPUs that have it, else fp16; fp32 on CPU), bfloat16, float16, float32."})
    anchor: str = field(default="auto", metadata={"choices": ANCHORS,
        "help": "Anchor the emulator to the original at every block on the training examples, so the adapter "
                "learns the task rather than repairs of the emulator (measured: far more of the gain reaches the "
                "original). auto = at every block whenever one step's offsets fit --anchor-ram-gib (any dataset size, "
                "any number of GPUs); "
                "blocks = at every block; linears = at every linear layer (every adapter reads the original's "
                "input, measured a little better, but 5-9x the offsets, on the GPU too); none = off."})
    anchor_ram_gib: float = field(default=4.0, metadata={
        "help": "Most RAM the anchors' offsets take at once, in GiB: they are computed for the next chunk of "
                "examples that fits, and dropped after use, so any dataset size stays anchored (split over "
                "the GPUs when training on several)."})

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ConfigError("Invalid training settings.", problems=problems)

    def _problems(self) -> list[str]:
        checks = [
            (self.rank >= 1, f"LoRA rank must be at least 1 (got {self.rank})."),
            (self.alpha > 0, f"LoRA alpha must be positive (got {self.alpha})."),
            (0.0 <= self.dropout < 1.0, f"LoRA dropout must be in [0, 1) (got {self.dropout})."),
            (self.steps >= 1, f"steps must be at least 1 (got {self.steps})."),
            (self.lr > 0 and math.isfinite(self.lr), f"learning rate must be positive (got {self.lr})."),
            (self.batch_size >= 1, f"batch size must be at least 1 (got {self.batch_size})."),
            (self.grad_accum >= 1, f"gradient accumulation must be at least 1 (got {self.grad_accum})."),
            (self.warmup_steps >= 0, f"warmup steps cannot be negative (got {self.warmup_steps})."),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)} (got {self.schedule!r})."),
            (self.weight_decay >= 0, f"weight decay cannot be negative (got {self.weight_decay})."),
            (self.max_grad_norm >= 0, f"max grad norm cannot be negative (got {self.max_grad_norm})."),
            (self.eval_every >= 0, f"eval_every cannot be negative (got {self.eval_every})."),
            (self.max_eval_batches >= 1, f"max_eval_batches must be at least 1 (got {self.max_eval_batches})."),
            (self.save_every >= 0, f"save_every cannot be negative (got {self.save_every})."),
            (self.keep_checkpoints >= 1, f"keep_checkpoints must be at least 1 (got {self.keep_checkpoints})."),
            (self.dtype in TRAIN_DTYPES, f"dtype must be one of {', '.join(TRAIN_DTYPES)} (got {self.dtype!r})."),
            (all(isinstance(t, str) and t for t in self.target_modules), "target module names must be non-empty."),
            (self.anchor_ram_gib > 0 and math.isfinite(self.anchor_ram_gib),
             f"anchor_ram_gib must be a positive number of GiB (got {self.anchor_ram_gib})."),
            (self.anchor in ANCHORS,
             f"anchor must be auto, blocks, linears or none (got {self.anchor!r})."),
        ]
        return [msg for ok, msg in checks if not ok]
