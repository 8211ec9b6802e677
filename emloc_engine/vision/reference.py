"""Public shapes of the paper's VLM sizes (no weights), for "would it fit" plans and the GPU benchmark.

``Qwen2.5-VL-7B`` is Qwen/Qwen2.5-VL-7B-Instruct's ``config.json`` (ViT: 32 blocks × 1280, windowed
attention with full attention at blocks 7/15/23/31; decoder: Qwen2-7B shapes). ``InternVL2.5-8B``
is OpenGVLab/InternVL2_5-8B's shapes in transformers' native InternVL classes: InternViT-300M
(24 blocks × 1024, 448² tiles of 14² patches, pixel-shuffle 0.5 → 256 tokens per tile) and the
InternLM2.5-7B decoder written as a Llama config (same layout: 32 blocks × 4096, GQA 8, 14336 MLP,
vocabulary 92553).
"""

from __future__ import annotations

from typing import Any

VLM_REFERENCE_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen2.5-VL-7B": {
        "model_type": "qwen2_5_vl",
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "text_config": {
            "model_type": "qwen2_5_vl_text",
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152064,
            "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [16, 24, 24],
            },
            "bos_token_id": 151643,
            "eos_token_id": 151645,
        },
        "vision_config": {
            "model_type": "qwen2_5_vl",
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 3584,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "hidden_act": "silu",
            "in_channels": 3,
            "tokens_per_second": 2,
        },
    },
    "InternVL2.5-8B": {
        "model_type": "internvl",
        "architectures": ["InternVLForConditionalGeneration"],
        "image_token_id": 92546,
        "image_seq_length": 256,
        "downsample_ratio": 0.5,
        "vision_feature_layer": -1,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "text_config": {
            "model_type": "llama",
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 92553,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        "vision_config": {
            "model_type": "internvl_vision",
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": [448, 448],
            "patch_size": [14, 14],
            "norm_type": "layer_norm",
            "layer_norm_eps": 1e-6,
            "use_qk_norm": False,
            "hidden_act": "gelu",
            "layer_scale_init_value": 0.1,
            "use_mean_pooling": False,
        },
    },
}
"""VLM shapes by name; :func:`emloc_engine.catalog.model_facts.facts_from_config` reads them."""

__all__ = ["VLM_REFERENCE_CONFIGS"]
