"""Memory thresholds the stages and the planner share. (Measuring memory, the process's RAM and GPU peaks, is
:mod:`emloc_engine.machine.process_memory`.)"""

from __future__ import annotations

HIDDEN_OFFLOAD = 2**30
"""A streamed pass of the original (the λ search, emloc_engine.stages.correction.evaluation; the anchor chunks,
emloc_engine.stages.training.anchor_chunks) keeps its hidden states on the GPU between blocks up to this many
bytes and in CPU RAM past it, unless its stage is given a smaller threshold (``hidden_on_gpu_bytes``: the planner
gives 0 when keeping them would not fit the budget but offloading does). The planner counts the same threshold."""

ANCHOR_GROUP_TOKENS = 4096
"""The streamed anchor pass runs a chunk's examples together in groups of at most this many padded tokens, unless
its stage is given fewer (``anchor_group_tokens``: the planner gives one example's length when the larger groups'
activations would not fit the budget)."""

