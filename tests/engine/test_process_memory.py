"""emloc_engine.machine.process_memory: the GPU peak of a block of work; the process's RAM without the pages of
memory-mapped files."""

from __future__ import annotations

import contextlib
import gc
import mmap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from emloc_engine.machine import process_memory
from emloc_engine.machine.process_memory import (
    GpuPeak,
    ResidentMemory,
    RssSampler,
    parse_status,
    resident_memory,
)

MIB = 2**20


@contextlib.contextmanager
def _no_collection() -> Iterator[None]:
    """Earlier tests' garbage collected now, and no collection inside: a collection triggered mid-measurement
    frees their tensors and shrinks the RSS by as much as the buffer under test adds (seen once in a full
    suite: +10 MiB measured for a 64 MiB buffer)."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
STATUS = """Name:\tpython
Umask:\t0022
State:\tR (running)
VmPeak:\t 9000000 kB
VmHWM:\t 8300000 kB
VmRSS:\t 8200000 kB
RssAnon:\t 1000000 kB
RssFile:\t 7000000 kB
RssShmem:\t  200000 kB
VmData:\t 2000000 kB
VmSwap:\t       0 kB
"""


def _linux_split() -> bool:
    try:
        return parse_status(Path("/proc/self/status").read_text()) is not None
    except OSError:
        return False


LINUX = _linux_split()


def test_gpu_peak_resets_then_reads_the_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, torch.device]] = []

    def read(dev: torch.device) -> int:
        calls.append(("read", dev))
        return 3 * 2**30

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda dev: calls.append(("reset", dev)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", read)
    dev = torch.device("cuda:1")
    with GpuPeak(dev) as peak:
        assert calls == [("reset", dev)]  # reset before the work
    assert calls == [("reset", dev), ("read", dev)] and peak.gib == 3.0


@pytest.mark.parametrize("device", [None, torch.device("cpu"), torch.device("meta")])
def test_gpu_peak_is_zero_off_cuda(monkeypatch: pytest.MonkeyPatch, device: torch.device | None) -> None:
    def never(*_: object) -> int:
        raise AssertionError("no CUDA call off the GPU")

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", never)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", never)
    with GpuPeak(device) as peak:
        pass
    assert peak.gib == 0.0


def test_status_is_split_into_anonymous_and_file_backed() -> None:
    got = parse_status(STATUS)
    assert got == ResidentMemory(anon=(1_000_000 + 200_000) * 1024, file=7_000_000 * 1024)
    assert got is not None and got.total == 8_200_000 * 1024  # VmRSS: the whole RSS, as before
    assert parse_status(STATUS.replace("RssShmem:\t  200000 kB\n", "")) == ResidentMemory(1_000_000 * 1024,
                                                                                          7_000_000 * 1024)
    no_split = "\n".join(line for line in STATUS.splitlines() if not line.startswith(("RssAnon", "RssFile")))
    assert parse_status(no_split) is None  # Linux before 4.5: the caller falls back to psutil
    assert parse_status(STATUS.replace("1000000 kB", "? kB")) is None


def test_without_proc_status_the_whole_rss_counts_as_anonymous(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    monkeypatch.setattr(process_memory, "_STATUS", tmp_path / "absent")  # as on macOS and Windows
    got = resident_memory()
    assert got.file == 0 and abs(got.anon - psutil.Process().memory_info().rss) < 64 * MIB


@contextlib.contextmanager
def _fresh_anonymous_pages(size: int) -> Iterator[mmap.mmap]:
    """``size`` bytes of a new private anonymous mapping, every page written to 1. Not ``np.ones``: malloc may
    hand back pages this process already holds (a fresh clone's full suite, 2026-12-07: +18 MiB and +8 KiB of
    RssAnon for a 64 MiB ``np.ones``), and then nothing new becomes resident."""
    with mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as region:
        view = np.frombuffer(region, dtype=np.uint8)
        view[:] = 1
        del view  # no exported buffer left, so the mapping can be closed
        yield region


@pytest.mark.skipif(not LINUX, reason="needs /proc/self/status with RssAnon (Linux ≥ 4.5)")
def test_a_touched_buffer_is_anonymous_and_a_mapped_file_is_not(tmp_path: Path) -> None:
    with _no_collection():
        before = resident_memory()
        with _fresh_anonymous_pages(64 * MIB) as buf:
            after = resident_memory()
            assert buf[::4096] == b"\x01" * (64 * MIB // 4096)
    assert after.anon - before.anon >= 48 * MIB
    shard = tmp_path / "shard.bin"
    shard.write_bytes(b"\x01" * (64 * MIB))
    with (_no_collection(), open(shard, "rb") as fh,
          mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped):
        before = resident_memory()
        assert int(np.frombuffer(mapped, dtype=np.uint8)[::4096].sum()) == 64 * MIB // 4096  # every page read
        after = resident_memory()
    assert after.file - before.file >= 48 * MIB  # the page cache of a mapped file: resident, but not anonymous
    assert after.anon - before.anon < 16 * MIB


@pytest.mark.skipif(not LINUX, reason="needs /proc/self/status with RssAnon (Linux ≥ 4.5)")
def test_sampler_records_the_anonymous_peak_beside_the_whole_one() -> None:
    with _no_collection(), contextlib.ExitStack() as keep:  # the pages outlive the sampler's last sample
        sampler = RssSampler(interval_s=60.0)  # the samples at both ends decide, not the thread's timing
        start = sampler.peak_anon_bytes
        with sampler:
            buf = keep.enter_context(_fresh_anonymous_pages(64 * MIB))
        assert sampler.peak_anon_bytes - start >= 48 * MIB and buf[0] == 1
    assert sampler.peak_bytes >= sampler.peak_anon_bytes


def test_the_pinned_host_cache_is_emptied_only_where_cuda_has_one(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert process_memory.release_pinned_host_cache() is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator.memory, "empty_host_cache", lambda: calls.append("accelerator"))
    assert process_memory.release_pinned_host_cache() is True and calls == ["accelerator"]
    # an older torch: the private call of the same allocator
    monkeypatch.delattr(torch.accelerator.memory, "empty_host_cache")
    monkeypatch.setattr(torch._C, "_host_emptyCache", lambda: calls.append("private"), raising=False)
    assert process_memory.release_pinned_host_cache() is True and calls == ["accelerator", "private"]
    monkeypatch.delattr(torch._C, "_host_emptyCache")
    assert process_memory.release_pinned_host_cache() is False
