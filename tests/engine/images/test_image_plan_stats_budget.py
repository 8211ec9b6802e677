"""The image planner raises the emulator's statistics budget to what the run's heaviest stage leaves free:
fewer calibration passes (each streams the original through every calibration forward again), never a
higher run peak; the CLI and the app hand the plan's budget to the build."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from emloc_engine.images import planning
from emloc_engine.images.emulator import _passes
from emloc_engine.images.options import STATS_BUDGET_GIB, ImageRunConfig
from emloc_engine.images.pipelines import PipelineInfo, compressible_modules, identify_pipeline
from emloc_engine.images.plan_shapes import meta_denoiser
from emloc_engine.images.planning import GIB, ImagePlan, ImagePlanConfig, plan_images, with_plan


def _passes_at(info: PipelineInfo, gib: float) -> int:
    model = meta_denoiser(info)
    return len(_passes(compressible_modules(info.kind, model), gib * GIB, 4))


def _others(plan: ImagePlan) -> int:
    return max(plan.stage(n).peak_bytes for n in ("cache", "train", "correct"))


def test_a_tiny_floor_is_raised_to_the_runs_peak_and_cuts_the_passes(
    pipelines: dict[str, PipelineInfo], monkeypatch: pytest.MonkeyPatch
) -> None:
    info = pipelines["flux"]
    floor = 1e-5  # a tiny pipeline's statistics are far below 4 GiB: scale the floor down to see the choice
    monkeypatch.setattr(planning, "STATS_BUDGET_GIB", floor)
    # batch 4 at 128²: training is the heaviest stage, so the build has room to grow into
    cfg = ImagePlanConfig(info.folder, 2 * GIB, resolution=128, batch_size=4, rank=4, max_sequence_length=16,
                          device="cpu")
    plan = plan_images(cfg)
    assert plan.fits and plan.stats_budget_gib > floor
    assert plan.stage("emulator").peak_bytes <= _others(plan)  # the run's peak is not raised
    assert _passes_at(info, plan.stats_budget_gib) < _passes_at(info, floor)
    # one grid step more would have made the build the run's heaviest stage, or it already holds every statistic
    every = sum(i * i * 4 for _, i in planning._facts(cfg, info, 4).shapes.compressed.values()) / GIB
    bigger = plan_images(replace(cfg, stats_budget_gib=plan.stats_budget_gib * 1.25))
    assert plan.stats_budget_gib >= every or bigger.stage("emulator").peak_bytes > _others(plan)
    # a budget the user gives is kept, even where the plan would pick another
    given = plan_images(replace(cfg, stats_budget_gib=2 * floor))
    assert given.stats_budget_gib == 2 * floor
    assert given.stage("emulator").peak_bytes < plan.stage("emulator").peak_bytes


def test_the_runs_settings_take_the_plans_budget_unless_given(pipelines: dict[str, PipelineInfo], tmp_path: Path) -> None:
    info = pipelines["sdxl"]
    plan = plan_images(ImagePlanConfig(info.folder, 2 * GIB, resolution=64, rank=4, device="cpu"))
    run = ImageRunConfig(info.folder, tmp_path / "images", tmp_path / "run")
    assert with_plan(run, plan).stats_budget_gib == plan.stats_budget_gib >= STATS_BUDGET_GIB
    assert with_plan(run, plan).ratio == plan.ratio
    assert with_plan(replace(run, stats_budget_gib=0.5), plan).stats_budget_gib == 0.5


@pytest.fixture(scope="module")
def flux_dev(tmp_path_factory: pytest.TempPathFactory) -> PipelineInfo:
    """bench_images.py's FLUX.1-dev pipeline (same configs, T5 with 2 layers), as configs and headers only."""
    import diffusers
    from accelerate import init_empty_weights
    from transformers import CLIPTextModel, T5EncoderModel

    from benchmarks.image_shapes import FLUX_DEV, VAE
    from tests.tiny_pipelines import clip_text_config, t5_encoder_config, write_header_only_pipeline

    folder = tmp_path_factory.mktemp("flux-dev-shapes")
    clip_l = clip_text_config(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu")
    t5 = t5_encoder_config(d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64,
                           feed_forward_proj="gated-gelu")
    with init_empty_weights():
        parts: dict[str, Any] = {
            "transformer": diffusers.FluxTransformer2DModel(**FLUX_DEV),
            "text_encoder": CLIPTextModel(clip_l),
            "text_encoder_2": T5EncoderModel(t5),
            "vae": diffusers.AutoencoderKL(**VAE, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                                           use_quant_conv=False, use_post_quant_conv=False),
        }
    return identify_pipeline(write_header_only_pipeline(folder, "FluxPipeline", parts))


def test_flux_dev_in_24_gib_builds_in_a_fifth_of_the_passes(flux_dev: PipelineInfo) -> None:
    plan = plan_images(ImagePlanConfig(flux_dev.folder, 24 * GIB, resolution=1024, rank=16, calibration_batch=1,
                                       eval_batch=1, sample_every=0))
    assert plan.fits and plan.ratio == 0.65  # bench_images' FLUX.1-dev run (issue 23)
    assert plan.stage("emulator").peak_bytes <= plan.stage("train").peak_bytes <= plan.limit_bytes
    assert (_passes_at(flux_dev, STATS_BUDGET_GIB), _passes_at(flux_dev, plan.stats_budget_gib)) == (22, 4)
