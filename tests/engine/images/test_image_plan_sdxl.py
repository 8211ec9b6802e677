"""The image planner's SDXL-shaped predictions, term by term, against an H100 run (issue 23).

``benchmarks/bench_images.py --model sdxl --cap-gib 12 --resolution 1024 --steps 10`` (2026-12-06, H100,
torch 2.11, diffusers 0.42.1; ρ 0.5, 4 images, batch 1, calibration and held-out batch 1, no samples)
measured ``torch.cuda.max_memory_allocated`` per stage (:data:`MEASURED_GIB`). The plan here is made from
a header-only pipeline of the same shapes (configs and safetensors headers, no tensor data), and every
term is written out from the code that holds it, so a changed formula fails here.

The emulator build was measured before two fixes of what it held needlessly (2026-12-06): the block a
calibration pass stops in stayed on the GPU (:mod:`~emloc_engine.images.placement`'s hook did not run
when ``_PassDone`` ended the forward: SDXL's ``up_blocks[0]``, 2.25 GiB), and every normalised statistic
of a pass stayed until the pass ended (the pass's statistics twice). The same terms plus those two
give the measured 9.127 GiB (:func:`test_the_emulator_terms_explain_the_measured_build`); the prediction
is for the fixed code, not yet re-measured.
"""

from __future__ import annotations

from typing import Any

import pytest

from emloc_engine.images.pipelines import PipelineInfo, identify_pipeline
from emloc_engine.images.planning import GIB, ImagePlan, ImagePlanConfig, emulator_params, plan_images
from emloc_engine.run.planning import PlannerConstants

MEASURED_GIB = {"cache": 3.365, "inference": 5.066, "emulator": 9.127, "train": 3.970, "correct": 2.597}
UNET_PARAMS = 2_567_463_684
OUTSIDE = 7_320_004  # conv_in, time/add embeddings, conv_norm_out, conv_out
UP0 = 1_206_568_960  # up_blocks[0]: 3 resnets, 3 × 10 transformer blocks at 1280: the largest streamed block
VAE_PARAMS = 83_653_863
LORA_PARAMS = 41_861_120  # r = 16 × Σ (out + in) over the 700 compressed linears
MAP = 128 * 1024 * 1024 * 4  # one fp32 128-channel feature map at 1024²
BLOCK_1280_STATS = (5 * 1280**2 + 2048**2 + 5120**2) * 4  # attn1 qkv, out; attn2 q, kv (2048), out; ff 0, 2
BLOCK_1280_LORA_DIMS = 4 * 2560 + 2560 + 2 * (1280 + 2048) + 2560 + (10240 + 1280) + (1280 + 5120)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> PipelineInfo:
    """bench_images.py's SDXL pipeline (same configs), written as configs and safetensors headers only."""
    import diffusers
    from accelerate import init_empty_weights
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from benchmarks.image_shapes import SDXL_UNET, VAE
    from tests.tiny_pipelines import clip_text_config, write_header_only_pipeline

    folder = tmp_path_factory.mktemp("sdxl-shapes")
    clip_l = clip_text_config(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu")
    big_g = clip_text_config(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                             num_attention_heads=20, projection_dim=1280, hidden_act="gelu")
    with init_empty_weights():
        parts: dict[str, Any] = {
            "unet": diffusers.UNet2DConditionModel(**SDXL_UNET),
            "text_encoder": CLIPTextModel(clip_l),
            "text_encoder_2": CLIPTextModelWithProjection(big_g),
            "vae": diffusers.AutoencoderKL(**VAE, latent_channels=4, scaling_factor=0.13025),
        }
    return identify_pipeline(write_header_only_pipeline(folder, "StableDiffusionXLPipeline", parts))


@pytest.fixture(scope="module")
def plan(sdxl: PipelineInfo) -> ImagePlan:
    """bench_images.py's ``predicted()`` for that run."""
    return plan_images(ImagePlanConfig(sdxl.folder, 12 * GIB, resolution=1024, rank=16, ratio=0.5,
                                       calibration_batch=1, eval_batch=1, sample_every=0))


def _parts(plan: ImagePlan, stage: str) -> dict[str, int]:
    s = plan.inference if stage == "inference" else plan.stage(stage)
    return {label: b for label, b in s.parts if label != "runtime"}


def _allocated_gib(plan: ImagePlan, stage: str) -> float:
    """The prediction of ``max_memory_allocated``: the stage's peak less the CUDA context."""
    s = plan.inference if stage == "inference" else plan.stage(stage)
    return (s.peak_bytes - PlannerConstants().cuda_context_bytes) / GIB


def test_every_term_is_what_the_code_holds(plan: ImagePlan) -> None:
    assert plan.params == UNET_PARAMS
    cache = _parts(plan, "cache")
    assert cache["VAE (fp32)"] == VAE_PARAMS * 4  # cache._encode: vae.to(fp32)
    # five full-resolution maps (Encoder keeps conv_in's output; the 2nd resnet its input, hidden, sum,
    # quotient) and the image itself
    assert cache["VAE encode (one image)"] == 5 * MAP + 3 * 1024 * 1024 * 4

    emu = _parts(plan, "emulator")
    assert emu["outside the blocks"] == OUTSIDE * 2
    assert emu["one block (original, streamed)"] == UP0 * 2
    # pass 2 of 3: 23 of up_blocks[0]'s transformer blocks (each module's in² counted against 4 GiB, as
    # emulator._passes cuts them; held once per group of linears reading one tensor)
    assert emu["calibration statistics (pass)"] == 23 * BLOCK_1280_STATS
    assert emu["statistics product XᵀX"] == 5120**2 * 4  # ff.net.2's x2ᵀ x2 before add_
    assert 0.14 * GIB < emu["calibration forward"] < 0.17 * GIB  # meta no-grad forward, batch 1 (skips)

    train = _parts(plan, "train")
    assert train["emulator"] == emulator_params(_shapes(plan), 0.5) * 2
    assert train["LoRA + AdamW moments"] == LORA_PARAMS * 12
    # meta forward + backward, checkpointed, peft LoRA: activations, recompute, LoRA gradients (0.156 GiB)
    assert 0.69 * GIB < train["training step (activations, gradients)"] < 0.74 * GIB

    correct = _parts(plan, "correct")
    assert correct["outside the blocks"] == OUTSIDE * 2
    assert correct["one block (original, streamed)"] == UP0 * 2
    assert correct["its adapter (fp32)"] == 30 * BLOCK_1280_LORA_DIMS * 16 * 4  # streamed with its block
    assert correct["held-out forward"] == emu["calibration forward"]


def _shapes(plan: ImagePlan) -> Any:
    from emloc_engine.images.plan_shapes import denoiser_shapes

    return denoiser_shapes(identify_pipeline(plan.config.pipeline_dir))


@pytest.mark.parametrize("stage", ["inference", "train", "correct"])
def test_predictions_are_within_ten_percent_of_the_h100_run(plan: ImagePlan, stage: str) -> None:
    assert _allocated_gib(plan, stage) == pytest.approx(MEASURED_GIB[stage], rel=0.10)


def test_the_emulator_terms_explain_the_measured_build(plan: ImagePlan) -> None:
    """The measured build held, at its pass 2's last factorisation, the block the pass stopped in and every
    normalised statistic of the pass; the same terms with those two give the measurement."""
    emu = _parts(plan, "emulator")
    stats = emu["calibration statistics (pass)"]
    as_measured = (emu["outside the blocks"] + UP0 * 2 + stats + stats) * (1 + PlannerConstants().allocator_slack)
    assert as_measured / GIB == pytest.approx(MEASURED_GIB["emulator"], rel=0.02)
    # fixed: one block (streamed), the statistics, the forward; 3.1 GiB less
    assert _allocated_gib(plan, "emulator") < MEASURED_GIB["emulator"] - 3.0


def test_the_cache_prediction_leaves_the_convolution_workspace_unexplained(plan: ImagePlan) -> None:
    """VAE + five maps + image is 2.91 GiB against 3.365 measured: 0.46 GiB (≈ one fp32 map at 1024² plus
    a little) is not in any tensor the code holds; cuDNN's convolution workspace is the likely holder (not
    visible on the meta device). Pinned so a change either way is noticed."""
    assert _allocated_gib(plan, "cache") == pytest.approx(MEASURED_GIB["cache"], rel=0.15)
    assert _allocated_gib(plan, "cache") < MEASURED_GIB["cache"]


def test_the_anchored_train_stage_terms(plan: ImagePlan) -> None:
    """Anchored training (``anchor="blocks"``) at 1024², batch 1, bf16: not yet measured on a GPU."""
    from dataclasses import replace

    anchored = plan_images(replace(plan.config, anchor="blocks"))
    train, plain = _parts(anchored, "train"), _parts(plan, "train")
    # one offset per element of every BasicTransformerBlock's output: 10 blocks at 640 channels on 64² latent
    # pixels (down_blocks[1]: 2 × 2, up_blocks[1]: 3 × 2), 60 at 1280 on 32² (down 2 × 10, mid 10, up 3 × 10)
    assert train["anchor offsets"] == (10 * 64 * 64 * 640 + 60 * 32 * 32 * 1280) * 2  # 0.195 GiB
    assert train["original outside the blocks (anchors)"] == OUTSIDE * 2
    # the anchor pass (up_blocks[0] streamed + a no-grad forward) outweighs the checkpointed step here
    assert train["one block (original, streamed)"] == UP0 * 2
    assert train["original's forward (anchors)"] == _parts(plan, "inference")["forward"]
    assert "training step (activations, gradients)" not in train
    assert train["original's forward (anchors)"] + UP0 * 2 > plain["training step (activations, gradients)"]
    assert anchored.stage("train").peak_gib == pytest.approx(6.50, abs=0.01)  # unanchored: 4.55
    for name in ("cache", "emulator", "correct"):
        assert anchored.stage(name) == plan.stage(name)
