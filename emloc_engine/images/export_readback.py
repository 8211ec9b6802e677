"""Read an exported image LoRA back and compare the denoiser's output with the reference.

The reference is the original denoiser with the peft adapter applied by peft itself
(``PeftModel.from_pretrained``), the thing every export must reproduce. Each LoRA file is loaded the
way users load it: through the family's pipeline class's ``load_lora_weights`` (which runs diffusers'
kohya converter for kohya files), on a pipeline holding only the denoiser (text encoders and VAE are
never loaded: they are not touched by a denoiser LoRA). A merged pipeline's denoiser is loaded with
``from_pretrained``. All outputs come from one fixed random probe input (:func:`probe_inputs`).

**Pass rule**: ``max|out − ref| ≤ tol · max|ref|`` with ``tol`` 1e-4 for fp32 denoisers and 2e-2
for bf16/fp16 ones; the adapter must change the output (``effect = max|ref − base| > 0``); and the
difference must be small against that change, ``max|out − ref| ≤ 0.1 · effect``, so a file whose LoRA
loaded wrongly or not at all cannot pass however small the adapter. The last rule is waived for a
merged bf16/fp16 denoiser only: rounding ``W + ΔW`` to 8 mantissa bits moves the output by about
``2⁻⁹·|W x|``, which a small adapter's effect need not exceed (the LoRA files keep ``ΔW`` apart and
have no such rounding).

The denoiser is loaded in its stored dtype on the GPU when it fits in the GPU's free memory, on the
CPU otherwise (:func:`readback_device`); a 12B FLUX transformer needs about 24 GiB for this in bf16.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from emloc_engine.core.errors import MergeError
from emloc_engine.images.pipelines import PipelineInfo


@dataclass(frozen=True)
class Comparison:
    """One read-back: how far the loaded output is from the reference, and how much the adapter moves it."""

    what: str
    max_abs_diff: float
    ref_max_abs: float
    adapter_effect: float
    tolerance: float
    effect_fraction: float | None = 0.1

    @property
    def ok(self) -> bool:
        within_effect = (
            self.effect_fraction is None or self.max_abs_diff <= self.effect_fraction * self.adapter_effect
        )
        return (
            self.adapter_effect > 0
            and self.max_abs_diff <= self.tolerance * self.ref_max_abs
            and within_effect
        )


def readback_device(denoiser_dir: Path, device: str = "auto") -> torch.device:
    """Where the read-back runs: ``auto`` is the first GPU when the denoiser's weights (plus a quarter for
    the LoRA and activations) fit in its free memory, else the CPU; ``cpu`` / ``cuda[:N]`` as given."""
    if device != "auto":
        return torch.device(device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    weights = sum(f.stat().st_size for f in Path(denoiser_dir).glob("*.safetensors"))
    free, _ = torch.cuda.mem_get_info()
    return torch.device("cuda") if weights * 1.25 < free else torch.device("cpu")


def load_stored_denoiser(info: PipelineInfo, denoiser_dir: Path | None = None, device: str = "auto") -> Any:
    """The denoiser of ``denoiser_dir`` (default ``info.denoiser_dir``) in its stored dtype, eval mode, on
    :func:`readback_device`."""
    from emloc_engine.images.pipelines import denoiser_class

    folder = Path(denoiser_dir) if denoiser_dir is not None else info.denoiser_dir
    model = denoiser_class(info).from_pretrained(str(folder), torch_dtype=None, local_files_only=True)
    return model.to(readback_device(folder, device)).eval()


def probe_inputs(family: str, denoiser: Any, seed: int = 0) -> dict[str, Any]:
    """A small fixed random input for one denoiser forward (4×4 latent patches, 8 text tokens)."""
    cfg = denoiser.config
    dev, dtype = next(denoiser.parameters()).device, next(denoiser.parameters()).dtype
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dev, dtype)

    t = torch.tensor([0.6], device=dev, dtype=dtype)
    if family == "flux":
        seq, txt = 16, 8
        ids = torch.zeros(seq, 3)
        ids[:, 1], ids[:, 2] = torch.arange(seq) // 4, torch.arange(seq) % 4
        inputs = dict(
            hidden_states=rnd(1, seq, cfg.in_channels),
            encoder_hidden_states=rnd(1, txt, cfg.joint_attention_dim),
            pooled_projections=rnd(1, cfg.pooled_projection_dim),
            timestep=t,
            img_ids=ids.to(dev, dtype),
            txt_ids=torch.zeros(txt, 3).to(dev, dtype),
        )
        if cfg.guidance_embeds:
            inputs["guidance"] = torch.tensor([3.5], device=dev, dtype=dtype)
        return inputs
    if family == "sd3":
        side = 4 * cfg.patch_size
        return dict(
            hidden_states=rnd(1, cfg.in_channels, side, side),
            encoder_hidden_states=rnd(1, 8, cfg.joint_attention_dim),
            pooled_projections=rnd(1, cfg.pooled_projection_dim),
            timestep=t * 1000,
        )
    side = 2 ** (len(cfg.block_out_channels) + 1)
    text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return dict(
        sample=rnd(1, cfg.in_channels, side, side),
        timestep=t * 1000,
        encoder_hidden_states=rnd(1, 8, cfg.cross_attention_dim),
        added_cond_kwargs={"text_embeds": rnd(1, text_dim), "time_ids": rnd(1, 6)},
    )


@torch.no_grad()
def denoise(denoiser: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """One forward of the denoiser; the output in fp32 on the CPU."""
    out = denoiser(**inputs, return_dict=False)[0]
    return out.detach().float().cpu()


def tolerance_for(denoiser: Any) -> float:
    return 1e-4 if next(denoiser.parameters()).dtype == torch.float32 else 2e-2


@contextlib.contextmanager
def peft_applied(denoiser: Any, adapter_dir: Path) -> Iterator[Any]:
    """The denoiser with the peft adapter injected by peft (the reference); removed again on exit."""
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(denoiser, str(adapter_dir), adapter_name="emloc_reference")
    except Exception as exc:
        raise MergeError(
            f"peft cannot apply the adapter {adapter_dir} to this denoiser: {exc}",
            hint="The adapter was trained for another model; export with the pipeline it was trained on.",
        ) from exc
    try:
        yield model.base_model.model
    finally:
        model.unload()


@contextlib.contextmanager
def lora_file_applied(info: PipelineInfo, denoiser: Any, lora_file: Path) -> Iterator[Any]:
    """The denoiser with an exported LoRA file loaded by the family's ``load_lora_weights``; unloaded on exit."""
    import diffusers

    cls = getattr(diffusers, info.pipeline_class)
    components = {name: None for name in cls._get_signature_keys(cls)[0]}
    components[info.denoiser] = denoiser
    pipe = cls(**components)
    try:
        pipe.load_lora_weights(
            str(lora_file.parent), weight_name=lora_file.name, adapter_name="emloc_readback"
        )
    except Exception as exc:
        raise MergeError(
            f"diffusers cannot load the exported {lora_file.name}: {exc}",
            hint="This is a bug in the export; use the peft adapter folder meanwhile.",
        ) from exc
    try:
        yield denoiser
    finally:
        denoiser.unload_lora()


def compare(
    what: str,
    out: torch.Tensor,
    ref: torch.Tensor,
    base: torch.Tensor,
    tolerance: float,
    effect_fraction: float | None = 0.1,
) -> Comparison:
    return Comparison(
        what,
        float((out - ref).abs().max()),
        float(ref.abs().max()),
        float((ref - base).abs().max()),
        tolerance,
        effect_fraction,
    )
