"""Keep a model's input-embedding table in CPU memory while the rest of it runs on the GPU.

An embedding lookup reads a few rows of a large table (Llama-3-8B: 128k × 4096, 1.0 GiB in bf16;
InternVL2.5-8B: 0.7 GiB), so it costs nothing to do it on the CPU and send only the looked-up rows
to the GPU. The λ search of the correction (original + adapter, no gradients) does this: the GPU
then holds the original minus its embeddings plus the adapter, which keeps the stage under the
model's own inference peak. Measured on an H100 (2026-12-05) before this: InternVL2.5-8B shapes'
λ search peaked at 15.38 GiB against an inference peak of 15.14 GiB.

Only for untied embeddings: when the output head shares the table, the head needs it on the GPU.
The table is held outside the module tree, so ``model.to(device)`` and ``model.parameters()``
leave it alone; no gradient ever reaches it (it is frozen wherever this is used).
"""

from __future__ import annotations

from typing import Any

import torch


class CpuInputEmbeddings(torch.nn.Module):
    """Looks ids up in a CPU-resident embedding module and moves the rows to ``device``."""

    _table: Any

    def __init__(self, table: torch.nn.Module, device: torch.device | str) -> None:
        super().__init__()
        object.__setattr__(self, "_table", table.to("cpu"))  # not a submodule: .to()/.parameters() skip it
        self.device = torch.device(device)

    @property
    def table(self) -> torch.nn.Module:
        """The wrapped embedding module (on the CPU)."""
        table: torch.nn.Module = self._table
        return table

    @property
    def weight(self) -> torch.Tensor:
        """The table's weight (on the CPU), for code that reads ``get_input_embeddings().weight``."""
        weight: torch.Tensor = self._table.weight
        return weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows: torch.Tensor = self._table(input_ids.to("cpu"))
        return rows.to(self.device)


def tied_embeddings(model: Any) -> bool:
    """Whether the output head uses the input-embedding table itself."""
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def keep_input_embeddings_on_cpu(model: Any, device: torch.device | str) -> bool:
    """Move ``model``'s input embeddings to the CPU behind a :class:`CpuInputEmbeddings`; frees them on the GPU.

    Call before or after the rest of the model is moved to ``device``. Returns False (and changes
    nothing) when the embeddings are tied to the head or ``device`` is the CPU.
    """
    dev = torch.device(device)
    current = model.get_input_embeddings()
    if dev.type == "cpu" or isinstance(current, CpuInputEmbeddings) or tied_embeddings(model):
        return False
    model.set_input_embeddings(CpuInputEmbeddings(current, dev))
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return True


__all__ = ["CpuInputEmbeddings", "keep_input_embeddings_on_cpu", "tied_embeddings"]
