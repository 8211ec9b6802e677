"""Tiny random diffusers pipelines of every supported image family, saved like the Hugging Face cache.

``build_tiny_pipeline("flux", cache_dir)`` writes
``cache_dir/models--emloc-test--tiny-flux/snapshots/<rev>/`` (a diffusers pipeline folder:
``model_index.json`` + one sub-folder per component, written by ``save_pretrained``) plus
``refs/main``, and returns the snapshot folder. Nothing is downloaded: every component is built from a
config and the tokenizers are built in memory (a CLIP byte-level BPE with no merges; a T5 unigram over
single characters).

Families (``KINDS``): ``flux`` (FluxPipeline: FluxTransformer2DModel 1 double + 1 single block, CLIP + T5
text encoders), ``sd3`` (StableDiffusion3Pipeline: SD3Transformer2DModel 1 block, CLIP x2 + T5) and
``sdxl`` (StableDiffusionXLPipeline: UNet2DConditionModel with one cross-attention level, two CLIP
encoders). Every VAE downsamples by 2, so 32x32 images give 16x16 latents.

``write_subject_images(folder, n)`` writes n PNGs of a synthetic subject (a coloured shape on a
plain background, varied position/size/background) with same-name ``.txt`` captions using a trigger
word; ``SUBJECT_TRIGGER`` is the default trigger.
"""

from __future__ import annotations

import hashlib
import json
import string
from pathlib import Path
from typing import Any

import torch

from tests.tiny_models import save_in_hub_cache

KINDS = ("flux", "sd3", "sdxl")
CLIP_MAX_TOKENS = 77
T5_MAX_TOKENS = 32
SUBJECT_TRIGGER = "sks"


# --------------------------------------------------------------------------------------- tokenizers
def make_clip_tokenizer() -> Any:
    """A CLIP tokenizer over single bytes (no merges): every character is one token, no files needed."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    tok.model_max_length = CLIP_MAX_TOKENS
    return tok


def make_t5_tokenizer() -> Any:
    """A T5 (unigram) tokenizer over printable characters, built in memory."""
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for ch in string.ascii_letters + string.digits + string.punctuation:
        pieces.append((ch, -3.0))
        pieces.append(("▁" + ch, -3.5))
    tok = T5Tokenizer(vocab=pieces, extra_ids=0)
    tok.model_max_length = T5_MAX_TOKENS
    return tok


CLIP_VOCAB = 2 + 2 * 256
T5_VOCAB = 4 + 2 * (len(string.ascii_letters + string.digits + string.punctuation))


def clip_text_config(**size: Any) -> Any:
    """A ``CLIPTextConfig`` over :func:`make_clip_tokenizer`'s vocabulary and special ids; ``size`` sets
    the widths, depth, projection and activation (tiny here, CLIP-L / bigG in benchmarks/bench_images.py)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB,
        max_position_embeddings=CLIP_MAX_TOKENS,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **size,
    )


def t5_encoder_config(**size: Any) -> Any:
    """A ``T5Config`` over :func:`make_t5_tokenizer`'s vocabulary and special ids; ``size`` sets the rest."""
    from transformers import T5Config

    return T5Config(vocab_size=T5_VOCAB, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **size)


def _clip_config(projection_dim: int = 32) -> Any:
    return clip_text_config(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=projection_dim,
        hidden_act="gelu",
    )


def _t5_encoder(d_model: int) -> Any:
    from transformers import T5EncoderModel

    size = dict(d_model=d_model, d_kv=8, d_ff=37, num_layers=1, num_heads=4, relative_attention_num_buckets=8)
    return T5EncoderModel(t5_encoder_config(**size))


def _vae(latent_channels: int, **kw: Any) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        **kw,
    )


# --------------------------------------------------------------------------------------- families
# The FLUX transformer's config at test size (FLUX.1-dev's layout: 1 double + 1 single block, width 32);
# benchmarks/bench_image_export.py's ``--shape tiny`` builds the same one.
TINY_FLUX_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)


def _flux(guidance_embeds: bool) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel

    return dict(
        transformer=FluxTransformer2DModel(**dict(TINY_FLUX_TRANSFORMER, guidance_embeds=guidance_embeds)),
        text_encoder=CLIPTextModel(_clip_config()),
        text_encoder_2=_t5_encoder(32),
        tokenizer=make_clip_tokenizer(),
        tokenizer_2=make_t5_tokenizer(),
        vae=_vae(
            4, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=16,
            max_image_seq_len=256,
        ),
    )


def _sd3() -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    return dict(
        transformer=SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=64,
            caption_projection_dim=32,
            pooled_projection_dim=64,
            out_channels=4,
            pos_embed_max_size=32,
        ),
        text_encoder=CLIPTextModelWithProjection(_clip_config()),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config()),
        text_encoder_3=_t5_encoder(64),
        tokenizer=make_clip_tokenizer(),
        tokenizer_2=make_clip_tokenizer(),
        tokenizer_3=make_t5_tokenizer(),
        vae=_vae(4, shift_factor=0.0609, scaling_factor=1.5305),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def _sdxl() -> dict[str, Any]:
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return dict(
        unet=UNet2DConditionModel(
            block_out_channels=(16, 32),
            layers_per_block=1,
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 1),
            projection_class_embeddings_input_dim=6 * 8 + 32,
            cross_attention_dim=64,
            norm_num_groups=4,
        ),
        text_encoder=CLIPTextModel(_clip_config()),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config()),
        tokenizer=make_clip_tokenizer(),
        tokenizer_2=make_clip_tokenizer(),
        vae=_vae(4, scaling_factor=0.13025),
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            timestep_spacing="leading",
            steps_offset=1,
        ),
    )


_PIPELINE_CLASS = {
    "flux": "FluxPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "sdxl": "StableDiffusionXLPipeline",
}


def tiny_pipeline(
    kind: str, *, seed: int | None = None, guidance_embeds: bool = True, weight_std: float = 0.0
) -> Any:
    """The in-memory tiny pipeline of ``kind`` (deterministic per kind/seed), fp32, on the CPU.

    ``weight_std`` > 0 re-draws every matrix of the denoiser from N(0, weight_std) (makes the
    denoiser's layers full-rank and non-trivial, e.g. for emulator tests); 0 keeps diffusers' init.
    """
    import diffusers

    if kind not in KINDS:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}; one of {KINDS}")
    seed = seed if seed is not None else int(hashlib.sha256(kind.encode()).hexdigest()[:8], 16)
    torch.manual_seed(seed)
    parts = _flux(guidance_embeds) if kind == "flux" else _sd3() if kind == "sd3" else _sdxl()
    denoiser = parts.get("transformer", parts.get("unet"))
    with torch.no_grad():
        for p in denoiser.parameters():
            if weight_std > 0 and p.dim() >= 2:
                p.normal_(0.0, weight_std)
            elif p.dim() == 1 and torch.count_nonzero(p) == 0:
                p.normal_(0.0, 0.02)  # zero-initialised outputs/biases (adaLN, proj_out) would hide bugs
            elif p.dim() >= 2 and torch.count_nonzero(p) == 0:
                p.normal_(0.0, 0.05)
    for m in parts.values():
        if isinstance(m, torch.nn.Module):
            m.eval()
    cls = getattr(diffusers, _PIPELINE_CLASS[kind])
    return cls(**parts)


def build_tiny_pipeline(
    kind: str,
    cache_dir: Path,
    *,
    org: str = "emloc-test",
    name: str | None = None,
    seed: int | None = None,
    guidance_embeds: bool = True,
    weight_std: float = 0.0,
) -> Path:
    """Save the tiny pipeline of ``kind`` in an HF-cache-shaped folder; return its snapshot folder."""
    name = name or f"tiny-{kind}"
    pipe = tiny_pipeline(kind, seed=seed, guidance_embeds=guidance_embeds, weight_std=weight_std)
    rev = hashlib.sha1(f"{kind}-{seed}-{guidance_embeds}-{weight_std}".encode()).hexdigest()
    return save_in_hub_cache(
        cache_dir, org, name, rev, lambda snap: pipe.save_pretrained(snap, safe_serialization=True)
    )


# --------------------------------------------------------------------------------------- images
_COLOURS = [(220, 40, 40), (40, 160, 60), (40, 80, 220), (230, 200, 40), (150, 60, 200), (30, 180, 190)]


def write_subject_images(
    folder: Path,
    n: int = 4,
    *,
    size: tuple[int, int] = (32, 32),
    trigger: str = SUBJECT_TRIGGER,
    shape: str = "circle",
    colour: int = 0,
    seed: int = 0,
    captions: bool = True,
) -> list[Path]:
    """Write ``n`` PNGs of one synthetic subject (a ``shape`` in colour ``_COLOURS[colour]``) + captions.

    Position, size and background vary per image; the caption is ``"a photo of {trigger} {shape}"``
    followed by the background colour. Returns the image paths.
    """
    import random

    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    w, h = size
    paths = []
    for i in range(n):
        bg_name, bg = rng.choice(
            [("white", (245, 245, 245)), ("grey", (128, 128, 128)), ("black", (15, 15, 15))]
        )
        img = Image.new("RGB", (w, h), bg)
        draw = ImageDraw.Draw(img)
        r = rng.uniform(0.2, 0.35) * min(w, h)
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = _COLOURS[colour % len(_COLOURS)]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        path = folder / f"img_{i:03d}.png"
        img.save(path)
        if captions:
            path.with_suffix(".txt").write_text(f"a photo of {trigger} {shape} on a {bg_name} background\n")
        paths.append(path)
    return paths


def write_header_only_pipeline(folder: Path, pipeline_class: str, parts: dict[str, Any]) -> Path:
    """A pipeline folder of ``parts`` (models built under ``init_empty_weights``): each part's config and a
    safetensors file holding only its header (shapes, bf16, no tensor data), enough for the image planner,
    which never loads a weight. Returns ``folder``."""
    import struct

    index: dict[str, Any] = {"_class_name": pipeline_class}
    for name, model in parts.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        diffusers_part = type(model).__module__.startswith("diffusers")
        (model.save_config if diffusers_part else model.config.save_pretrained)(folder / name)
        weights = "diffusion_pytorch_model.safetensors" if diffusers_part else "model.safetensors"
        header, offset = {}, 0
        for key, tensor in model.state_dict().items():
            n = tensor.numel() * 2
            header[key] = {"dtype": "BF16", "shape": list(tensor.shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header).encode()
        (folder / name / weights).write_bytes(struct.pack("<Q", len(raw)) + raw)
        index[name] = ["diffusers" if diffusers_part else "transformers", type(model).__name__]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder
