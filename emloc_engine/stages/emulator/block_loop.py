"""The emulator build's loop over decoder blocks, with memory bounded by one block.

For block ``i``: read only its tensors from the shards (a reader thread prefetches block ``i+1``
into CPU RAM meanwhile), load them into the skeleton's layer, push every calibration chunk
through the ORIGINAL block while hooks sum ``C = Σ XᵀX`` once per input group, factorise every
compressed module (:func:`emloc_engine.stages.emulator.factorize.factorize`, on the main device or
on a free factor device), write the block's shard on a writer thread, and free the block. Hidden
states flow through original blocks only (no compressed-error propagation). A block whose shard
already carries this build's fingerprint is run (forward only, so the next block sees the same
hidden states) but not factorised again.

The spectra pass of ``allocation="spectral"`` (:meth:`BlockLoop.spectra`) is the same capture and
forward, keeping each module's whitened spectrum instead of factorising.
"""

from __future__ import annotations

import queue
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from emloc_engine.core.errors import DataError
from emloc_engine.core.progress import EtaClock, Progress, format_seconds
from emloc_engine.machine import devices
from emloc_engine.stages.emulator.build_context import BuildContext, ModulePlan
from emloc_engine.stages.emulator.calibration import (
    CalibrationChunk,
    capture_block_inputs,
    chunk_samples,
    decoder_layers,
    recording,
    run_block,
)
from emloc_engine.stages.emulator.factorize import factorize, whitened_spectrum
from emloc_engine.stages.emulator.writer import (
    BLOCK_FILE,
    shard_build_id,
    write_block_shard,
    write_rest_shard,
)
from emloc_engine.weights.checkpoint import Checkpoint


def release_storage(t: torch.Tensor) -> None:
    """Free ``t``'s memory now, whoever still references the tensor object (its storage shrinks to 0 bytes).

    The input embedding is needed only to embed the calibration tokens, but on a GPU it stayed allocated
    through every block: the allocator's history of a Qwen2.5-14B build (2026-12-06, H100,
    ``benchmarks/device/emulator_peak_trace.py``) showed its 1.45 GiB live at the forward's peak (6.47 GiB),
    although no reference to it is visible in the build's code, and a CPU build frees it. Shrinking the storage
    does not depend on finding the holder. A memory-mapped tensor (a CPU read of the shards) cannot be resized
    and is left alone: it holds no device memory.
    """
    storage = t.untyped_storage()
    if storage.resizable():
        storage.resize_(0)


def _block_tensors(ckpt: Checkpoint, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor of one block, CPU, stored dtype, keyed by its name inside the block."""
    return ckpt.read_prefix(prefix)


class BlockLoop:
    """The block loop of the emulator build (and of the spectra pass) and the resources it must release.

    Two helper threads keep the GPU busy: a reader prefetches block ``i+1`` from the shards while
    block ``i`` computes, and a writer saves finished shards (and the non-block tensors) while the
    next block computes. Each thread has its own :class:`Checkpoint` and closes it after every
    block, so the shards' memory maps never pin more than one block in RAM.
    """

    def __init__(self, ctx: BuildContext, build_id: str) -> None:
        self.ctx, self.build_id = ctx, build_id
        self.device = ctx.device
        self.reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emloc-read")
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emloc-write")
        self.writes: list[Future[None]] = []
        # Several devices: block b is factorised on a free factor device while the main device
        # already runs block b+1 (the forward only needs the ORIGINAL blocks, never the factors).
        self.factor_devices: queue.Queue[torch.device] = queue.Queue()
        for d in ctx.factor_devices:
            self.factor_devices.put(torch.device(d))
        self.factor_pool = (ThreadPoolExecutor(max_workers=len(ctx.factor_devices), thread_name_prefix="emloc-factor")
                            if ctx.factor_devices else None)
        self.factor_jobs: list[Future[list[tuple[int, float]]]] = []
        self.chunks: list[CalibrationChunk] = []
        self.timings: dict[str, float] = {"read_wait": 0.0, "load": 0.0, "forward": 0.0, "factorize": 0.0,
                                          "write_wait": 0.0}

    def close(self) -> None:
        if self.factor_pool is not None:
            self.factor_pool.shutdown(wait=True)
        self.reader.shutdown(wait=True, cancel_futures=True)
        self.writer.shutdown(wait=True)  # finished blocks always land: a rerun resumes after them
        self.chunks = []
        self.ctx.ckpt.close()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _tick(self, name: str, t: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[name] += now - t
        return now

    def _skeleton(self) -> Any:
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(self.ctx.hf_config, dtype=self.ctx.compute, trust_remote_code=False)
        model.eval()
        return model

    def _read(self, b: int) -> dict[str, torch.Tensor]:
        ckpt = Checkpoint(self.ctx.ckpt.model_dir)
        try:
            return _block_tensors(ckpt, self._prefix(b))
        finally:
            ckpt.close()

    def _drain_writes(self, wait_all: bool) -> None:
        """Re-raise a failed write; with ``wait_all`` also wait for the pending ones."""
        t = time.perf_counter()
        for fut in list(self.writes):
            if wait_all or fut.done():
                fut.result()
                self.writes.remove(fut)
        self.timings["write_wait"] += time.perf_counter() - t

    def run(self, progress: Progress) -> tuple[int, ...]:
        """Capture block inputs, then build every block; returns the blocks reused from disk."""
        progress.check_cancelled()
        self.writes.append(self.writer.submit(write_rest_shard, self.ctx, self.build_id))
        model = self._capture()
        progress.update(0.03, f"captured the input of block 0 ({len(self.chunks)} chunks)")
        layers = decoder_layers(model, self.ctx.spec)
        resumed: list[int] = []
        clock = EtaClock()
        pending: Future[dict[str, torch.Tensor]] = self.reader.submit(self._read, 0)
        for b in range(self.ctx.blocks):
            progress.check_cancelled()
            self._drain_writes(wait_all=False)
            t = time.perf_counter()
            tensors = pending.result()
            self.timings["read_wait"] += time.perf_counter() - t
            if b + 1 < self.ctx.blocks:
                pending = self.reader.submit(self._read, b + 1)
            done = shard_build_id(self.ctx.out_dir / BLOCK_FILE.format(b)) == self.build_id
            errors = [(b, e) for e in self._block(layers[b], b, tensors, reuse=done)]
            errors += self._drain_factor_jobs(wait_all=b == self.ctx.blocks - 1)
            layers[b].to("meta")
            del tensors
            if done:
                resumed.append(b)
            frac = (b + 1) / self.ctx.blocks
            for blk, e in errors:
                progress.log("emulator/rel_error", e, blk)
            if self.device.type == "cuda":
                progress.log("gpu/peak_gib", torch.cuda.max_memory_allocated(self.device) / 2**30, b)
            progress.update(0.03 + 0.95 * frac, f"block {b + 1}/{self.ctx.blocks} {'reused' if done else 'factorised'}, "
                                                f"ETA {format_seconds(clock.eta_s(frac))}")
        self._drain_writes(wait_all=True)
        return tuple(resumed)

    def _capture(self) -> Any:
        """The model skeleton, with ``self.chunks`` holding the input of block 0 for every chunk."""
        ctx = self.ctx
        model = self._skeleton()
        embed_name = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)
        embed = ctx.ckpt.get(embed_name, dtype=ctx.compute, device=self.device)
        ctx.ckpt.close()
        pad = ctx.hf_config.pad_token_id if isinstance(getattr(ctx.hf_config, "pad_token_id", None), int) else 0
        self.chunks = capture_block_inputs(model, ctx.spec, embed, ctx.samples,
                                           chunk_samples([len(s) for s in ctx.samples], ctx.layout.chunk_tokens),
                                           device=self.device, dtype=ctx.compute, pad_id=pad,
                                           offload=ctx.layout.offload_hidden)
        release_storage(embed)
        return model

    def spectra(self, modules: set[str], progress: Progress) -> dict[str, list[float]]:
        """The whitened spectrum of every module in ``modules``: the build's capture, block forward and
        statistics, but no factorisation and nothing written; stops after the last block it needs."""
        progress.check_cancelled()
        model = self._capture()
        progress.update(0.05, f"rank allocation: captured the input of block 0 ({len(self.chunks)} chunks)")
        layers = decoder_layers(model, self.ctx.spec)
        last = max(self.ctx.plan[n].block for n in modules)
        linalg_device = devices.linalg_device(self.device)
        out: dict[str, list[float]] = {}
        clock = EtaClock()
        pending: Future[dict[str, torch.Tensor]] = self.reader.submit(self._read, 0)
        for b in range(last + 1):
            progress.check_cancelled()
            t = time.perf_counter()
            tensors = pending.result()
            self.timings["read_wait"] += time.perf_counter() - t
            if b < last:
                pending = self.reader.submit(self._read, b + 1)
            layer = layers[b]
            self._load(layer, tensors)
            mods = {p.path: p for p in self.ctx.plan.values() if p.block == b and p.name in modules}
            groups = {g.name: g for g in self.ctx.spec.groups if any(m in mods for m in g.modules)}
            t = time.perf_counter()
            with recording(layer, {n: g.modules[0] for n, g in groups.items()}, self.ctx.stats) as rec:
                run_block(layer, b, self.chunks, self.device, recorder=rec, keep_output=b < last)
                stats = rec.stats
            t = self._tick("forward", t)
            for gname, group in groups.items():
                c = stats.pop(gname)
                for path in group.modules:
                    if path in mods:
                        out[mods[path].name] = whitened_spectrum(tensors[f"{path}.weight"], c, linalg_device)
                del c
            self._tick("factorize", t)
            layer.to("meta")
            del tensors, stats
            frac = (b + 1) / (last + 1)
            progress.update(0.05 + 0.9 * frac, f"rank allocation: block {b + 1}/{last + 1} measured, "
                                               f"ETA {format_seconds(clock.eta_s(frac))}")
        return out

    def _load(self, layer: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Materialise one block's tensors in ``layer`` on the compute device; returns them on that device."""
        dev = {k: v.to(self.device, non_blocking=True) for k, v in tensors.items()}
        layer.load_state_dict({k: v.to(self.ctx.compute) for k, v in dev.items()}, assign=True, strict=True)
        layer.to(self.device)
        return dev

    def _drain_factor_jobs(self, wait_all: bool) -> list[tuple[int, float]]:
        """Errors of finished factor jobs (re-raising a failed one); waits while every device is busy."""
        out: list[tuple[int, float]] = []
        limit = 0 if wait_all else len(self.ctx.factor_devices)  # one job in flight per device
        t = time.perf_counter()
        while self.factor_jobs and (len(self.factor_jobs) > limit or self.factor_jobs[0].done()):
            out += self.factor_jobs.pop(0).result()
        self.timings["factorize_wait"] = self.timings.get("factorize_wait", 0.0) + time.perf_counter() - t
        return out

    def _factorize_groups(self, b: int, groups: dict[str, Any], mods: dict[str, ModulePlan],
                          weights: dict[str, torch.Tensor], stats: dict[str, torch.Tensor],
                          device: torch.device) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float]]:
        """Factorise every compressed module of block ``b`` on ``device`` (weights and C moved there)."""
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        errors: dict[str, float] = {}
        for gname, group in groups.items():
            c = stats.pop(gname).to(device)
            shared: dict[str, torch.Tensor] = {}
            for path in group.modules:
                if path not in mods:
                    continue
                w = weights[f"{path}.weight"].to(device)
                try:
                    f = factorize(w, c, mods[path].rank, dtype=self.ctx.linalg, solver=self.ctx.solver, cache=shared)
                except FloatingPointError as exc:
                    if "weight" in str(exc):
                        raise DataError(f"The weight of {mods[path].name} holds NaN or Inf.",
                                        hint="The model file is damaged or was saved with overflowed values; "
                                             "download or convert the model again.") from exc
                    raise DataError(f"Statistics of {mods[path].name} are unusable: {exc}.",
                                    hint="The activations overflowed; use compute_dtype float32.") from exc
                factors[path] = (f.u.to(w.dtype).cpu(), f.v.to(w.dtype).cpu())
                errors[path] = f.rel_error
                del f  # its fp32 u, v would stay on the device through the next module's factorisation
            del c, shared
        return factors, errors

    def _factor_job(self, b: int, groups: dict[str, Any], mods: dict[str, ModulePlan],
                    tensors: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]) -> list[tuple[int, float]]:
        device = self.factor_devices.get()
        try:
            factors, errors = self._factorize_groups(b, groups, mods, tensors, stats, device)
        finally:
            self.factor_devices.put(device)
        self._submit_write(b, tensors, factors, errors)
        return [(b, e) for e in errors.values()]

    def _prefix(self, b: int) -> str:
        return f"{self.ctx.spec.block_prefix}.{b}."

    def _block(self, layer: torch.nn.Module, b: int, tensors: dict[str, torch.Tensor], reuse: bool) -> list[float]:
        """Run block ``b`` over the calibration chunks; factorise and write it unless ``reuse``."""
        t = time.perf_counter()
        dev = self._load(layer, tensors)
        t = self._tick("load", t)
        last = b == self.ctx.blocks - 1
        mods = {p.path: p for p in self.ctx.plan.values() if p.block == b}
        if reuse or not mods:
            run_block(layer, b, self.chunks, self.device, keep_output=not last)
            self._tick("forward", t)
            if not reuse:
                self._submit_write(b, tensors, {}, {})
            return []
        groups = {g.name: g for g in self.ctx.spec.groups if any(m in mods for m in g.modules)}
        with recording(layer, {n: g.modules[0] for n, g in groups.items()}, self.ctx.stats) as rec:
            run_block(layer, b, self.chunks, self.device, recorder=rec, keep_output=not last)
            stats = rec.stats
        t = self._tick("forward", t)
        if self.factor_pool is not None:
            # C leaves the main device with the job; the job owns the CPU copies of the weights.
            self.factor_jobs.append(self.factor_pool.submit(self._factor_job, b, groups, mods, tensors, dict(stats)))
            return []
        factors, errors = self._factorize_groups(b, groups, mods, dev, stats, devices.linalg_device(self.device))
        self._tick("factorize", t)
        self._submit_write(b, tensors, factors, errors)
        return list(errors.values())

    def _submit_write(self, b: int, tensors: dict[str, torch.Tensor],
                      factors: dict[str, tuple[torch.Tensor, torch.Tensor]], errors: dict[str, float]) -> None:
        """Write block ``b``'s shard on the writer thread (the next block computes meanwhile)."""
        self.writes.append(self.writer.submit(write_block_shard, self.ctx.out_dir, b, prefix=self._prefix(b),
                                              tensors=tensors, factors=factors, errors=errors,
                                              build_id=self.build_id))


__all__ = ["BlockLoop"]
