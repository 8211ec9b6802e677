"""Correction of an image adapter: the text engine's identities hold on real denoiser adapters."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from emloc_engine.core.errors import RunStateError
from emloc_engine.images.batches import batches_loss, calibration_batches
from emloc_engine.images.cache import ImageCache
from emloc_engine.images.correction import ImageCorrectionConfig, correct_image_adapter
from emloc_engine.images.emulator import ImageEmulatorConfig, build_image_emulator
from emloc_engine.images.families import NoiseSchedule
from emloc_engine.images.pipelines import PipelineInfo, load_denoiser, scheduler_config
from emloc_engine.images.training import ImageTrainConfig, train_image_lora
from emloc_engine.weights.adapters import read_adapter
from emloc_engine.weights.checkpoint import Checkpoint


def _run(
    kind: str,
    pipelines: dict[str, PipelineInfo],
    caches: dict[str, Path],
    root: Path,
    *,
    full_rank: bool = False,
    ratio: float = 0.4,
) -> Path:
    info = pipelines[kind]
    emu = build_image_emulator(
        ImageEmulatorConfig(
            info,
            caches[kind],
            root / "emulator",
            ratio=ratio,
            full_rank=full_rank,
            calibration_images=3,
            calibration_timesteps=2,
            device="cpu",
        )
    )
    train_image_lora(
        ImageTrainConfig(
            info, caches[kind], emu.emulator_dir, root, steps=3, lr=2e-2, rank=4, alpha=8.0, device="cpu"
        )
    )
    return root


def _correct(
    kind: str,
    pipelines: dict[str, PipelineInfo],
    caches: dict[str, Path],
    root: Path,
    lam: float | None,
    out: str,
) -> Path:
    cfg = ImageCorrectionConfig(
        pipelines[kind],
        caches[kind],
        root / "emulator",
        root / "adapter",
        root / out,
        lambda_=lam,
        device="cpu",
    )
    return correct_image_adapter(cfg).adapter_dir


@pytest.fixture(scope="module")
def flux_run(
    pipelines: dict[str, PipelineInfo], caches: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return _run("flux", pipelines, caches, tmp_path_factory.mktemp("flux_run"))


def test_lambda_zero_is_the_trained_adapter(
    flux_run: Path, pipelines: dict[str, PipelineInfo], caches: dict[str, Path]
) -> None:
    out = _correct("flux", pipelines, caches, flux_run, 0.0, "c0")
    trained, corrected = (
        load_file(str(p / "adapter_model.safetensors")) for p in (flux_run / "adapter", out)
    )
    assert trained.keys() == corrected.keys() and all(torch.equal(trained[k], corrected[k]) for k in trained)


def test_lambda_inf_is_exact_on_the_adapter_directions(
    flux_run: Path, pipelines: dict[str, PipelineInfo], caches: dict[str, Path]
) -> None:
    out = _correct("flux", pipelines, caches, flux_run, math.inf, "cinf")
    trained, corrected = read_adapter(flux_run / "adapter"), read_adapter(out)
    src, emu = Checkpoint(pipelines["flux"].denoiser_dir), Checkpoint(flux_run / "emulator")
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for name, mod in trained.modules.items():
        a, b = trained.A(name).double(), trained.B(name).double()
        x = torch.randn(5, a.shape[0], generator=gen, dtype=torch.float64) @ a  # rows in span(Aᵀ)
        w = src.get(f"{name}.weight").double()
        w_e = emu.get(f"{name}.u.weight").double() @ emu.get(f"{name}.v.weight").double()
        ac, bc = corrected.A(name).double(), corrected.B(name).double()
        lhs = x @ (w + mod.scale * bc @ ac).T
        rhs = x @ (w_e + mod.scale * b @ a).T
        assert torch.allclose(lhs, rhs, rtol=1e-4, atol=1e-5 * float(rhs.abs().max())), name
        assert not torch.allclose(w, w_e)
        checked += 1
    assert checked == len(trained.modules) > 10
    with pytest.raises(RunStateError, match="already corrected"):
        correct_image_adapter(
            ImageCorrectionConfig(
                pipelines["flux"],
                caches["flux"],
                flux_run / "emulator",
                out,
                flux_run / "again",
                lambda_=1.0,
                device="cpu",
            )
        )


def test_auto_lambda_and_the_corrected_adapter_loads_on_the_original(
    flux_run: Path, pipelines: dict[str, PipelineInfo], caches: dict[str, Path]
) -> None:
    info = pipelines["flux"]
    cfg = ImageCorrectionConfig(
        info,
        caches["flux"],
        flux_run / "emulator",
        flux_run / "adapter",
        flux_run / "cauto",
        device="cpu",
        eval_timesteps=2,
    )
    res = correct_image_adapter(cfg)
    assert [lam for lam, _ in res.lambda_table] == [0.0, 1.0, 3.0, math.inf] and res.eval_split == "eval"
    assert res.lambda_ == min(res.lambda_table, key=lambda t: (t[1], t[0]))[0]
    model = PeftModel.from_pretrained(load_denoiser(info), str(res.adapter_dir)).eval()
    cache, sched = ImageCache(caches["flux"]), NoiseSchedule("flux", scheduler_config(info))
    batches = calibration_batches(cache, sched, cfg.eval_images, 2, cfg.eval_batch, cfg.seed, "eval")
    loss = batches_loss("flux", model.get_base_model(), sched, batches, torch.device("cpu"), torch.float32)
    assert loss == pytest.approx(dict(res.lambda_table)[res.lambda_], rel=1e-5)


def test_full_rank_emulator_needs_no_correction(
    pipelines: dict[str, PipelineInfo], caches: dict[str, Path], tmp_path: Path
) -> None:
    root = _run("sdxl", pipelines, caches, tmp_path, full_rank=True)
    out = _correct("sdxl", pipelines, caches, root, math.inf, "c")
    trained, corrected = read_adapter(root / "adapter"), read_adapter(out)
    for name, _mod in trained.modules.items():
        before = trained.B(name).double() @ trained.A(name).double()
        after = corrected.B(name).double() @ corrected.A(name).double()
        assert torch.allclose(before, after, atol=1e-5 * max(1.0, float(before.abs().max()))), name
