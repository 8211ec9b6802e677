"""Which examples each training step sees, and how they become a padded batch.

The data order is stateless and seeded, so the position in it is a function of the step: resuming
at step ``s`` continues exactly where an uninterrupted run would be, every data-parallel process
can compute the whole step's examples on its own, and anchored training knows in advance which
examples the run will visit. The trainer, anchoring, the distributed trainer and the λ search
share these helpers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch

from emloc_engine.core.errors import ConfigError

IGNORE_INDEX = -100
"""Label of positions without loss (Hugging Face convention)."""


class ExampleLike(Protocol):
    """What training and evaluation need of a tokenised example (``emloc_engine.data.Example``).

    ``labels`` is aligned with ``input_ids`` (Hugging Face convention; the loss shifts by one);
    ``-100`` marks positions without loss.
    """

    @property
    def input_ids(self) -> Sequence[int]: ...

    @property
    def labels(self) -> Sequence[int]: ...


def micro_batch_indices(n_examples: int, batch_size: int, seed: int, index: int) -> list[int]:
    """Example indices of global micro-batch ``index`` (0-based).

    Epoch ``e`` visits a permutation seeded with ``(seed, e)``; its last batch may be short.
    Resuming at step ``s`` with accumulation ``g`` continues at micro-batch ``s·g``: the same
    order an uninterrupted run sees.
    """
    per_epoch = math.ceil(n_examples / batch_size)
    epoch, pos = divmod(index, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_examples, generator=gen)
    return [int(i) for i in order[pos * batch_size:(pos + 1) * batch_size]]


def visited_examples(n_examples: int, batch_size: int, seed: int, micro_batches: int) -> list[int]:
    """Sorted indices of the examples that ``micro_batches`` micro-batches of training visit."""
    seen: set[int] = set()
    for m in range(micro_batches):
        seen.update(micro_batch_indices(n_examples, batch_size, seed, m))
    return sorted(seen)


def collate(examples: Sequence[ExampleLike], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: ``input_ids`` with ``pad_id``, ``labels`` with -100, mask 0.

    Raises:
        ConfigError: an example has a different number of labels than input ids.
    """
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        if len(e.labels) != n:
            raise ConfigError(f"An example has {n} input ids but {len(e.labels)} labels.")
        ids[row, :n] = torch.tensor(list(e.input_ids), dtype=torch.long)
        labels[row, :n] = torch.tensor(list(e.labels), dtype=torch.long)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Positions that carry loss after the one-token shift."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


__all__ = ["IGNORE_INDEX", "ExampleLike", "collate", "label_tokens", "micro_batch_indices", "visited_examples"]
