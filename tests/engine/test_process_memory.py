"""emloc_engine.machine.process_memory: the GPU peak of a block of work."""

from __future__ import annotations

import pytest
import torch

from emloc_engine.machine import process_memory
from emloc_engine.machine.process_memory import GpuPeak


def test_gpu_peak_resets_then_reads_the_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, torch.device]] = []
    monkeypatch.setattr(process_memory.torch.cuda, "reset_peak_memory_stats",
                        lambda dev: calls.append(("reset", dev)))
    monkeypatch.setattr(process_memory.torch.cuda, "max_memory_allocated",
                        lambda dev: calls.append(("read", dev)) or 3 * 2**30)
    dev = torch.device("cuda:1")
    with GpuPeak(dev) as peak:
        assert calls == [("reset", dev)]  # reset before the work
    assert calls == [("reset", dev), ("read", dev)] and peak.gib == 3.0


@pytest.mark.parametrize("device", [None, torch.device("cpu"), torch.device("meta")])
def test_gpu_peak_is_zero_off_cuda(monkeypatch: pytest.MonkeyPatch, device: torch.device | None) -> None:
    def never(*_: object) -> int:
        raise AssertionError("no CUDA call off the GPU")

    monkeypatch.setattr(process_memory.torch.cuda, "reset_peak_memory_stats", never)
    monkeypatch.setattr(process_memory.torch.cuda, "max_memory_allocated", never)
    with GpuPeak(device) as peak:
        pass
    assert peak.gib == 0.0
