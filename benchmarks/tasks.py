"""The quality benchmark's two downstream tasks, built only from data shipped in packages or generated.

* ``shakespeare``: domain adaptation. Train on plain-text chunks of 32 plays (the demo dataset
  ``shakespeare-text`` of :mod:`emloc_engine.catalog.demo`), score the mean next-token loss (and perplexity)
  on a play never seen in training (The Tempest).
* ``formats``: an exact-match task under greedy decoding, generated with a seeded RNG. Each prompt
  asks for one of three deterministic rewrites with a single correct answer:

  - an ISO date in words: ``2031-04-07`` -> ``April 7, 2031``;
  - a list of 4-6 distinct integers in ascending order: ``42, 7, 19`` -> ``7, 19, 42``;
  - a name as "Last, First": ``Ada Lovelace`` -> ``Lovelace, Ada``.

  The test prompts are disjoint from the training prompts (same generator, other seed, exact
  duplicates dropped). The chat template's default system prompt is whatever the model's template
  adds; the instruction is fixed per kind, so a zero-shot model can in principle answer correctly.

:class:`Task` bundles the training data (with its validation split, used for λ = auto), the test
file and the metric. Nothing here loads a model.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from emloc_engine.data import DataConfig

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
FIRST_NAMES = ("Ada", "Alan", "Grace", "Edsger", "Barbara", "Donald", "Frances", "John", "Margaret", "Niklaus",
               "Radia", "Ken", "Dennis", "Hedy", "Tim", "Katherine", "Claude", "Sophie", "Linus", "Karen",
               "Peter", "Maria", "Omar", "Yuki", "Priya", "Lars", "Chen", "Amara", "Diego", "Ingrid")
LAST_NAMES = ("Lovelace", "Turing", "Hopper", "Dijkstra", "Liskov", "Knuth", "Allen", "Backus", "Hamilton",
              "Wirth", "Perlman", "Thompson", "Ritchie", "Lamarr", "Berners", "Johnson", "Shannon", "Wilson",
              "Torvalds", "Jones", "Naur", "Curie", "Haddad", "Tanaka", "Sharma", "Nilsson", "Wang", "Okafor",
              "Garcia", "Berg")


@dataclass(frozen=True)
class Task:
    """One benchmark task.

    Attributes:
        name: short name used in tables and JSON.
        data: the training dataset; its eval split is the validation set (λ = auto chooses on it).
        test_path: held-out test file (same format as ``data``), never trained or calibrated on.
        metric: ``"loss"`` (lower is better; perplexity reported too) or ``"exact_match"`` (higher is better).
        description: one line for the results.
    """

    name: str
    data: DataConfig
    test_path: Path
    metric: str
    description: str

    @property
    def test_data(self) -> DataConfig:
        """The test file with the training file's rendering settings and no split."""
        return DataConfig(path=self.test_path, format=self.data.format, max_length=self.data.max_length,
                          train_on=self.data.train_on, eval_fraction=0.0, seed=self.data.seed)


def _date(rng: random.Random) -> tuple[str, str]:
    y, m, d = rng.randint(1900, 2099), rng.randint(1, 12), rng.randint(1, 28)
    return f"Write the date {y:04d}-{m:02d}-{d:02d} in words.", f"{MONTHS[m - 1]} {d}, {y}"


def _sort(rng: random.Random) -> tuple[str, str]:
    nums = rng.sample(range(1, 100), rng.randint(4, 6))
    return (f"Sort these numbers in ascending order: {', '.join(map(str, nums))}",
            ", ".join(map(str, sorted(nums))))


def _name(rng: random.Random) -> tuple[str, str]:
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    return f"Rewrite the name as 'Last, First': {first} {last}", f"{last}, {first}"


GENERATORS: tuple[Callable[[random.Random], tuple[str, str]], ...] = (_date, _sort, _name)


def format_examples(n: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """``n`` distinct (prompt, answer) pairs, kinds in rotation, none of whose prompts is in ``exclude``."""
    rng = random.Random(seed)
    seen: set[str] = set(exclude)
    out: list[tuple[str, str]] = []
    while len(out) < n:
        prompt, answer = GENERATORS[len(out) % len(GENERATORS)](rng)
        if prompt not in seen:
            seen.add(prompt)
            out.append((prompt, answer))
    return out


def _write_messages(path: Path, pairs: list[tuple[str, str]]) -> None:
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]} for p, a in pairs]
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")


def formats_task(out_dir: Path, *, n_train: int = 1200, n_test: int = 150, max_length: int = 128,
                 seed: int = 0) -> Task:
    """Write the exact-match task's train/test JSONL files into ``out_dir`` and describe the task.

    Args:
        out_dir: folder for ``formats_train.jsonl`` and ``formats_test.jsonl``.
        n_train: training conversations (10% of them become the validation split).
        n_test: test conversations (prompts disjoint from training).
        max_length: tokens per sequence.
        seed: generator seed (training uses ``seed``, test ``seed + 1``).

    Returns:
        The :class:`Task` (metric ``exact_match``).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    train = format_examples(n_train, seed)
    test = format_examples(n_test, seed + 1, exclude=frozenset(p for p, _ in train))
    _write_messages(out_dir / "formats_train.jsonl", train)
    _write_messages(out_dir / "formats_test.jsonl", test)
    data = DataConfig(path=out_dir / "formats_train.jsonl", format="messages", max_length=max_length,
                      train_on="assistant", eval_fraction=0.1, seed=seed)
    return Task("formats", data, out_dir / "formats_test.jsonl", "exact_match",
                f"exact match (greedy) on {n_test} held-out rewrites: ISO date -> words, sort 4-6 integers, "
                f"'Last, First'; {n_train} training conversations")


def shakespeare_task(train_path: Path, test_path: Path, *, max_length: int = 128, seed: int = 0,
                     description: str = "") -> Task:
    """The domain-adaptation task on plain-text files (``{"text": ...}`` rows).

    Args:
        train_path: training chunks (5% become the validation split).
        test_path: the held-out play's chunks.
        max_length: tokens per sequence (longer chunks are truncated).
        seed: split seed.
        description: one line for the results.
    """
    data = DataConfig(path=train_path, format="text", max_length=max_length, train_on="all",
                      eval_fraction=0.05, seed=seed)
    return Task("shakespeare", data, test_path, "loss",
                description or f"held-out next-token loss on {test_path.name}")


def demo_shakespeare_task(*, max_length: int = 128, seed: int = 0) -> Task:
    """:func:`shakespeare_task` on the demo dataset ``shakespeare-text`` (held out: The Tempest).

    Raises:
        DemoAssetsMissing: the ``shakespeare`` package is not installed.
    """
    from emloc_engine.catalog.demo import HELDOUT_PLAY, TRAIN_PLAYS, ensure_demo_datasets

    ds = next(d for d in ensure_demo_datasets() if d.name == "shakespeare-text")
    assert ds.heldout_path is not None
    return shakespeare_task(ds.path, ds.heldout_path, max_length=max_length, seed=seed,
                            description=f"held-out next-token loss on {HELDOUT_PLAY} (train: {len(TRAIN_PLAYS)} other "
                                        f"plays, {ds.n_examples} chunks)")
