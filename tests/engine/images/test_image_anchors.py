"""Anchored image training (emloc_engine.images.anchors): with a zero adapter the anchored emulator IS the
original (resident or streamed), train_image_lora trains anchored and resumes exactly, a bad setting is
refused, and the planner counts the offsets and the original's pass."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from emloc_engine.core.errors import ConfigError
from emloc_engine.images.anchors import BLOCK, OnlineBlockAnchors
from emloc_engine.images.batches import batches_loss, calibration_batches
from emloc_engine.images.cache import ImageCache
from emloc_engine.images.emulator import ImageEmulatorConfig, build_image_emulator, load_image_emulator
from emloc_engine.images.families import NoiseSchedule, predict
from emloc_engine.images.options import ImageRunConfig
from emloc_engine.images.pipelines import PipelineInfo, load_denoiser, scheduler_config
from emloc_engine.images.placement import stream_units
from emloc_engine.images.plan_shapes import denoiser_shapes, meta_inputs
from emloc_engine.images.planning import GIB, ImagePlanConfig, plan_images
from emloc_engine.images.training import ImageTrainConfig, attach_image_lora, lora_targets, train_image_lora

CPU = torch.device("cpu")
SEQ = 16
STEP = "training step (activations, gradients)"


@pytest.fixture(scope="module")
def emulators(
    pipelines: dict[str, PipelineInfo], caches: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    return {
        kind: build_image_emulator(ImageEmulatorConfig(
            pipelines[kind], caches[kind], tmp_path_factory.mktemp(f"anchor_emu_{kind}") / "emulator", ratio=0.3,
            calibration_images=2, calibration_timesteps=2, device="cpu")).emulator_dir
        for kind in ("flux", "sd3", "sdxl")
    }


@pytest.mark.parametrize("kind", ["flux", "sd3", "sdxl"])
def test_the_anchored_emulator_with_a_zero_adapter_is_the_original(
    kind: str, pipelines: dict[str, PipelineInfo], caches: dict[str, Path], emulators: dict[str, Path]
) -> None:
    info = pipelines[kind]
    sched = NoiseSchedule(kind, scheduler_config(info))
    batches = calibration_batches(ImageCache(caches[kind]), sched, 3, 2, 8, seed=5)
    peft_model = attach_image_lora(
        load_image_emulator(emulators[kind]), lora_targets(emulators[kind]), 4, 4.0, str(info.folder)
    )
    model = peft_model.get_base_model().eval()
    original = load_denoiser(info).eval()
    want = batches_loss(kind, original, sched, batches, CPU, torch.float32)
    bare = batches_loss(kind, model, sched, batches, CPU, torch.float32)
    assert abs(bare - want) > 1e-3 * abs(want)  # the emulator alone is not the original
    for stream in (None, True):  # resident, and streamed block by block as on a GPU
        with OnlineBlockAnchors(original, peft_model, CPU, stream=stream) as anchors:
            got = batches_loss(kind, model, sched, batches, CPU, torch.float32)
            assert any(u._forward_pre_hooks for u in stream_units(original)) == bool(stream)  # streaming or not
            with anchors.paused():
                assert batches_loss(kind, model, sched, batches, CPU, torch.float32) == pytest.approx(bare, rel=1e-6)
        assert anchors.names and anchors.forwards == len(batches)
        assert got == pytest.approx(want, rel=1e-6), stream
        assert all(BLOCK.search(n) for n in anchors.names)
        assert batches_loss(kind, model, sched, batches, CPU, torch.float32) == pytest.approx(bare, rel=1e-6)  # closed
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in original.modules())  # streaming ended
        assert all(p.device == CPU for p in original.parameters())


def test_anchors_refuse_a_different_model(pipelines: dict[str, PipelineInfo], emulators: dict[str, Path]) -> None:
    peft_model = attach_image_lora(
        load_image_emulator(emulators["flux"]), lora_targets(emulators["flux"]), 4, 4.0, "x"
    )
    with pytest.raises(ConfigError, match="same transformer blocks") as err:
        OnlineBlockAnchors(load_denoiser(pipelines["sdxl"]), peft_model)
    assert "Build the emulator from this pipeline" in str(err.value.hint)
    assert not peft_model.get_base_model()._forward_pre_hooks


def test_checkpointed_anchored_steps_of_two_shapes_give_the_gradients_of_unchecked_ones(
    pipelines: dict[str, PipelineInfo], caches: dict[str, Path], emulators: dict[str, Path]
) -> None:
    """A step with prior preservation runs two forwards (two buckets, two shapes) before one backward; with
    gradient checkpointing (as on a GPU) the anchored blocks are recomputed in the backward while the anchors
    hold the second forward's offsets. The offsets are constants, so the LoRA gradients must not change."""
    from emloc_engine.images.training import _micro_loss

    kind, info = "sdxl", pipelines["sdxl"]
    peft_model = attach_image_lora(
        load_image_emulator(emulators[kind]), lora_targets(emulators[kind]), 4, 4.0, str(info.folder)
    )
    with torch.no_grad():  # a trained adapter, not a zero one: the anchored path then matters
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    model = peft_model.get_base_model().train()
    cache, sched = ImageCache(caches[kind]), NoiseSchedule(kind, scheduler_config(info))
    buckets = [b for b in cache.buckets("train").values() if b]
    assert len(buckets) == 2  # square and wide images: two shapes
    grads = []
    with OnlineBlockAnchors(load_denoiser(info), peft_model):
        for checkpointing in (False, True):
            model.enable_gradient_checkpointing() if checkpointing else model.disable_gradient_checkpointing()
            peft_model.zero_grad(set_to_none=True)
            gen = torch.Generator().manual_seed(0)
            loss = sum(_micro_loss(kind, model, sched, cache, b[:1], gen, CPU, torch.float32) for b in buckets)
            loss.backward()
            grads.append([p.grad.clone() for p in peft_model.parameters() if p.grad is not None])
    assert grads[0] and len(grads[0]) == len(grads[1])
    assert max(float(a.abs().max()) for a in grads[0]) > 0
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def _train_cfg(info: PipelineInfo, cache: Path, emulator: Path, run: Path, stop: int | None) -> ImageTrainConfig:
    return ImageTrainConfig(
        info, cache, emulator, run, steps=4, lr=3e-3, rank=4, checkpoint_every=2, sample_every=3, sample_steps=2,
        device="cpu", stop_after=stop, anchor="blocks",
    )


def test_anchored_training_trains_and_resumes_exactly(
    pipelines: dict[str, PipelineInfo], caches: dict[str, Path], emulators: dict[str, Path], tmp_path: Path
) -> None:
    info = pipelines["flux"]
    cfg = lambda run, stop: _train_cfg(info, caches["flux"], emulators["flux"], run, stop)  # noqa: E731
    whole = train_image_lora(cfg(tmp_path / "a", None))
    assert whole.steps_done == 4 and all(torch.isfinite(torch.tensor(whole.losses)))
    assert (tmp_path / "a" / "adapter" / "adapter_model.safetensors").is_file()
    assert [p.relative_to(tmp_path / "a").as_posix() for p in whole.samples] == [
        "samples/step-3/0.png", "samples/step-4/0.png"]
    part = train_image_lora(cfg(tmp_path / "b", 2))
    assert part.steps_done == 2 and not (tmp_path / "b" / "adapter").exists()
    rest = train_image_lora(cfg(tmp_path / "b", None))
    assert rest.resumed_from == 2 and rest.losses == pytest.approx(whole.losses, rel=1e-5)
    a, b = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (tmp_path / "a", tmp_path / "b"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # anchoring changes what is trained: the unanchored run's adapter differs
    plain = train_image_lora(replace(cfg(tmp_path / "c", None), anchor="none", sample_every=0))
    c = load_file(str(plain.adapter_dir / "adapter_model.safetensors"))
    assert plain.losses != pytest.approx(whole.losses, rel=1e-3)
    assert any(not torch.allclose(a[k], c[k], atol=1e-6) for k in a)


def test_an_invalid_anchor_is_refused_naming_it(
    pipelines: dict[str, PipelineInfo], caches: dict[str, Path], tmp_path: Path
) -> None:
    info = pipelines["flux"]
    with pytest.raises(ConfigError, match=r"anchor must be one of none, blocks \(got 'layers'\)"):
        ImageTrainConfig(info, caches["flux"], tmp_path, tmp_path, anchor="layers")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="'output'"):
        ImageRunConfig(tmp_path, tmp_path, tmp_path, anchor="output")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="'linears'"):
        ImagePlanConfig(tmp_path, GIB, anchor="linears")  # type: ignore[arg-type]


def test_emloc_image_takes_anchor(capsys: pytest.CaptureFixture[str]) -> None:
    from emloc_engine.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["image", "p", "i", "--out", "r"]).anchor == "none"
    assert parser.parse_args(["image", "p", "i", "--out", "r", "--anchor", "blocks"]).anchor == "blocks"
    with pytest.raises(SystemExit):
        parser.parse_args(["image", "p", "i", "--out", "r", "--anchor", "layers"])
    assert "invalid choice: 'layers'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["image", "--help"])
    assert "--anchor {none,blocks}" in capsys.readouterr().out


def _block_output_numel(info: PipelineInfo, resolution: int) -> int:
    """Elements output by the anchored blocks in a real batch-1 forward of the original at ``resolution``."""
    model = load_denoiser(info)
    x, cond, _ = meta_inputs(info, denoiser_shapes(info, model), resolution, torch.float32, SEQ)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(x.shape, generator=gen)
    cond = {k: torch.randn(v.shape, generator=gen) for k, v in cond.items()}
    total = [0]

    def count(_m: Any, _a: Any, out: Any) -> None:
        outs = out if isinstance(out, tuple) else (out,)
        total[0] += sum(o.numel() for o in outs if isinstance(o, torch.Tensor))

    handles = [m.register_forward_hook(count) for n, m in model.named_modules() if BLOCK.search(n)]
    with torch.no_grad():
        predict(info.kind, model, x, torch.full((1,), 500.0), cond)
    for h in handles:
        h.remove()
    assert handles and total[0] > 0
    return total[0]


@pytest.mark.parametrize("kind", ["flux", "sd3", "sdxl"])
@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_the_plan_counts_the_anchors(kind: str, device: str, pipelines: dict[str, PipelineInfo]) -> None:
    info = pipelines[kind]
    cfg = ImagePlanConfig(
        info.folder, 2 * GIB, resolution=64, rank=4, max_sequence_length=SEQ, batch_size=2, device=device,
        sample_every=0, ratio=0.5,
    )
    plain, anchored = plan_images(cfg), plan_images(replace(cfg, anchor="blocks"))
    parts = dict(anchored.stage("train").parts)
    elem = 2 if device == "cuda" else 4
    assert parts["anchor offsets"] == 2 * _block_output_numel(info, 64) * elem
    assert anchored.stage("train").peak_bytes >= plain.stage("train").peak_bytes + parts["anchor offsets"]
    assert "original outside the blocks (anchors)" in parts
    assert STEP in parts or "original's forward (anchors)" in parts  # the larger of the step and the anchor pass
    for name in ("cache", "emulator", "correct"):
        assert anchored.stage(name) == plain.stage(name)
