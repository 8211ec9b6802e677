"""Measuring memory: the process's peak resident set size, sampled in a thread."""

from __future__ import annotations

import threading

HIDDEN_OFFLOAD = 2**30
"""A streamed pass of the original (the λ search, emloc_engine.stages.correction.evaluation; the anchor chunks,
emloc_engine.stages.training.anchor_chunks) keeps its hidden states on the GPU between blocks up to this many
bytes and in CPU RAM past it, unless its stage is given a smaller threshold (``hidden_on_gpu_bytes``: the planner
gives 0 when keeping them would not fit the budget but offloading does). The planner counts the same threshold."""

ANCHOR_GROUP_TOKENS = 4096
"""The streamed anchor pass runs a chunk's examples together in groups of at most this many padded tokens, unless
its stage is given fewer (``anchor_group_tokens``: the planner gives one example's length when the larger groups'
activations would not fit the budget)."""


class RssSampler:
    """Samples this process's resident set size in a thread; ``peak_bytes`` is the largest seen."""

    def __init__(self, interval_s: float = 0.05) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval_s
        self._stop = threading.Event()
        self.peak_bytes = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)
