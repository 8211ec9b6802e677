"""The planner counts a VLM's image tokens and vision tower (run/vision_planning.py)."""

from __future__ import annotations

from dataclasses import replace

from emloc_engine.catalog.model_facts import facts_from_config
from emloc_engine.run.planning import PlanConfig, plan_memory
from emloc_engine.run.vision_planning import vision_context_tokens
from emloc_engine.vision.reference import VLM_REFERENCE_CONFIGS


def test_reference_vlms_count_their_image_tokens() -> None:
    qwen = facts_from_config(VLM_REFERENCE_CONFIGS["Qwen2.5-VL-7B"])
    assert qwen.kind == "vision-language" and qwen.hidden_size == 3584 and qwen.num_layers == 28
    assert qwen.vision is not None and qwen.vision.num_blocks == 32
    # the processor's default max_pixels 1003520 at 14² patches: 5120 patches, 2×2 merge: 1280 tokens
    assert (qwen.vision.patches_per_image, qwen.vision.tokens_per_image) == (5120, 1280)
    assert vision_context_tokens(qwen) == 1280 + -(-5120 * 1280 // 3584)
    intern = facts_from_config(
        VLM_REFERENCE_CONFIGS["InternVL2.5-8B"], preprocessor={"crop_to_patches": False}
    )
    assert intern.vision is not None and intern.vision.tokens_per_image == 256
    assert intern.vision.linear_parameters_per_block == 4 * 1024 * 1024 + 2 * 1024 * 4096


def test_plan_of_a_vlm_is_the_decoders_over_its_real_context() -> None:
    vlm = facts_from_config(VLM_REFERENCE_CONFIGS["InternVL2.5-8B"], preprocessor={"crop_to_patches": False})
    text_only = replace(vlm, vision=None)
    cfg = PlanConfig(context_length=512, budget_bytes=40 * 2**30, ratio=0.5)
    with_images, without = plan_memory(vlm, cfg), plan_memory(text_only, cfg)
    extra = vision_context_tokens(vlm)
    assert extra == 256 + 257  # 256 image tokens; 32² + 1 patches of width 1024 = 257 tokens of width 4096
    assert with_images.stage("train").peak_bytes > without.stage("train").peak_bytes
    same = plan_memory(text_only, replace(cfg, context_length=512 + extra))
    assert with_images.stage("train").peak_bytes == same.stage("train").peak_bytes


def test_vlm_stages_are_planned_as_they_run_original_resident_and_chunked_loss() -> None:
    """The VLM stages never stream the original (the λ search loads it whole) and evaluate the loss in chunks:
    the plan says so, and its correction is the inference peak plus the adapter, not plus the image-long logits."""
    qwen = facts_from_config(VLM_REFERENCE_CONFIGS["Qwen2.5-VL-7B"])
    plan = plan_memory(qwen, PlanConfig(context_length=45, lora_rank=16, anchored=False))
    assert plan.fits and not plan.stream_original
    correct, train = plan.stage("correct"), plan.stage("train")
    # the untied embedding table stays in RAM during the λ search (weights.cpu_embeddings)
    assert dict(correct.parts)["weights (λ evaluation; input embeddings in RAM)"] == (
        qwen.num_parameters - qwen.embedding_parameters) * 2
    assert correct.peak_bytes <= plan.inference.peak_bytes
    assert "checkpointed activations" in dict(train.parts) and train.peak_bytes <= plan.inference.peak_bytes


def test_internvl_fits_at_its_inference_peak_because_the_embeddings_stay_in_ram() -> None:
    """Measured on an H100 (2026-12-05): InternVL2.5-8B shapes' λ search with the whole original on the GPU took
    15.38 GiB against a 15.14 GiB inference peak, and the plan said "does not fit" at any ρ. With the table in
    RAM the plan fits, and its correction is below the inference peak by more than the adapter."""
    internvl = facts_from_config(VLM_REFERENCE_CONFIGS["InternVL2.5-8B"])
    assert not internvl.tie_word_embeddings
    plan = plan_memory(internvl, PlanConfig(context_length=100, lora_rank=16, anchored=False))
    assert plan.fits and plan.ratio is not None
    assert plan.stage("correct").peak_bytes < plan.inference.peak_bytes
