"""Stage 1 for vision-language models: the emulator of the vision tower and the language model.

``build_vlm_emulator(VlmEmulatorConfig(...), progress) -> VlmEmulatorResult`` writes an emulator
folder like the text one (``emloc.json`` + safetensors + the source's config and processor files);
``load_vlm_emulator(folder)`` returns it as an ``AutoModelForImageTextToText`` whose compressed
linears are :class:`~emloc_engine.weights.lowrank.LowRankLinear` under the original module names, so
a LoRA adapter trained on it loads onto the original model.

What is compressed (the paper's choice): every linear of the vision tower's blocks (at
``vision_ratio``, default ρ) and of the language model's blocks (at ρ). Dense: patch/position
embeddings, the projector, token embeddings, norms, the head.

Streaming, one block at a time (``METHOD.md`` Stage 1, generalised to two towers):

1. The model skeleton is built on the meta device; only the tensors outside both towers' blocks
   except the head are materialised (embeddings, projector, patch embedding, vision merger, norms).
2. Vision tower: every vision block is replaced by a recorder and the model runs on each
   calibration sample (its image(s) and text, as the processor prepares them) until the last
   recorder: that captures the input of vision block 0 and every block's arguments (Qwen2.5-VL's
   windowed and full-attention blocks get different ones). Then block by block: read from the
   shards, run on every sample while ``C = Σ XᵀX`` is summed per input group, factorise, write,
   free.
3. Language model: the original vision tower is loaded whole (it is small: 0.3–0.7 B parameters for
   the 7–8 B models, a few percent of the model), the decoder blocks are replaced by recorders and
   the model runs once more per sample to capture the input of decoder block 0 (text and image
   tokens merged, image features from the ORIGINAL tower); the tower is freed, and the decoder
   blocks are streamed exactly like the vision blocks.

Calibration samples run one per forward (their images differ in size). Decision: no resume inside
a VLM build (a rerun rebuilds; the vision tower is small and the build is minutes), and a plain
uniform ρ per tower (no spectral allocation for VLMs yet).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emloc_engine.core.atomic import atomic_path, write_json_atomic
from emloc_engine.core.dtypes import FLOAT_CODES
from emloc_engine.core.errors import ConfigError, DataError, ModelNotFound
from emloc_engine.core.progress import NULL_PROGRESS, Progress
from emloc_engine.core.ranks import rank_for_ratio
from emloc_engine.core.version import __version__
from emloc_engine.machine import devices
from emloc_engine.machine.process_memory import gpu_peak_gib, reset_gpu_peak
from emloc_engine.stages.emulator.calibration import recording
from emloc_engine.stages.emulator.factorize import factorize
from emloc_engine.stages.emulator.writer import METHOD, _copy_side_files, block_tensors, source_revision
from emloc_engine.vision.families import Tower, VisionLanguageSpec, vlm_spec
from emloc_engine.vision.names import module_keys_of
from emloc_engine.weights.checkpoint import Checkpoint, fingerprint_model
from emloc_engine.weights.lowrank import (
    EMULATOR_FORMAT,
    EMULATOR_FORMAT_VERSION,
    EMULATOR_META,
    LowRankLinear,
)

log = logging.getLogger(__name__)

REST_FILE = "rest.safetensors"
SHARD = "{tower}-{block:05d}.safetensors"


@dataclass(frozen=True)
class VlmEmulatorConfig:
    """Settings of the VLM emulator build.

    ``calibration``: per sample, the processor's tensors (``input_ids``, ``pixel_values``…) on the
    CPU, batch 1 (:func:`calibration_inputs` makes them from prepared examples).
    """

    model_dir: Path = field(metadata={"help": "Snapshot folder of the source VLM."})
    out_dir: Path = field(metadata={"help": "Where the emulator goes (RUN_DIR/emulator)."})
    calibration: tuple[Mapping[str, Any], ...] = field(metadata={"help": "Processor outputs of the samples."})
    ratio: float = field(
        default=0.5, metadata={"help": "Keep-ratio ρ of the language model's block linears."}
    )
    vision_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Keep-ratio of the vision tower's block linears (default: ρ; 1 keeps the tower dense)."
        },
    )
    device: str = field(default="auto", metadata={"help": "cuda, cuda:N, cpu or auto."})
    compute_dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16."})
    full_rank: bool = field(
        default=False,
        metadata={"help": "Diagnostics: factorise at full rank (the emulator then reproduces the model)."},
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        problems = []
        if not 0.0 < self.ratio < 1.0:
            problems.append(f"ratio must be in (0, 1) (got {self.ratio})")
        if self.vision_ratio is not None and not 0.0 < self.vision_ratio <= 1.0:
            problems.append(f"vision_ratio must be in (0, 1] (got {self.vision_ratio})")
        if not self.calibration:
            problems.append("there are no calibration samples")
        if problems:
            raise ConfigError("Invalid VLM emulator settings.", problems=problems)


@dataclass(frozen=True)
class VlmEmulatorResult:
    """What the build produced (see :class:`~emloc_engine.stages.emulator.builder.EmulatorResult`)."""

    emulator_dir: Path
    modules: Mapping[str, Mapping[str, Any]]
    params_kept: int
    params_original: int
    wall_s: float
    peak_vram_gib: float
    calibration_tokens: int
    device: str


def calibration_inputs(examples: Sequence[Any], processor: Any, n: int) -> tuple[dict[str, Any], ...]:
    """The processor's tensors for the first ``n`` examples (``VisionExample``), one sample each."""
    from emloc_engine.data.images import processor_inputs

    return tuple(dict(processor_inputs(processor, [ex.text], [list(ex.images)])) for ex in examples[:n])


# -- recorders --------------------------------------------------------------------------------------------
class _Stop(Exception):  # control flow: the forward reached the last recorded block
    pass


class _Recorder(nn.Module):
    """Stands in for block ``index``: records its arguments, passes the hidden states through."""

    def __init__(self, index: int, sink: list[tuple[tuple[Any, ...], dict[str, Any]]], last: bool) -> None:
        super().__init__()
        self.index, self.sink, self.last = index, sink, last

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_value", None)
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        self.sink[self.index] = (args, kwargs)
        if self.index == 0:
            self.sink.append(((hidden,), {}))  # the input of block 0, after the per-block entries
        if self.last:
            raise _Stop
        return hidden


def _hook_outputs_now(model: Any) -> None:
    """Install transformers' output-capturing hooks while the original blocks are in place.

    transformers ≥ 5 collects ``hidden_states`` (LLaVA reads the vision tower's second-to-last) with
    forward hooks that it installs once, at the first forward, on the modules present then; the
    stand-ins swapped in later must not be the ones that get them.
    """
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # older transformers collect hidden states in the forward itself
        return
    maybe_install_capturing_hooks(model)


@dataclass
class _Sample:
    hidden: torch.Tensor
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]]


# -- the build --------------------------------------------------------------------------------------------
class _Build:
    def __init__(self, cfg: VlmEmulatorConfig) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForImageTextToText

        self.cfg = cfg
        self.model_dir = cfg.model_dir.resolve()
        self.out_dir = cfg.out_dir.resolve()
        self.device = devices.resolve_device(cfg.device)
        self.dtype = devices.compute_dtype(self.device, cfg.compute_dtype)
        self.stats_dtype = torch.float64 if self.device.type == "cpu" else torch.float32
        self.linalg = devices.linalg_device(self.device)
        config = AutoConfig.from_pretrained(self.model_dir, trust_remote_code=False)
        self.spec: VisionLanguageSpec = vlm_spec(config)
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForImageTextToText.from_config(
                config, dtype=self.dtype, trust_remote_code=False
            )
        self.model.eval()
        _hook_outputs_now(self.model)
        self.ckpt = Checkpoint(self.model_dir)
        keys = set(self.model.state_dict())
        self.names = module_keys_of(self.spec.family, self.ckpt.names(), keys)  # checkpoint -> module key
        unknown = sorted(k for k in self.names.values() if k not in keys)
        if unknown:
            raise ModelNotFound(
                f"{self.model_dir} has tensors this {self.spec.family} model does not know.",
                problems=unknown[:10],
                hint="Is the checkpoint for this transformers version?",
            )
        self.config = config
        self.plan: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, float] = {}

    def _in_block(self, key: str) -> bool:
        return any(key.startswith(t.module_prefix + ".") for t in self.spec.towers)

    def _head_keys(self) -> set[str]:
        head = self.model.get_output_embeddings()
        return {n for n, p in self.model.named_parameters() if head is not None and p is head.weight}

    def materialise_rest(self) -> None:
        """Every tensor outside the towers' blocks, except the head, onto the device."""
        skip = self._head_keys()
        state = {
            k: self.ckpt.get(
                n, dtype=self.dtype if self.ckpt.info(n).dtype in FLOAT_CODES else None, device=self.device
            )
            for n, k in self.names.items()
            if not self._in_block(k) and k not in skip
        }
        self.model.load_state_dict(state, strict=False, assign=True)
        for sub in self.model.modules():  # buffers (rotary frequencies…) are real: move them
            for name, buf in list(sub._buffers.items()):
                if buf is not None and buf.device.type != "meta":
                    sub._buffers[name] = buf.to(self.device)

    def run_until(self, tower: Tower, samples: Sequence[Mapping[str, Any]]) -> list[_Sample]:
        """Run the model on each sample until the last block of ``tower``; returns its block-0 inputs."""
        layers = self.model.get_submodule(tower.module_prefix)
        originals = list(layers)
        out: list[_Sample] = []
        try:
            for inputs in samples:
                sink: list[tuple[tuple[Any, ...], dict[str, Any]]] = [((), {}) for _ in originals]
                for i in range(len(originals)):
                    layers[i] = _Recorder(i, sink, last=i == len(originals) - 1)
                batch = {
                    k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()
                }
                if "pixel_values" in batch and batch["pixel_values"].is_floating_point():
                    batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
                try:
                    with torch.inference_mode():
                        self.model(**batch, use_cache=False)
                    raise DataError(
                        "The model's forward never reached its last block (no image in the sample?)."
                    )
                except _Stop:
                    pass
                hidden = sink.pop()[0][0]
                out.append(_Sample(hidden, sink))
        finally:
            for i, layer in enumerate(originals):
                layers[i] = layer
        return out

    def load_tower(self, tower: Tower) -> None:
        """Every block of ``tower`` with its original weights, on the device."""
        prefix = tower.module_prefix + "."
        state = {
            k: self.ckpt.get(
                n, dtype=self.dtype if self.ckpt.info(n).dtype in FLOAT_CODES else None, device=self.device
            )
            for n, k in self.names.items()
            if k.startswith(prefix)
        }
        self.model.load_state_dict(state, strict=False, assign=True)

    def stream(
        self,
        tower: Tower,
        name: str,
        ratio: float,
        samples: list[_Sample],
        progress: Progress,
        span: tuple[float, float],
    ) -> None:
        """Build every block of ``tower``: run, sum statistics, factorise, write, free."""
        layers = self.model.get_submodule(tower.module_prefix)
        for b in range(tower.num_blocks):
            progress.check_cancelled()
            prefix = f"{tower.module_prefix}.{b}."
            tensors = {
                k[len(prefix) :]: self.ckpt.get(n) for n, k in self.names.items() if k.startswith(prefix)
            }
            block = layers[b]
            block.load_state_dict(
                {k: v.to(self.device, self.dtype) for k, v in tensors.items()}, assign=True, strict=True
            )
            block.to(self.device)
            mods = self._plan_block(tower, b, ratio, tensors)
            groups = {g.name: g for g in tower.groups if any(m in mods for m in g.modules)}
            with recording(block, {n: g.modules[0] for n, g in groups.items()}, self.stats_dtype) as rec:
                with torch.inference_mode():
                    for s in samples:
                        args, kwargs = s.calls[b]
                        h = block(s.hidden, *args, **kwargs)
                        s.hidden = h[0] if isinstance(h, tuple) else h
                stats = rec.stats
            factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            for gname, group in groups.items():
                c = stats.pop(gname).to(self.linalg)
                shared: dict[str, torch.Tensor] = {}
                for path in group.modules:
                    if path in mods:
                        w = tensors[f"{path}.weight"].to(self.linalg)
                        f = factorize(w, c, mods[path], cache=shared)
                        factors[path] = (
                            f.u.to(tensors[f"{path}.weight"].dtype).cpu(),
                            f.v.to(tensors[f"{path}.weight"].dtype).cpu(),
                        )
                        self.errors[f"{tower.module_prefix}.{b}.{path}"] = f.rel_error
            self._write_block(name, b, prefix, tensors, factors)
            block.to("meta")
            lo, hi = span
            progress.update(
                lo + (hi - lo) * (b + 1) / tower.num_blocks,
                f"{name} block {b + 1}/{tower.num_blocks} factorised",
            )

    def _plan_block(
        self, tower: Tower, b: int, ratio: float, tensors: Mapping[str, torch.Tensor]
    ) -> dict[str, int]:
        mods: dict[str, int] = {}
        if ratio >= 1.0:
            return mods
        for path in tower.linear_modules:
            out_f, in_f = tensors[f"{path}.weight"].shape
            rank = (
                min(out_f, in_f)
                if self.cfg.full_rank
                else min(rank_for_ratio(ratio, out_f, in_f), out_f, in_f)
            )
            mods[path] = rank
            self.plan[f"{tower.module_prefix}.{b}.{path}"] = {
                "ratio": ratio,
                "rank": rank,
                "in_features": in_f,
                "out_features": out_f,
                "bias": f"{path}.bias" in tensors,
            }
        return mods

    def _write_block(
        self,
        name: str,
        b: int,
        prefix: str,
        tensors: Mapping[str, torch.Tensor],
        factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        from safetensors.torch import save_file

        out = block_tensors(prefix, tensors, factors)
        with atomic_path(self.out_dir / SHARD.format(tower=name, block=b)) as tmp:
            save_file(out, str(tmp), metadata={"format": "pt"})

    def write_rest(self) -> None:
        from safetensors.torch import save_file

        rest = {k: self.ckpt.get(n).contiguous() for n, k in self.names.items() if not self._in_block(k)}
        with atomic_path(self.out_dir / REST_FILE) as tmp:
            save_file(rest, str(tmp), metadata={"format": "pt"})


def build_vlm_emulator(cfg: VlmEmulatorConfig, progress: Progress = NULL_PROGRESS) -> VlmEmulatorResult:
    """Build the emulator of a VLM (module docstring) into ``cfg.out_dir``.

    Raises:
        ConfigError: bad settings, or ``out_dir`` inside the source folder.
        UnsupportedModel: not a supported VLM family.
        ModelNotFound: missing or unexpected tensors.
        DataError: a calibration sample never reaches the towers' last blocks.
        Cancelled: between blocks.
    """
    t0 = time.monotonic()
    model_dir, out_dir = cfg.model_dir.resolve(), cfg.out_dir.resolve()
    if out_dir == model_dir or model_dir in out_dir.parents:
        raise ConfigError(
            f"The emulator folder {out_dir} is inside the source model folder {model_dir}.",
            hint="Pick a run folder elsewhere; the source model is never written to.",
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    build = _Build(cfg)
    reset_gpu_peak(build.device)
    try:
        build.materialise_rest()
        vision = build.spec.vision
        vratio = cfg.ratio if cfg.vision_ratio is None else cfg.vision_ratio
        samples = build.run_until(vision, cfg.calibration)
        progress.update(0.03, f"captured the vision tower's input ({len(samples)} samples)")
        build.stream(vision, "vision", vratio, samples, progress, (0.03, 0.3))
        del samples
        build.load_tower(vision)  # the ORIGINAL vision tower makes the image features the LM sees
        try:
            lm_samples = build.run_until(build.spec.language, cfg.calibration)
        finally:
            build.model.get_submodule(vision.module_prefix).to("meta")
        progress.update(0.33, "captured the language model's input")
        build.stream(build.spec.language, "language", cfg.ratio, lm_samples, progress, (0.33, 0.97))
        n_tokens = sum(int(s.hidden.shape[0] * s.hidden.shape[1]) for s in lm_samples)
        del lm_samples
        build.write_rest()
        _copy_side_files(model_dir, out_dir)
        for name, rel in build.errors.items():
            build.plan[name]["rel_error"] = rel
        peak = gpu_peak_gib(build.device)
        write_json_atomic(
            out_dir / EMULATOR_META,
            {
                "format": EMULATOR_FORMAT,
                "format_version": EMULATOR_FORMAT_VERSION,
                "engine_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "kind": "vision-language",
                "source_model": {
                    "path": str(model_dir),
                    "revision": source_revision(model_dir),
                    "fingerprint": fingerprint_model(model_dir),
                },
                "method": METHOD,
                "ratio": cfg.ratio,
                "vision_ratio": vratio,
                "full_rank": cfg.full_rank,
                "calibration": {"samples": len(cfg.calibration), "tokens": n_tokens},
                "build": {
                    "device": str(build.device),
                    "compute_dtype": str(build.dtype),
                    "peak_vram_gib": peak,
                },
                "modules": build.plan,
            },
        )
    finally:
        build.ckpt.close()
        if build.device.type == "cuda":
            torch.cuda.empty_cache()
    kept_params = sum(
        p["rank"] * (p["in_features"] + p["out_features"]) - p["in_features"] * p["out_features"]
        for p in build.plan.values()
    )
    original = build.ckpt.num_parameters()
    return VlmEmulatorResult(
        out_dir,
        build.plan,
        original + kept_params,
        original,
        time.monotonic() - t0,
        peak,
        n_tokens,
        str(build.device),
    )


def load_vlm_emulator(
    emulator_dir: Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Any:
    """An emulator folder as an ``AutoModelForImageTextToText`` with low-rank compressed linears.

    Raises:
        ModelNotFound: not a VLM emulator folder, or its tensors do not match its config.
    """
    import json

    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageTextToText

    from emloc_engine.weights.lowrank import read_emulator_meta, replace_with_low_rank

    emulator_dir = Path(emulator_dir)
    meta = read_emulator_meta(emulator_dir)
    if meta.get("kind") != "vision-language":
        raise ModelNotFound(f"{emulator_dir} is not a vision-language emulator.")
    config = AutoConfig.from_pretrained(emulator_dir, trust_remote_code=False)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, trust_remote_code=False)
        replace_with_low_rank(model, meta["modules"], dtype=dtype)
    ckpt = Checkpoint(emulator_dir)
    try:
        state = {
            n: ckpt.get(n, dtype=dtype if ckpt.info(n).dtype in FLOAT_CODES else None) for n in ckpt.names()
        }
    finally:
        ckpt.close()
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
    missing = [m for m in missing if not (tied and m == "lm_head.weight")]
    if missing or unexpected:
        raise ModelNotFound(
            f"Emulator {emulator_dir} does not match its config.",
            problems=[f"missing tensor {m}" for m in missing[:20]]
            + [f"unexpected tensor {u}" for u in unexpected[:20]],
            hint="Rebuild the emulator.",
        )
    if tied:
        model.tie_weights()
    model.to(device)
    model.eval()
    log.debug("loaded VLM emulator %s (%s)", emulator_dir, json.dumps(meta.get("calibration")))
    return model


def low_rank_modules(model: nn.Module) -> dict[str, LowRankLinear]:
    """The compressed modules of a loaded emulator, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


__all__ = [
    "VlmEmulatorConfig",
    "VlmEmulatorResult",
    "build_vlm_emulator",
    "calibration_inputs",
    "load_vlm_emulator",
    "low_rank_modules",
]
