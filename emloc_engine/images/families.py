"""What differs between FLUX, SD3 and SDXL: prompt encoding, the denoiser call, noising and the target.

Everything here works on cached tensors (:mod:`emloc_engine.images.cache`): a latent batch ``x0``
(B, C, H, W) already shifted and scaled like the pipelines do (``(z - shift) * scale``), and a
condition dict of prompt embeddings (``embeds`` (B, T, D), ``pooled`` (B, P); SDXL also ``time_ids``
(B, 6)).

Noise schedules, as diffusers' DreamBooth LoRA scripts (``train_dreambooth_lora_flux.py``,
``..._sd3.py``, ``..._sdxl.py``) train them:

* flow matching (FLUX, SD3): ``x_t = (1 − σ) x0 + σ ε``, target ``ε − x0`` (the velocity), model
  timestep ``1000 σ`` (FLUX's transformer takes ``σ`` itself). Training draws the index ``i`` of the
  scheduler's 1000 training timesteps uniformly (the scripts' default weighting ``none``) and uses
  that timestep's σ (shifted by ``shift`` unless the scheduler shifts per resolution, as FLUX.1 does).
  FLUX.1-dev's guidance embedding gets ``guidance_scale`` (3.5, the scripts' default).
* noise prediction (SDXL): ``DDPMScheduler`` from the pipeline's scheduler config, ``t`` uniform in
  0..999, ``x_t = add_noise(x0, ε, t)``, target ``ε`` (or the velocity for ``v_prediction`` configs).

:func:`fixed_timesteps` gives the deterministic spread of timesteps used for calibration (emulator)
and for the held-out loss (λ choice): ``n`` evenly spaced fractions in (0, 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from emloc_engine.images.pipelines import Kind

GUIDANCE_SCALE = 3.5


def encode_prompts(
    pipe: Any, kind: Kind, prompts: Sequence[str], device: torch.device, max_sequence_length: int
) -> list[dict[str, torch.Tensor]]:
    """Each prompt's ``{"embeds": (T, D), "pooled": (P,)}`` on the CPU in fp32, via the pipeline's own encoder."""
    out = []
    with torch.no_grad():
        for prompt in prompts:
            if kind == "flux":
                embeds, pooled, _ = pipe.encode_prompt(
                    prompt,
                    prompt_2=None,
                    device=device,
                    num_images_per_prompt=1,
                    max_sequence_length=max_sequence_length,
                )
            elif kind == "sd3":
                embeds, _, pooled, _ = pipe.encode_prompt(
                    prompt,
                    None,
                    None,
                    device=device,
                    num_images_per_prompt=1,
                    do_classifier_free_guidance=False,
                    max_sequence_length=max_sequence_length,
                )
            else:
                embeds, _, pooled, _ = pipe.encode_prompt(
                    prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
                )
            out.append({"embeds": embeds[0].float().cpu(), "pooled": pooled[0].float().cpu()})
    return out


def sdxl_time_ids(
    original_hw: tuple[int, int], crop_top_left: tuple[int, int], target_hw: tuple[int, int]
) -> torch.Tensor:
    """SDXL's micro-conditioning: original size, crop corner, target size (height, width order), fp32 (6,)."""
    return torch.tensor([*original_hw, *crop_top_left, *target_hw], dtype=torch.float32)


# ----------------------------------------------------------------------------------------- the call
def pack_flux(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2·W/2, 4C): FLUX's 2×2 patches as tokens (``FluxPipeline._pack_latents``)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_flux(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_flux` for latents of height ``h`` and width ``w``."""
    b, _, d = x.shape
    c = d // 4
    x = x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def predict(
    kind: Kind, model: Any, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]
) -> torch.Tensor:
    """The denoiser's output for noisy latents ``x_t`` (B, C, H, W) at model timesteps ``t`` (B,), same shape as ``x_t``.

    ``t`` is in 0..1000 for every family (FLUX's transformer gets ``t / 1000``).
    """
    dtype = x_t.dtype
    embeds, pooled = cond["embeds"].to(dtype), cond["pooled"].to(dtype)
    if kind == "flux":
        b, _, h, w = x_t.shape
        img_ids = torch.zeros(h // 2, w // 2, 3, device=x_t.device, dtype=dtype)
        img_ids[..., 1] = torch.arange(h // 2, device=x_t.device, dtype=dtype)[:, None]
        img_ids[..., 2] = torch.arange(w // 2, device=x_t.device, dtype=dtype)[None, :]
        txt_ids = torch.zeros(embeds.shape[1], 3, device=x_t.device, dtype=dtype)
        config = model.config
        guidance = (
            torch.full((b,), GUIDANCE_SCALE, device=x_t.device, dtype=dtype)
            if getattr(config, "guidance_embeds", False)
            else None
        )
        out = model(
            hidden_states=pack_flux(x_t),
            timestep=(t / 1000).to(dtype),
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=txt_ids,
            img_ids=img_ids.reshape(-1, 3),
            return_dict=False,
        )[0]
        return unpack_flux(out, h, w)
    if kind == "sd3":
        return model(
            hidden_states=x_t,
            timestep=t.to(dtype),
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
    added = {"text_embeds": pooled, "time_ids": cond["time_ids"].to(dtype)}
    return model(x_t, t, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]


# ----------------------------------------------------------------------------------------- noise
class NoiseSchedule:
    """Noising and training targets of one family, built from the pipeline's scheduler config."""

    def __init__(self, kind: Kind, scheduler_config: dict[str, Any]) -> None:
        self.kind = kind
        self.flow = kind in ("flux", "sd3")
        if self.flow:
            from diffusers import FlowMatchEulerDiscreteScheduler

            sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
            self.sigmas = (
                sched.sigmas[:-1].float()
                if len(sched.sigmas) > sched.config.num_train_timesteps
                else sched.sigmas.float()
            )
            self.num_train = int(sched.config.num_train_timesteps)
            self.prediction = "flow"
        else:
            from diffusers import DDPMScheduler

            self.ddpm = DDPMScheduler.from_config(scheduler_config)
            self.num_train = int(self.ddpm.config.num_train_timesteps)
            self.prediction = str(self.ddpm.config.prediction_type)

    def sample_indices(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training timestep indices, uniform over the scheduler's training timesteps."""
        return torch.randint(0, self.num_train, (batch,), generator=generator)

    def fractions_to_indices(self, fractions: Sequence[float]) -> torch.Tensor:
        """Indices for fractions in (0, 1) of the noise range (0: clean end, 1: pure noise end)."""
        idx = [min(self.num_train - 1, max(0, round(f * (self.num_train - 1)))) for f in fractions]
        if self.flow:  # the flow sigmas are stored from noisy (index 0) to clean
            idx = [self.num_train - 1 - i for i in idx]
        return torch.tensor(idx, dtype=torch.long)

    def noisy_and_target(
        self, x0: torch.Tensor, noise: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, model timestep in 0..1000, target)`` for clean latents ``x0`` and noise ``noise``."""
        if self.flow:
            sigma = self.sigmas[indices].to(x0.device, torch.float32)
            s = sigma.view(-1, 1, 1, 1)
            x_t = ((1.0 - s) * x0.float() + s * noise.float()).to(x0.dtype)
            return x_t, sigma * 1000.0, (noise.float() - x0.float())
        t = indices.to(x0.device)
        x_t = self.ddpm.add_noise(x0.float(), noise.float(), t).to(x0.dtype)
        target = (
            self.ddpm.get_velocity(x0.float(), noise.float(), t)
            if self.prediction == "v_prediction"
            else noise.float()
        )
        return x_t, t.float(), target


def fixed_timesteps(n: int) -> tuple[float, ...]:
    """``n`` evenly spread noise fractions in (0, 1): (i + 0.5) / n."""
    return tuple((i + 0.5) / n for i in range(n))


def denoising_loss(
    kind: Kind,
    model: Any,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    noise: torch.Tensor,
    indices: torch.Tensor,
    cond: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Mean squared error of the denoiser's prediction against the family's target (scalar, fp32)."""
    x_t, t, target = schedule.noisy_and_target(x0, noise, indices)
    pred = predict(kind, model, x_t, t, cond)
    return torch.nn.functional.mse_loss(pred.float(), target.float())


__all__ = [
    "GUIDANCE_SCALE",
    "NoiseSchedule",
    "denoising_loss",
    "encode_prompts",
    "fixed_timesteps",
    "pack_flux",
    "predict",
    "sdxl_time_ids",
    "unpack_flux",
]
