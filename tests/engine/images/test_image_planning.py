"""The image planner: sizes from configs equal the loaded models', peaks grow with resolution and
batch, a smaller budget gives a smaller ρ, and nothing fitting is refused saying by how much."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from emloc_engine.core.errors import InsufficientMemory
from emloc_engine.images.emulator import ImageEmulatorResult, load_image_emulator
from emloc_engine.images.pipelines import PipelineInfo, load_denoiser
from emloc_engine.images.plan_shapes import component_params, denoiser_shapes
from emloc_engine.images.planning import (
    GIB,
    ImagePlanConfig,
    emulator_params,
    format_plan_table,
    lora_params,
    plan_images,
    plan_table,
)

SEQ = 16
STEP = "training step (activations, gradients)"


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())


def _cfg(info: PipelineInfo, budget_gib: float = 2.0, **kw: object) -> ImagePlanConfig:
    base = ImagePlanConfig(info.folder, int(budget_gib * GIB), resolution=64, rank=4, max_sequence_length=SEQ)
    return replace(base, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["flux", "sd3", "sdxl"])
def test_sizes_from_configs_equal_the_loaded_models(kind: str, pipelines: dict[str, PipelineInfo]) -> None:
    info = pipelines[kind]
    shapes = denoiser_shapes(info)
    denoiser = load_denoiser(info)
    assert shapes.params == _numel(denoiser)
    linears = {
        n: (m.out_features, m.in_features) for n, m in denoiser.named_modules() if n in shapes.compressed
    }
    assert linears == shapes.compressed and len(linears) > 0
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(info.folder, local_files_only=True)
    assert component_params(info, "vae") == _numel(pipe.vae)
    assert component_params(info, "text_encoder") == sum(
        p.numel() for p in pipe.text_encoder.state_dict().values()
    )


def test_emulator_and_lora_parameters_match_the_built_emulator(
    pipelines: dict[str, PipelineInfo], flux_emulator: ImageEmulatorResult
) -> None:
    shapes = denoiser_shapes(pipelines["flux"])
    assert emulator_params(shapes, 0.3) == _numel(load_image_emulator(flux_emulator.emulator_dir))
    assert emulator_params(shapes, 0.3) < emulator_params(shapes, 0.6) < shapes.params
    assert (
        lora_params(shapes, 8)
        == 2 * lora_params(shapes, 4)
        == sum(8 * (o + i) for o, i in shapes.compressed.values())
    )


@pytest.mark.parametrize("kind", ["flux", "sdxl"])
def test_peaks_grow_with_resolution_and_batch(kind: str, pipelines: dict[str, PipelineInfo]) -> None:
    info = pipelines[kind]
    small = plan_images(_cfg(info, resolution=32))
    big = plan_images(_cfg(info, resolution=64))
    batch = plan_images(_cfg(info, resolution=64, batch_size=4))
    for name in ("emulator", "train", "correct"):
        assert small.stage(name).peak_bytes < big.stage(name).peak_bytes
    assert big.stage("train").peak_bytes < batch.stage("train").peak_bytes
    # a no-grad forward holds less than a training step keeps, and grows with the resolution
    fwd = {p: dict(p.stage("correct").parts)["held-out forward"] for p in (small, big)}
    assert 0 < fwd[small] < fwd[big] < dict(big.stage("train").parts)[STEP] * 4
    assert batch.latent_tokens == 4 * big.latent_tokens
    # FLUX: tokens are the 2×2 patches of the latent (VAE /2 here): (64/2/2)² = 256
    if kind == "flux":
        assert big.latent_tokens == (64 // 4) ** 2
    # the CPU keeps every activation (no checkpointing) in fp32: more than the GPU plan
    cpu = plan_images(_cfg(info, device="cpu"))
    assert dict(cpu.stage("train").parts)[STEP] > dict(big.stage("train").parts)[STEP] > 0


def test_smaller_budget_gives_smaller_ratio_and_refuses_clearly(pipelines: dict[str, PipelineInfo]) -> None:
    info = pipelines["sdxl"]
    roomy = plan_images(_cfg(info, budget_gib=4.0, device="cpu"))
    assert roomy.fits and roomy.ratio == 0.9
    # a budget between the training peaks at ρ = 0.5 and ρ = 0.9 (the CPU: no CUDA context)
    at = {r: plan_images(_cfg(info, device="cpu", ratio=r)).stage("train").peak_bytes for r in (0.5, 0.9)}
    fixed = max(roomy.stage(n).peak_bytes for n in ("cache", "emulator", "correct"))
    budget = max(at[0.5], fixed) + (at[0.9] - max(at[0.5], fixed)) // 2
    tight = plan_images(replace(_cfg(info, device="cpu"), budget_bytes=int(budget / 0.9) + 1))
    assert tight.fits and tight.ratio is not None and 0.5 <= tight.ratio < roomy.ratio
    assert tight.stage("train").peak_bytes <= tight.limit_bytes
    none = plan_images(replace(_cfg(info, device="cpu"), budget_bytes=1024))
    assert not none.fits and none.ratio is None
    assert "Nothing fits" in none.reason and "GiB more than the budget allows" in none.reason
    with pytest.raises(InsufficientMemory, match="Nothing fits"):
        none.raise_if_unfit()


def test_plan_table_lists_every_option(pipelines: dict[str, PipelineInfo]) -> None:
    plans = plan_table(_cfg(pipelines["flux"]), (32, 64), (1, 2))
    assert [(p.config.resolution, p.config.batch_size) for p in plans] == [(32, 1), (32, 2), (64, 1), (64, 2)]
    text = format_plan_table(plans)
    assert text.count("\n") == 4 and "0.9" in text


def test_emloc_plan_on_a_pipeline_prints_the_image_plan(
    pipelines: dict[str, PipelineInfo], capsys: pytest.CaptureFixture[str]
) -> None:
    from emloc_engine.cli.main import main

    folder = str(pipelines["sdxl"].folder)
    assert main(["plan", folder, "--gpu-gib", "4", "--resolution", "64"]) == 0
    out = capsys.readouterr().out
    assert "resolution  batch" in out and "ρ = 0.9" in out and "train" in out
    for res in ("512", "768", "1024"):
        assert f"\n{res:>10}  " in out
    assert main(["plan", folder, "--budget-gib", "0.0001", "--gpu-gib", "4", "--resolution", "64"]) == 3
    assert "Nothing fits" in capsys.readouterr().out
    # anchored: the train stage names the anchors' terms (--anchor reaches the planner)
    assert main(["plan", folder, "--gpu-gib", "4", "--resolution", "64", "--anchor", "blocks"]) == 0
    assert "anchor offsets" in capsys.readouterr().out
    assert main(["plan", folder, "--gpu-gib", "4", "--resolution", "64"]) == 0
    assert "anchor offsets" not in capsys.readouterr().out


def test_emloc_image_ratio_auto_refuses_and_resumes_with_the_first_ratio(
    pipelines: dict[str, PipelineInfo], subject_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from emloc_engine.cli.main import main
    from emloc_engine.images.planning import stored_ratio, stored_stats_budget

    run = tmp_path / "run"
    args = [
        "image",
        str(pipelines["sdxl"].folder),
        str(subject_dir),
        "--out",
        str(run),
        "--min-side-px",
        "16",
        "--resolution",
        "32",
        "--device",
        "cpu",
        "--budget-gib",
        "0.0001",
    ]
    assert main(args) != 0
    assert "GiB more than the budget allows" in capsys.readouterr().err
    assert not (run / "image_run.json").exists()
    run.mkdir()
    (run / "image_run.json").write_text(json.dumps({"ratio": "0.3"}))
    assert stored_ratio(run) == 0.3 and stored_ratio(tmp_path) is None
    assert stored_stats_budget(run) is None


def test_a_resumed_auto_run_keeps_its_first_statistics_budget(tmp_path: Path) -> None:
    """A resumed ``--ratio auto`` run keeps the ρ and the statistics budget it was started with (a build stopped
    midway reruns with the plan's budget, not the 4 GiB default); a budget the user gives now still wins."""
    import argparse
    import json

    from emloc_engine.cli.commands.image import _auto_ratio
    from emloc_engine.images.options import ImageRunConfig

    run = tmp_path / "run"
    run.mkdir()
    (run / "image_run.json").write_text(json.dumps({"ratio": "0.65", "stats_budget_gib": "19.073486328125"}))
    cfg = ImageRunConfig(pipeline_dir=tmp_path, images_dir=tmp_path, run_dir=run)
    args = argparse.Namespace(budget_gib=None, gpu_memory=None)
    resumed = _auto_ratio(cfg, args)
    assert (resumed.ratio, resumed.stats_budget_gib) == (0.65, 19.073486328125)
    given = _auto_ratio(ImageRunConfig(pipeline_dir=tmp_path, images_dir=tmp_path, run_dir=run, stats_budget_gib=5.0),
                        args)
    assert (given.ratio, given.stats_budget_gib) == (0.65, 5.0)


def test_an_unreadable_run_settings_file_is_named_with_the_fix(tmp_path: Path) -> None:
    from emloc_engine.core.errors import ConfigError
    from emloc_engine.images.planning import stored_stats_budget

    (tmp_path / "image_run.json").write_text('{"stats_budget_gib": "lots"}')
    with pytest.raises(ConfigError, match=r"image_run\.json is not a run.s settings file: stats_budget_gib") as exc:
        stored_stats_budget(tmp_path)
    assert "new run folder" in str(exc.value)
    assert (tmp_path / "image_run.json").read_text() == '{"stats_budget_gib": "lots"}'  # left as it was
