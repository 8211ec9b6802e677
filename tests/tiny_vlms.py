"""Tiny random vision-language models of every supported family, saved like the Hugging Face hub cache.

``build_tiny_vlm("qwen2_vl", cache_dir)`` writes
``cache_dir/models--emloc-test--tiny-vlm-qwen2_vl/snapshots/<rev>/`` with ``config.json``,
deterministic safetensors weights, ``generation_config.json``, a processor (image processor config
written here, the byte-level tokenizer of :mod:`tests.tiny_models` plus the family's image tokens,
a ChatML chat template whose image parts render as the family's placeholder) and ``refs/main``.
Nothing is downloaded. It returns the snapshot folder.

Images are 28×28 (Qwen: 2×2 patches of 14 → one merged token; LLaVA/InternVL/Gemma 3/Idefics3: a
few tokens), so a forward with an image costs about as much as one with a dozen more text tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tests.tiny_models import SPECIALS, TEXT_CONFIG, make_tokenizer, write_snapshot

VLM_FAMILIES = (
    "qwen2_vl",
    "qwen2_5_vl",
    "llava",
    "llava_next",
    "llava_onevision",
    "internvl",
    "idefics3",
    "smolvlm",
    "gemma3",
)

_TEXT: dict[str, Any] = dict(TEXT_CONFIG, max_position_embeddings=512)  # image tokens make longer contexts
# A small ViT shared by the CLIP / SigLIP / InternViT towers: 2 blocks, width 32.
_VIT: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
# The resolutions LLaVA-NeXT / OneVision tile an image over: the model config and its processor need the same.
_GRID_PINPOINTS = [[28, 28], [28, 56], [56, 28]]

# Extra special tokens of each family (ids 4, 5, ... after the base specials), and how an image part
# of a message renders in the chat template.
_ROWCOL = tuple(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6))
_TOKENS: dict[str, tuple[tuple[str, ...], str]] = {
    "qwen2_vl": (
        ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"),
        "<|vision_start|><|image_pad|><|vision_end|>",
    ),
    "llava": (("<image>",), "<image>"),
    "internvl": (("<img>", "</img>", "<IMG_CONTEXT>", "<video>"), "<IMG_CONTEXT>"),
    "idefics3": (
        ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *_ROWCOL),
        "<image>",
    ),
    "gemma3": (("<start_of_image>", "<end_of_image>", "<image_soft_token>"), "<start_of_image>"),
}
_TOKENS["qwen2_5_vl"] = _TOKENS["qwen2_vl"]
_TOKENS["llava_next"] = _TOKENS["llava_onevision"] = _TOKENS["llava"]
_TOKENS["smolvlm"] = _TOKENS["idefics3"]


def _chat_template(image: str) -> str:
    """ChatML; a message's content is a string or a list of ``text`` / ``image`` parts."""
    return (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}{{ '" + image + "' }}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "{{ '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


def token_id(family: str, token: str) -> int:
    """Id of one of the family's image tokens in the tiny tokenizer."""
    return len(SPECIALS) + _TOKENS[family][0].index(token)


def make_vlm_tokenizer(family: str, named: dict[str, str] | None = None) -> Any:
    """The byte-level test tokenizer with the family's image tokens as specials (no files needed)."""
    extra, image = _TOKENS[family]
    return make_tokenizer(extra, named=named, chat_template=_chat_template(image))


# -- configs ------------------------------------------------------------------------------------------
def _qwen_vision(family: str) -> dict[str, Any]:
    v: dict[str, Any] = dict(
        depth=2,
        hidden_size=32,
        num_heads=4,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
    )
    if family == "qwen2_vl":
        v.update(embed_dim=32, mlp_ratio=2)
    else:
        v.update(intermediate_size=64, out_hidden_size=32, window_size=56, fullatt_block_indexes=[1])
    return v


def _config(family: str) -> Any:
    from transformers import AutoConfig

    tid = lambda t: token_id(family, t)  # noqa: E731
    if family in ("qwen2_vl", "qwen2_5_vl"):
        text = dict(
            _TEXT,
            model_type=f"{family}_text",
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
        )
        return AutoConfig.for_model(
            family,
            text_config=text,
            vision_config=_qwen_vision(family),
            image_token_id=tid("<|image_pad|>"),
            video_token_id=tid("<|video_pad|>"),
            vision_start_token_id=tid("<|vision_start|>"),
            vision_end_token_id=tid("<|vision_end|>"),
            tie_word_embeddings=False,
        )
    if family in ("llava", "llava_next"):
        vision = dict(_VIT, model_type="clip_vision_model", image_size=28, patch_size=14, projection_dim=32)
        kw: dict[str, Any] = {}
        if family == "llava_next":
            kw = dict(image_grid_pinpoints=_GRID_PINPOINTS)
        return AutoConfig.for_model(
            family,
            text_config=dict(_TEXT, model_type="llama"),
            vision_config=vision,
            image_token_index=tid("<image>"),
            image_seq_length=4,
            vision_feature_layer=-2,
            tie_word_embeddings=False,
            **kw,
        )
    if family == "llava_onevision":
        vision = dict(_VIT, model_type="siglip_vision_model", image_size=28, patch_size=14)
        return AutoConfig.for_model(
            family,
            text_config=dict(_TEXT, model_type="qwen2"),
            vision_config=vision,
            image_token_index=tid("<image>"),
            vision_feature_layer=-1,
            image_grid_pinpoints=_GRID_PINPOINTS,
            tie_word_embeddings=False,
        )
    if family == "internvl":
        vision = dict(_VIT, model_type="internvl_vision", image_size=[28, 28], patch_size=[7, 7])
        return AutoConfig.for_model(
            family,
            text_config=dict(_TEXT, model_type="qwen2"),
            vision_config=vision,
            image_token_id=tid("<IMG_CONTEXT>"),
            image_seq_length=4,
            downsample_ratio=0.5,
            tie_word_embeddings=False,
        )
    if family in ("idefics3", "smolvlm"):
        vision = dict(_VIT, image_size=28, patch_size=7)
        return AutoConfig.for_model(
            family,
            text_config=dict(_TEXT, model_type="llama"),
            vision_config=vision,
            image_token_id=tid("<image>"),
            scale_factor=2,
            tie_word_embeddings=False,
        )
    if family == "gemma3":
        text = dict(
            _TEXT,
            model_type="gemma3_text",
            head_dim=8,
            query_pre_attn_scalar=8,
            sliding_window=64,
            hidden_activation="gelu_pytorch_tanh",
        )
        vision = dict(_VIT, model_type="siglip_vision_model", image_size=28, patch_size=7)
        return AutoConfig.for_model(
            family,
            text_config=text,
            vision_config=vision,
            mm_tokens_per_image=4,
            boi_token_index=tid("<start_of_image>"),
            eoi_token_index=tid("<end_of_image>"),
            image_token_index=tid("<image_soft_token>"),
            tie_word_embeddings=False,
        )
    raise ValueError(f"unknown VLM family {family!r}")


# -- processors ---------------------------------------------------------------------------------------
_MEAN, _STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


def _processor(family: str) -> Any:
    import transformers as tf

    from emloc_engine.vision.processor import _without_video as _nv

    if family in ("qwen2_vl", "qwen2_5_vl"):
        ip = tf.Qwen2VLImageProcessorPil(
            min_pixels=28 * 28,
            max_pixels=28 * 28,
            patch_size=14,
            merge_size=2,
            temporal_patch_size=2,
            image_mean=_MEAN,
            image_std=_STD,
        )
        cls = _nv(tf.Qwen2VLProcessor) if family == "qwen2_vl" else _nv(tf.Qwen2_5_VLProcessor)
        return cls(
            image_processor=ip,
            tokenizer=make_vlm_tokenizer(family),
            chat_template=_chat_template(_TOKENS[family][1]),
        )
    if family in ("llava", "llava_next"):
        # LLaVA-NeXT is LLaVA 1.5's processor plus tiling of larger images over the grid pinpoints
        crop: dict[str, Any] = dict(
            size={"shortest_edge": 28},
            crop_size={"height": 28, "width": 28},
            image_mean=_MEAN,
            image_std=_STD,
        )
        if family == "llava":
            ip, cls = tf.CLIPImageProcessorPil(**crop), tf.LlavaProcessor
        else:
            ip = tf.LlavaNextImageProcessorPil(**crop, image_grid_pinpoints=_GRID_PINPOINTS)
            cls = tf.LlavaNextProcessor
        return cls(
            image_processor=ip,
            tokenizer=make_vlm_tokenizer(family),
            patch_size=14,
            vision_feature_select_strategy="default",
            image_token="<image>",
            num_additional_image_tokens=1,
            chat_template=_chat_template("<image>"),
        )
    if family == "llava_onevision":
        ip = tf.LlavaOnevisionImageProcessorPil(
            size={"height": 28, "width": 28},
            image_grid_pinpoints=_GRID_PINPOINTS,
            image_mean=_MEAN,
            image_std=_STD,
        )
        return _nv(tf.LlavaOnevisionProcessor)(
            image_processor=ip,
            tokenizer=make_vlm_tokenizer(family),
            num_image_tokens=4,
            vision_feature_select_strategy="full",
            image_token="<image>",
            chat_template=_chat_template("<image>"),
        )
    if family == "internvl":
        ip = tf.GotOcr2ImageProcessorPil(
            size={"height": 28, "width": 28}, crop_to_patches=False, image_mean=_MEAN, image_std=_STD
        )
        tok = make_vlm_tokenizer(
            family,
            {
                "start_image_token": "<img>",
                "end_image_token": "</img>",
                "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>",
            },
        )
        return _nv(tf.InternVLProcessor)(
            image_processor=ip,
            tokenizer=tok,
            image_seq_length=4,
            chat_template=_chat_template("<IMG_CONTEXT>"),
        )
    if family in ("idefics3", "smolvlm"):
        cls = tf.Idefics3ImageProcessorPil if family == "idefics3" else tf.SmolVLMImageProcessorPil
        ip = cls(
            size={"longest_edge": 28},
            max_image_size={"longest_edge": 28},
            do_image_splitting=False,
            image_mean=_MEAN,
            image_std=_STD,
        )
        tok = make_vlm_tokenizer(family)
        if family == "idefics3":
            return tf.Idefics3Processor(
                image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=_chat_template("<image>")
            )
        return _nv(tf.SmolVLMProcessor)(
            image_processor=ip,
            tokenizer=tok,
            video_processor=None,
            image_seq_len=4,
            chat_template=_chat_template("<image>"),
        )
    if family == "gemma3":
        ip = tf.Gemma3ImageProcessorPil(size={"height": 28, "width": 28}, image_mean=_MEAN, image_std=_STD)
        tok = make_vlm_tokenizer(
            family,
            {
                "boi_token": "<start_of_image>",
                "eoi_token": "<end_of_image>",
                "image_token": "<image_soft_token>",
            },
        )
        return tf.Gemma3Processor(
            image_processor=ip,
            tokenizer=tok,
            image_seq_length=4,
            chat_template=_chat_template("<start_of_image>"),
        )
    raise ValueError(f"unknown VLM family {family!r}")


def _fill(model: torch.nn.Module, weight_std: float) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, weight_std)
            elif "norm" in name and "weight" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.05)


def build_tiny_vlm(
    family: str,
    cache_dir: Path,
    *,
    org: str = "emloc-test",
    name: str | None = None,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
    weight_std: float = 0.2,
    tweak: Callable[[Any], None] | None = None,
) -> Path:
    """Create a tiny VLM of ``family`` in an HF-cache-shaped folder; return its snapshot folder."""
    from transformers import AutoModelForImageTextToText

    from emloc_engine.vision.processor import save_processor_parts

    name = name or f"tiny-vlm-{family}"
    config = _config(family)
    if tweak is not None:
        tweak(config)
    seed = seed if seed is not None else int(hashlib.sha256(f"vlm-{family}".encode()).hexdigest()[:8], 16)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    _fill(model, weight_std)
    model = model.to(dtype)
    rev = hashlib.sha1(f"{family}-{seed}-{weight_std}".encode()).hexdigest()
    snap = write_snapshot(model, cache_dir, org, name, rev, max_new_tokens=8)
    save_processor_parts(_processor(family), snap)
    return snap


def write_png(
    path: Path,
    colour: tuple[int, int, int] = (200, 30, 30),
    size: int = 28,
    shape: str = "square",
    count: int = 1,
) -> Path:
    """A small PNG: ``count`` shapes of ``colour`` on white (for data tests and the visual task)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    step = size // max(1, count)
    for i in range(count):
        box = (i * step + 1, size // 4, i * step + max(2, step - 2), 3 * size // 4)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
