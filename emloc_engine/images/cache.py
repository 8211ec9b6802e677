"""Encode the images and captions once: latents and prompt embeddings in the run folder.

``build_cache(CacheConfig(...), progress) -> CacheResult`` loads the pipeline WITHOUT its denoiser,
encodes every image with the VAE and every distinct caption (and the sample prompts, and the
class prompt for prior preservation) with the text encoders, writes ``RUN/cache/`` and frees them.
Every later stage (emulator calibration, training, λ choice) reads only the cache and the denoiser;
sampling reloads the VAE alone (it is small) to decode.

Bucketing by aspect ratio: each image goes to the bucket of :data:`ASPECTS` nearest its own aspect
ratio (in log space) with about ``resolution²`` pixels, sides rounded to the family's multiple
(the VAE factor × 2 for FLUX's 2×2 packing and SD3's patches, × the UNet's downsampling for SDXL);
it is resized to cover the bucket and centre-cropped (SDXL records the original size and crop
corner as its micro-conditioning). A batch is always drawn from one bucket.

Latents: the VAE's posterior mean and standard deviation are stored (fp32) with the pipeline's
shift and scale, and :meth:`ImageCache.latents` draws ``(mean + std·ε − shift)·scale`` like the
DreamBooth scripts, which sample the posterior at every step.

Folder ``RUN/cache/`` (written to a temporary name, then renamed): ``cache.json`` (settings,
items with caption index, bucket and split, prompts, VAE shift/scale), ``latents.safetensors``
(``{i}.mean``, ``{i}.std``), ``prompts.safetensors`` (``{j}.embeds``, ``{j}.pooled``). A cache
whose settings fingerprint matches is reused.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from emloc_engine.core.atomic import atomic_dir
from emloc_engine.core.errors import ConfigError
from emloc_engine.core.progress import NULL_PROGRESS, Progress
from emloc_engine.images.dataset import ImageItem
from emloc_engine.images.families import encode_prompts, sdxl_time_ids
from emloc_engine.images.pipelines import PipelineInfo, load_pipeline
from emloc_engine.machine import devices

ASPECTS = (1 / 2, 4 / 7, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 7 / 4, 2.0)
CACHE_META = "cache.json"
SPLITS = ("train", "eval", "class")


@dataclass(frozen=True)
class CacheConfig:
    pipeline: PipelineInfo = field(metadata={"help": "The identified pipeline."})
    out_dir: Path = field(metadata={"help": "The cache folder (RUN/cache)."})
    items: tuple[ImageItem, ...] = field(metadata={"help": "The subject's images with their captions."})
    eval_items: tuple[ImageItem, ...] = field(default=(), metadata={"help": "Held-out images (λ choice)."})
    class_items: tuple[ImageItem, ...] = field(
        default=(), metadata={"help": "Class images (prior preservation)."}
    )
    sample_prompts: tuple[str, ...] = field(default=(), metadata={"help": "Prompts of the sample images."})
    resolution: int = field(
        default=1024, metadata={"help": "Training resolution: buckets have about this² pixels."}
    )
    max_sequence_length: int = field(default=512, metadata={"help": "T5 tokens per prompt (FLUX, SD3)."})
    device: str = field(default="auto", metadata={"help": "cuda, cuda:N, cpu or auto."})

    def __post_init__(self) -> None:
        if not self.items:
            raise ConfigError("There are no training images to encode.")
        if self.resolution < 8:
            raise ConfigError(f"resolution must be at least 8 pixels (got {self.resolution}).")


@dataclass(frozen=True)
class CacheResult:
    cache_dir: Path
    reused: bool
    buckets: dict[str, int]
    wall_s: float


def side_multiple(
    pipe_or_info: Any, kind: str, denoiser_config: dict[str, Any], vae_config: dict[str, Any]
) -> int:
    """Pixels per bucket side step: VAE factor × (2 for FLUX packing / SD3 patch / UNet downsampling)."""
    vae = 2 ** (len(vae_config["block_out_channels"]) - 1)
    if kind == "flux":
        return vae * 2
    if kind == "sd3":
        return vae * int(denoiser_config.get("patch_size", 2))
    return vae * 2 ** (len(denoiser_config["block_out_channels"]) - 1)


def bucket_for(width: int, height: int, resolution: int, multiple: int) -> tuple[int, int]:
    """(width, height) of the bucket nearest the image's aspect ratio, about ``resolution²`` pixels."""
    aspect = min(ASPECTS, key=lambda a: abs(math.log(a) - math.log(width / height)))
    w = max(multiple, round(resolution * math.sqrt(aspect) / multiple) * multiple)
    h = max(multiple, round(resolution / math.sqrt(aspect) / multiple) * multiple)
    return w, h


def load_image(path: Path, bucket: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """The image resized to cover ``bucket`` and centre-cropped, as (3, H, W) in [-1, 1]; and its crop corner (top, left)."""
    from PIL import Image

    bw, bh = bucket
    with Image.open(path) as src:
        img: Image.Image = src.convert("RGB")
    scale = max(bw / img.width, bh / img.height)
    rw, rh = max(bw, round(img.width * scale)), max(bh, round(img.height * scale))
    img = img.resize((rw, rh), Image.Resampling.BICUBIC)
    top, left = (rh - bh) // 2, (rw - bw) // 2
    img = img.crop((left, top, left + bw, top + bh))
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(bh, bw, 3)
    return data.permute(2, 0, 1).float().div(127.5).sub(1.0), (top, left)


def _fingerprint(cfg: CacheConfig) -> str:
    parts = [
        str(cfg.pipeline.folder),
        str(cfg.pipeline.denoiser_dir),
        str(cfg.resolution),
        str(cfg.max_sequence_length),
        *cfg.sample_prompts,
    ]
    for split, items in (("train", cfg.items), ("eval", cfg.eval_items), ("class", cfg.class_items)):
        for it in items:
            st = it.path.stat()
            parts += [split, str(it.path), it.caption, str(st.st_size), str(st.st_mtime_ns)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def build_cache(cfg: CacheConfig, progress: Progress = NULL_PROGRESS) -> CacheResult:
    """Encode images and prompts into ``cfg.out_dir`` (module docstring); reuse a matching cache.

    Raises:
        ModelNotFound, UnsupportedModel: the pipeline cannot be loaded.
        Cancelled: between images.
    """
    import time

    t0 = time.monotonic()
    fp = _fingerprint(cfg)
    meta_path = cfg.out_dir / CACHE_META
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("fingerprint") == fp:
            return CacheResult(cfg.out_dir, True, _bucket_counts(meta["items"]), time.monotonic() - t0)
    device = devices.resolve_device(cfg.device)
    info = cfg.pipeline
    # text encoders in the compute dtype (bf16 on GPUs: T5-XXL is 9.5 GB there); the VAE is cast to fp32 below
    pipe = load_pipeline(info, without=(info.denoiser,), dtype=devices.compute_dtype(device, "auto"))
    try:
        return _encode(cfg, pipe, device, fp, progress, t0)
    finally:
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _encode(
    cfg: CacheConfig, pipe: Any, device: torch.device, fp: str, progress: Progress, t0: float
) -> CacheResult:
    import time

    from safetensors.torch import save_file

    info = cfg.pipeline
    vae = pipe.vae.to(device=device, dtype=torch.float32)
    denoiser_config = json.loads((info.denoiser_dir / "config.json").read_text(encoding="utf-8"))
    multiple = side_multiple(pipe, info.kind, denoiser_config, dict(vae.config))
    rows: list[tuple[str, ImageItem]] = [("train", it) for it in cfg.items]
    rows += [("eval", it) for it in cfg.eval_items] + [("class", it) for it in cfg.class_items]
    prompts = list(dict.fromkeys([it.caption for _, it in rows] + list(cfg.sample_prompts) + [""]))
    latents: dict[str, torch.Tensor] = {}
    items_meta = []
    with torch.no_grad():
        for i, (split, it) in enumerate(rows):
            progress.check_cancelled()
            bucket = bucket_for(it.width, it.height, cfg.resolution, multiple)
            pixels, crop = load_image(it.path, bucket)
            dist = vae.encode(pixels[None].to(device)).latent_dist
            latents[f"{i}.mean"] = dist.mean[0].float().cpu().contiguous()
            latents[f"{i}.std"] = dist.std[0].float().cpu().contiguous()
            items_meta.append(
                {
                    "path": str(it.path),
                    "split": split,
                    "caption": prompts.index(it.caption),
                    "bucket": list(bucket),
                    "original_hw": [it.height, it.width],
                    "crop": list(crop),
                }
            )
            progress.update(0.8 * (i + 1) / len(rows), f"encoded image {i + 1}/{len(rows)}")
    pipe.vae = None
    vae.to("cpu")
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).to(device)
    encoded = encode_prompts(pipe, info.kind, prompts, device, cfg.max_sequence_length)
    tensors = {f"{j}.{k}": v.contiguous() for j, e in enumerate(encoded) for k, v in e.items()}
    progress.update(0.95, f"encoded {len(prompts)} prompts")
    vae_cfg = dict(vae.config)
    meta = {
        "format": "emloc-image-cache",
        "format_version": 1,
        "fingerprint": fp,
        "kind": info.kind,
        "pipeline": str(info.folder),
        "denoiser_dir": str(info.denoiser_dir),
        "resolution": cfg.resolution,
        "max_sequence_length": cfg.max_sequence_length,
        "side_multiple": multiple,
        "vae_scale": float(vae_cfg.get("scaling_factor") or 1.0),
        "vae_shift": float(vae_cfg.get("shift_factor") or 0.0),
        "prompts": prompts,
        "sample_prompts": list(cfg.sample_prompts),
        "items": items_meta,
    }
    with atomic_dir(cfg.out_dir, overwrite=True) as tmp:
        save_file(latents, str(tmp / "latents.safetensors"))
        save_file(tensors, str(tmp / "prompts.safetensors"))
        (tmp / CACHE_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    progress.update(1.0, "cache written")
    return CacheResult(cfg.out_dir, False, _bucket_counts(items_meta), time.monotonic() - t0)


def _bucket_counts(items: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for it in items:
        key = f"{it['bucket'][0]}x{it['bucket'][1]}"
        out[key] = out.get(key, 0) + 1
    return out


class ImageCache:
    """A written cache, read back: items per split, latents and conditions as batches."""

    def __init__(self, cache_dir: Path) -> None:
        from safetensors.torch import load_file

        self.dir = Path(cache_dir)
        self.meta: dict[str, Any] = json.loads((self.dir / CACHE_META).read_text(encoding="utf-8"))
        self.kind = self.meta["kind"]
        self._latents = load_file(str(self.dir / "latents.safetensors"))
        self._prompts = load_file(str(self.dir / "prompts.safetensors"))
        self.items: list[dict[str, Any]] = self.meta["items"]
        self.shift, self.scale = float(self.meta["vae_shift"]), float(self.meta["vae_scale"])

    def indices(self, split: str) -> list[int]:
        return [i for i, it in enumerate(self.items) if it["split"] == split]

    def buckets(self, split: str) -> dict[tuple[int, int], list[int]]:
        """Item indices of ``split`` grouped by bucket (width, height), in a stable order."""
        out: dict[tuple[int, int], list[int]] = {}
        for i in self.indices(split):
            b = self.items[i]["bucket"]
            out.setdefault((int(b[0]), int(b[1])), []).append(i)
        return dict(sorted(out.items()))

    def latents(
        self, idx: list[int], generator: torch.Generator | None = None, sample: bool = True
    ) -> torch.Tensor:
        """Scaled latents (B, C, H, W) fp32: a posterior sample (``sample``) or the posterior mean."""
        out = []
        for i in idx:
            z = self._latents[f"{i}.mean"]
            if sample:
                z = z + self._latents[f"{i}.std"] * torch.randn(z.shape, generator=generator)
            out.append((z - self.shift) * self.scale)
        return torch.stack(out)

    def prompt(self, j: int) -> dict[str, torch.Tensor]:
        return {"embeds": self._prompts[f"{j}.embeds"], "pooled": self._prompts[f"{j}.pooled"]}

    def cond(self, idx: list[int]) -> dict[str, torch.Tensor]:
        """Stacked prompt embeddings of the items (and SDXL time ids), fp32 on the CPU."""
        parts = [self.prompt(self.items[i]["caption"]) for i in idx]
        out = {k: torch.stack([p[k] for p in parts]) for k in ("embeds", "pooled")}
        if self.kind == "sdxl":
            out["time_ids"] = torch.stack(
                [
                    sdxl_time_ids(
                        tuple(self.items[i]["original_hw"]),
                        tuple(self.items[i]["crop"]),
                        (self.items[i]["bucket"][1], self.items[i]["bucket"][0]),
                    )
                    for i in idx
                ]
            )
        return out

    def prompt_cond(self, text: str, hw: tuple[int, int]) -> dict[str, torch.Tensor]:
        """The cached condition of one prompt (a sample prompt or ``""``), batch 1."""
        p = self.prompt(self.meta["prompts"].index(text))
        out = {k: v[None] for k, v in p.items()}
        if self.kind == "sdxl":
            out["time_ids"] = sdxl_time_ids(hw, (0, 0), hw)[None]
        return out


__all__ = ["ASPECTS", "CacheConfig", "CacheResult", "ImageCache", "bucket_for", "build_cache", "load_image"]
