"""What this process's memory peaks at: on a CUDA GPU (torch's allocator) over a block of work, and in RAM.

**GPU.** Every stage reports ``peak_vram_gib`` as ``torch.cuda.max_memory_allocated`` after
``torch.cuda.reset_peak_memory_stats`` at its start (the orchestrator stores it as the stage's
``measured_peak_gib``, beside the planner's prediction); :class:`GpuPeak` is that measurement for a
stage whose work may or may not touch a GPU.

**RAM.** The resident set size (RSS) counts file-backed pages too: the safetensors shards are memory-mapped
and read, and every page of them touched stays resident (page cache the kernel may drop at any time) and
counts, so a 14B run reported 78 GiB of peak RSS where the plan's RAM was 4 GiB. :func:`resident_memory`
splits it as Linux does in ``/proc/self/status``: ``anon`` = ``RssAnon + RssShmem`` (the heap, tensors,
pinned host buffers: what the RAM plan counts) and ``file`` = ``RssFile`` (mapped files and libraries).
Elsewhere (macOS, Windows) the whole RSS is taken as ``anon`` and ``file`` is 0. :class:`RssSampler` samples
both peaks in a thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")


def reset_gpu_peak(device: torch.device | None) -> None:
    """Start measuring a stage's GPU peak on ``device`` (resets torch's peak statistics; nothing off CUDA)."""
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak_gib(device: torch.device | None) -> float:
    """The peak GiB torch allocated on ``device`` since :func:`reset_gpu_peak` (0.0 off CUDA): a stage's ``peak_vram_gib``."""
    if device is None or device.type != "cuda":
        return 0.0
    return torch.cuda.max_memory_allocated(device) / 2**30


def release_pinned_host_cache() -> bool:
    """Give the pinned (page-locked) host memory that CUDA's host allocator keeps cached back to the OS.

    Freed pinned tensors stay cached for reuse: after anchored training held the original's blocks in
    pinned RAM (16 GB at Llama-3-8B shapes) the later stages of the same process kept them, so the
    correction and the export ran with 22 GiB of anonymous RSS where their plans count 4–5 GiB
    (H100, 2026-12-06). Released, a later pinned allocation pays ``cudaHostAlloc`` again, which for
    the streamed passes' few block-sized buffers is far cheaper than holding the whole model.

    Returns:
        True when a cache was emptied; False without CUDA or on a torch that has no such call.
    """
    if not torch.cuda.is_available():
        return False
    memory = getattr(getattr(torch, "accelerator", None), "memory", None)
    empty = getattr(memory, "empty_host_cache", None) or getattr(torch._C, "_host_emptyCache", None)
    if empty is None:
        return False
    empty()
    return True


class GpuPeak:
    """The peak memory torch allocates on ``device`` during a ``with`` block, in GiB (``gib``).

    The device's peak statistics are reset on entry and read on exit. On any device that is not CUDA
    (or ``None``: the work runs on no GPU) nothing is touched and ``gib`` stays 0.0.
    """

    def __init__(self, device: torch.device | None) -> None:
        self.device = device if device is not None and device.type == "cuda" else None
        self.gib = 0.0

    def __enter__(self) -> GpuPeak:
        reset_gpu_peak(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        self.gib = gpu_peak_gib(self.device)


@dataclass(frozen=True)
class ResidentMemory:
    """This process's resident memory in bytes: ``anon`` (anonymous + shared memory) and ``file`` (file-backed)."""

    anon: int
    file: int

    @property
    def total(self) -> int:
        """The whole RSS (``VmRSS``, what ``psutil``'s ``memory_info().rss`` reports)."""
        return self.anon + self.file


def parse_status(text: str) -> ResidentMemory | None:
    """The resident memory in a ``/proc/PID/status`` text, or ``None`` when it has no ``RssAnon``/``RssFile``
    lines (Linux before 4.5). ``anon`` = ``RssAnon + RssShmem`` (a missing ``RssShmem`` counts 0)."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key in ("RssAnon", "RssFile", "RssShmem"):
            number = value.split()[:1]  # the kernel writes kB (KiB): "RssAnon:\t  1234 kB"
            if not number or not number[0].isdigit():
                return None
            fields[key] = int(number[0]) * 1024
    if "RssAnon" not in fields or "RssFile" not in fields:
        return None
    return ResidentMemory(anon=fields["RssAnon"] + fields.get("RssShmem", 0), file=fields["RssFile"])


def resident_memory() -> ResidentMemory:
    """This process's resident memory now (see the module docstring): from ``/proc/self/status`` on Linux,
    else ``psutil``'s RSS as ``anon`` and 0 as ``file``."""
    try:
        found = parse_status(_STATUS.read_text(encoding="ascii", errors="replace"))
    except OSError:
        found = None
    if found is not None:
        return found
    import psutil

    return ResidentMemory(anon=int(psutil.Process().memory_info().rss), file=0)


class RssSampler:
    """Samples this process's resident memory in a thread (every ``interval_s`` and at both ends).

    ``peak_bytes`` is the largest whole RSS seen (file-backed pages included, as ``psutil`` reports it);
    ``peak_anon_bytes`` the largest anonymous + shared part (:func:`resident_memory`), the figure to compare
    with the RAM a plan allows.
    """

    def __init__(self, interval_s: float = 0.05) -> None:
        self._interval = interval_s
        self._stop = threading.Event()
        self.peak_bytes = self.peak_anon_bytes = 0
        self._sample()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        now = resident_memory()
        self.peak_bytes = max(self.peak_bytes, now.total)
        self.peak_anon_bytes = max(self.peak_anon_bytes, now.anon)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


__all__ = ["GpuPeak", "ResidentMemory", "RssSampler", "gpu_peak_gib", "parse_status", "reset_gpu_peak", "resident_memory"]
