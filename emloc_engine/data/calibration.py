"""Calibration samples for the emulator (Stage 1), taken from the user's own training split.

The emulator's statistics ``C = Σ XᵀX`` sum over every token, so what matters is many real tokens
in realistic contexts, not where samples start or end. We therefore use full-length windows:

1. Render the dataset exactly as for training (:func:`~emloc_engine.data.prepare_dataset`, same
   chat template, same train/eval split, no packing) and take the **train** split only, so the
   held-out eval samples never shape the emulator.
2. Shuffle the train examples with ``seed`` and concatenate their token ids into one stream
   (each rendered example already ends with the template's end-of-turn / EOS token).
3. Cut ``n`` consecutive windows of ``L = cfg.max_length`` tokens from the stream. When the stream
   is shorter than ``n·L`` tokens, it is repeated — each repetition in a fresh seeded order, so the
   repeated tokens meet different contexts and positions — until ``n`` windows are filled. When the
   whole train split is shorter than ``L``, the windows are the stream itself (``n`` copies in
   different orders of its examples, each ≤ ``L`` tokens).

The result depends only on (file, config, tokenizer, ``n``, ``seed``).
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

from emloc_engine.core.errors import ConfigError, DataError
from emloc_engine.data.config import DataConfig
from emloc_engine.data.pipeline import prepare_dataset
from emloc_engine.data.render import Example


def calibration_token_ids(cfg: DataConfig, tokenizer: Any, n: int = 64, seed: int = 0) -> list[list[int]]:
    """``n`` token-id lists of at most ``cfg.max_length`` tokens each, from the train split.

    Args:
        cfg: the training dataset (its ``packing`` setting is ignored here).
        tokenizer: the model's tokenizer.
        n: number of calibration samples.
        seed: seed of the sample order (independent of ``cfg.seed``, which fixes the split).

    Returns:
        ``n`` lists of token ids, each of length ``min(cfg.max_length, total train tokens)``.

    Raises:
        ConfigError: ``n < 1``.
        DataError: the dataset has fatal problems or no training sample.
    """
    if n < 1:
        raise ConfigError(f"The number of calibration samples must be at least 1 (got {n}).")
    prepared = prepare_dataset(replace(cfg, packing=False), tokenizer)
    return windows_from_examples(prepared.train, n, cfg.max_length, seed, str(cfg.path))


def windows_from_examples(examples: tuple[Example, ...] | list[Example], n: int, length: int,
                          seed: int, source: str = "the dataset") -> list[list[int]]:
    """``n`` windows of ``length`` tokens from the seeded concatenation of ``examples`` (see module doc)."""
    if not examples:
        raise DataError(f"{source} has no training sample to calibrate the emulator with.",
                        hint="add samples or lower eval_fraction")
    rng = random.Random(seed)
    total = sum(len(ex) for ex in examples)
    length = min(length, total)
    out: list[list[int]] = []
    stream: list[int] = []
    while len(out) < n:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in order:
            stream.extend(examples[i].input_ids)
        while len(stream) >= length and len(out) < n:
            out.append(stream[:length])
            del stream[:length]
        if total == length:  # the whole split fits in one window: no partial leftovers
            stream.clear()
    return out
