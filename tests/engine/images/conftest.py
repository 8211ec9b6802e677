"""Session-wide tiny pipelines of each image family, subject images, their caches and a FLUX emulator
(read-only by convention)."""

from __future__ import annotations

from pathlib import Path

import pytest

from emloc_engine.images.cache import CacheConfig, build_cache
from emloc_engine.images.dataset import ImageFolderConfig, scan_image_folder
from emloc_engine.images.emulator import ImageEmulatorConfig, ImageEmulatorResult, build_image_emulator
from emloc_engine.images.pipelines import PipelineInfo, identify_pipeline
from tests.tiny_pipelines import KINDS, build_tiny_pipeline, write_subject_images

SEQ = 16  # T5 tokens per caption in every test cache


@pytest.fixture(scope="session")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PipelineInfo]:
    cache = tmp_path_factory.mktemp("image_hf") / "hub"
    return {k: identify_pipeline(build_tiny_pipeline(k, cache, weight_std=0.1)) for k in KINDS}


@pytest.fixture(scope="session")
def subject_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("subject")
    write_subject_images(folder, 4, size=(32, 32))
    write_subject_images(folder / "wide", 2, size=(48, 32), seed=1)
    for p in (folder / "wide").iterdir():
        p.rename(folder / f"wide_{p.name}")
    (folder / "wide").rmdir()
    return folder


@pytest.fixture(scope="session")
def caches(
    pipelines: dict[str, PipelineInfo], subject_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """One cache per family: 4 square + 2 wide training images, the last square one held out."""
    items = scan_image_folder(ImageFolderConfig(subject_dir, trigger="sks", min_side_px=16)).items
    out = {}
    for kind, info in pipelines.items():
        root = tmp_path_factory.mktemp(f"cache_{kind}")
        cfg = CacheConfig(
            info,
            root / "cache",
            items[1:],
            items[:1],
            sample_prompts=("sks circle",),
            resolution=32,
            max_sequence_length=SEQ,
            device="cpu",
        )
        out[kind] = build_cache(cfg).cache_dir
    return out


@pytest.fixture(scope="session")
def flux_emulator(
    pipelines: dict[str, PipelineInfo], caches: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> ImageEmulatorResult:
    """The tiny FLUX denoiser compressed at ρ = 0.3 (2 calibration images x 2 timesteps), built once."""
    cfg = ImageEmulatorConfig(
        pipelines["flux"],
        caches["flux"],
        tmp_path_factory.mktemp("flux_emu") / "emulator",
        ratio=0.3,
        calibration_images=2,
        calibration_timesteps=2,
        device="cpu",
    )
    return build_image_emulator(cfg)
