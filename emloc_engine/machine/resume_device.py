"""The device a resumed run computes on: the recorded one when this machine still has it, else the best one here.

A run folder records the device its first call chose (``cuda:1``, ``cpu``, ``auto``…). A run is resumed
later, often on a changed machine: the second GPU taken by another job or removed, the folder copied to
a laptop, CUDA not visible after a driver update. Every stage can continue on another device (the
emulator, the checkpoints and the cache are on disk in device-free form), so resuming must not fail
with "invalid device ordinal" half-way into a stage. The rule, decided here once for text and image runs:

* ``cpu``, ``auto`` and ``cuda`` stay as recorded (``auto``/``cuda`` are resolved when a stage starts);
* ``cuda:N`` stays when GPU N is on this machine; otherwise the GPU with the most free memory, or, without
  a CUDA GPU, Apple's GPU on a Mac (``auto``) or the CPU, with a note saying what changed;
* ``mps`` stays on a Mac with Metal; elsewhere ``auto``, with a note.

The memory plan of a text run is made again for the chosen device (``plan_run``); an image run keeps its
ρ (its emulator is built) and the note says the device changed.
"""

from __future__ import annotations

from dataclasses import dataclass

from emloc_engine.machine.hardware import MachineInfo


@dataclass(frozen=True)
class ResumeDevice:
    """Where a resumed run computes, and what changed (``note`` is empty when nothing did)."""

    device: str
    note: str = ""


def _without_cuda(what: str, machine: MachineInfo) -> ResumeDevice:
    """No CUDA GPU here: Apple's GPU on a Mac with Metal, else the CPU."""
    if machine.backend == "mps":
        return ResumeDevice("auto", f"The run was on {what}; this Mac has none, so it continues on Apple's GPU (MPS).")
    return ResumeDevice("cpu", f"The run was on {what}; no CUDA GPU is visible here, so it continues on the CPU.")


def resume_device(recorded: str, machine: MachineInfo) -> ResumeDevice:
    """The device to resume a run recorded with ``recorded`` on ``machine`` (module docstring)."""
    has_cuda = machine.backend in ("cuda", "rocm") and bool(machine.gpus)
    if recorded.startswith("cuda:"):
        number = recorded.split(":", 1)[1]
        was = f"GPU {number}" if number.isdigit() else f"device {recorded!r}"
        if has_cuda and number.isdigit() and any(g.index == int(number) for g in machine.gpus):
            return ResumeDevice(recorded)
        if has_cuda:
            best = max(machine.gpus, key=lambda g: (g.free_bytes, -g.index))
            return ResumeDevice(
                f"cuda:{best.index}",
                f"The run was on {was}, which this machine does not have; "
                f"it continues on GPU {best.index} ({best.name}).",
            )
        return _without_cuda(was, machine)
    if recorded == "cuda" and not has_cuda:
        return _without_cuda("a CUDA GPU", machine)
    if recorded == "mps" and machine.backend != "mps":
        return ResumeDevice("auto", "The run was on Apple's GPU (MPS), which is not here; it continues on the best device here.")
    return ResumeDevice(recorded)


__all__ = ["ResumeDevice", "resume_device"]
