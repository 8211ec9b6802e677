"""LoRA training on the emulator: the loss goes down, resume is exact, samples and the adapter's peft layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from emloc_engine.images.batches import batches_loss, calibration_batches
from emloc_engine.images.cache import ImageCache
from emloc_engine.images.emulator import ImageEmulatorConfig, build_image_emulator, load_image_emulator
from emloc_engine.images.families import NoiseSchedule
from emloc_engine.images.pipelines import PipelineInfo, scheduler_config
from emloc_engine.images.training import ImageTrainConfig, attach_image_lora, lora_targets, train_image_lora
from emloc_engine.weights.adapters import read_adapter

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def emulators(
    pipelines: dict[str, PipelineInfo], caches: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    out = {}
    for kind in ("flux", "sdxl"):
        cfg = ImageEmulatorConfig(
            pipelines[kind],
            caches[kind],
            tmp_path_factory.mktemp(f"emu_{kind}") / "emulator",
            ratio=0.5,
            calibration_images=3,
            calibration_timesteps=2,
            device="cpu",
        )
        out[kind] = build_image_emulator(cfg).emulator_dir
    return out


def _fixed_loss(kind: str, info: PipelineInfo, cache_dir: Path, model: object) -> float:
    cache, sched = ImageCache(cache_dir), NoiseSchedule(kind, scheduler_config(info))
    return batches_loss(
        kind, model, sched, calibration_batches(cache, sched, 5, 4, 8, seed=11), CPU, torch.float32
    )


@pytest.mark.parametrize("kind", ["flux", "sdxl"])
def test_training_lowers_the_denoising_loss(
    kind: str,
    pipelines: dict[str, PipelineInfo],
    caches: dict[str, Path],
    emulators: dict[str, Path],
    tmp_path: Path,
) -> None:
    info = pipelines[kind]
    before = _fixed_loss(kind, info, caches[kind], load_image_emulator(emulators[kind]))
    res = train_image_lora(
        ImageTrainConfig(
            info,
            caches[kind],
            emulators[kind],
            tmp_path,
            steps=30,
            lr=3e-3,
            rank=8,
            batch_size=2,
            checkpoint_every=30,
            device="cpu",
        )
    )
    trained = attach_image_lora(
        load_image_emulator(emulators[kind]), lora_targets(emulators[kind]), 8, 16.0, "x"
    )
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(trained, load_file(str(res.adapter_dir / "adapter_model.safetensors")))
    after = _fixed_loss(kind, info, caches[kind], trained.get_base_model())
    assert after < 0.97 * before
    config = json.loads((res.adapter_dir / "adapter_config.json").read_text())
    keys = set(load_file(str(res.adapter_dir / "adapter_model.safetensors")))
    assert config["task_type"] is None and config["peft_type"] == "LORA"
    assert set(read_adapter(res.adapter_dir).modules) == set(
        lora_targets(emulators[kind])
    )  # peft may shorten target_modules
    first = (
        "transformer_blocks.0.attn.to_q"
        if kind == "flux"
        else "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    )
    assert (
        f"base_model.model.{first}.lora_A.weight" in keys
        and f"base_model.model.{first}.lora_B.weight" in keys
    )


def test_resume_is_exact_and_samples_are_written(
    pipelines: dict[str, PipelineInfo], caches: dict[str, Path], emulators: dict[str, Path], tmp_path: Path
) -> None:
    info = pipelines["sdxl"]

    def cfg(run: Path, stop: int | None) -> ImageTrainConfig:
        return ImageTrainConfig(
            info,
            caches["sdxl"],
            emulators["sdxl"],
            run,
            steps=6,
            lr=1e-3,
            rank=4,
            checkpoint_every=2,
            sample_every=3,
            sample_steps=2,
            device="cpu",
            stop_after=stop,
        )

    whole = train_image_lora(cfg(tmp_path / "a", None))
    part = train_image_lora(cfg(tmp_path / "b", 4))
    assert part.steps_done == 4 and not (tmp_path / "b" / "adapter").exists()
    rest = train_image_lora(cfg(tmp_path / "b", None))
    assert rest.resumed_from == 4 and rest.losses == pytest.approx(whole.losses, rel=1e-5)
    a, b = (
        load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (tmp_path / "a", tmp_path / "b")
    )
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert [p.relative_to(tmp_path / "a").as_posix() for p in whole.samples] == [
        "samples/step-3/0.png",
        "samples/step-6/0.png",
    ]
    from PIL import Image

    with Image.open(whole.samples[-1]) as img:
        assert img.size == (32, 32)


def test_non_finite_gradients_stop_the_step_before_the_update(
    pipelines: dict[str, PipelineInfo],
    caches: dict[str, Path],
    emulators: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """FLUX.1-dev on an H100 (2026-12-07) gave a finite loss at step 1 and nan at step 2: non-finite gradients that
    clipping spread and AdamW wrote into every LoRA weight. Here the loss of step 3 keeps its value but gets a nan
    gradient (d√u at u = 0); the run stops at that step, names the gradients, and the checkpoint of step 2 is
    untouched, its LoRA weights finite."""
    from emloc_engine.core.errors import ConfigError
    from emloc_engine.core.progress import RecordingProgress
    from emloc_engine.images import training

    real = training._micro_loss
    calls = {"n": 0}

    def poisoned(*args: object, **kwargs: object) -> torch.Tensor:
        loss = real(*args, **kwargs)  # type: ignore[arg-type]
        calls["n"] += 1
        return loss + torch.sqrt(loss - loss) if calls["n"] == 3 else loss

    monkeypatch.setattr(training, "_micro_loss", poisoned)
    progress = RecordingProgress()
    cfg = ImageTrainConfig(
        pipelines["flux"], caches["flux"], emulators["flux"], tmp_path, steps=5, lr=1e-3, rank=4,
        checkpoint_every=2, device="cpu",
    )
    with pytest.raises(ConfigError, match=r"gradients became nan at step 3 \(the loss was [0-9.]+\)"):
        train_image_lora(cfg, progress)
    norms = progress.values("train/grad_norm")
    assert len(norms) == 2 and all(n > 0 for n in norms)
    kept = torch.load(tmp_path / training.CHECKPOINTS / "step-2" / "state.pt", weights_only=True)
    assert kept["step"] == 2 and all(torch.isfinite(v).all() for v in kept["lora"].values())
    assert not (tmp_path / training.CHECKPOINTS / "step-3").exists() and not (tmp_path / "adapter").exists()


def test_training_runs_without_cudnn_attention_and_restores_the_setting(
    pipelines: dict[str, PipelineInfo], caches: dict[str, Path], emulators: dict[str, Path], tmp_path: Path
) -> None:
    """cuDNN's attention backward failed on FLUX.1-dev's shapes on an H100 (2026-12-07: an illegal memory access,
    or nan at step 2); training switches that kernel off for its steps, backward and checkpointed recompute
    included, and gives the process its setting back afterwards, also when a step fails."""
    from emloc_engine.core.errors import ConfigError
    from emloc_engine.core.progress import RecordingProgress

    class Seeing(RecordingProgress):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[bool] = []

        def update(self, fraction: float, message: str = "") -> None:
            self.seen.append(torch.backends.cuda.cudnn_sdp_enabled())
            super().update(fraction, message)

    assert torch.backends.cuda.cudnn_sdp_enabled()
    progress = Seeing()
    cfg = ImageTrainConfig(
        pipelines["flux"], caches["flux"], emulators["flux"], tmp_path / "a", steps=2, lr=1e-3, rank=4,
        device="cpu",
    )
    train_image_lora(cfg, progress)
    assert progress.seen == [False, False] and torch.backends.cuda.cudnn_sdp_enabled()
    bad = ImageTrainConfig(
        pipelines["flux"], caches["flux"], emulators["flux"], tmp_path / "b", steps=3, lr=1e30, rank=4,
        device="cpu",
    )
    with pytest.raises(ConfigError, match="became"):  # the first update makes the LoRA weights ~1e30
        train_image_lora(bad)
    assert torch.backends.cuda.cudnn_sdp_enabled()
