"""A CPU stand-in for the FLUX.1-dev GPU bench's training stages (issue 23): FLUX.1-dev's depth (19 double + 38 single
blocks) at a width a CPU can train, run the way the GPU runs it, to tell a numerical problem of the shapes from one of
the device.

What it keeps from the GPU run (``bench_images.py --model flux-dev``): the depth, the weights drawn as the bench draws
them (N(0, 0.02) for every matrix, ones for the other 1-D weights, zero biases) with the standard deviation scaled by
√(FLUX.1-dev's fan-in / this fan-in) so every layer has FLUX.1-dev's gain; bf16 everywhere (``compute_dtype`` "auto"
gives bf16 here, as on a GPU); the emulator at ρ 0.65 calibrated in batches of 4; training with gradient checkpointing
(the engine turns it on only on a GPU); anchored training with the original *streamed* (the engine streams only on a
GPU; here every block transfer is a copy, as a device transfer is). What it changes: width (``--width``, default 384),
the tiny VAE and text encoders of ``tests/tiny_pipelines.py``, 64 × 64 images (256 image tokens).

    python benchmarks/flux_depth_standin.py --work /tmp/standin

prints (and with ``--out`` writes) the unanchored and anchored training losses and ``bench_images.nan_probe``'s
block magnitudes of the emulator and of the original.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_images
from benchmarks.image_shapes import FLUX_DEV
from emloc_engine.images import anchors, placement, training
from emloc_engine.machine import devices

REAL_FAN_IN = {"x_embedder.weight": 64, "context_embedder.weight": 4096}  # FLUX.1-dev's, where this model's differ


def build(work: Path, width: int, double: int, single: int) -> Path:
    """The tiny FLUX pipeline with its transformer replaced by FLUX.1-dev's depth at ``width`` (reused when there)."""
    import diffusers
    from accelerate import init_empty_weights

    from tests.tiny_pipelines import build_tiny_pipeline

    folder = work / f"flux-depth-w{width}-{double}-{single}"
    if (folder / "model_index.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(build_tiny_pipeline("flux", work / "hub"), tmp)
    shutil.rmtree(tmp / "transformer")
    small = dict(in_channels=16, joint_attention_dim=32, pooled_projection_dim=32, num_layers=double,
                 num_single_layers=single)
    with init_empty_weights():
        full = diffusers.FluxTransformer2DModel(**{**FLUX_DEV, **small})
    fan_in = {n: p.shape[1] for n, p in full.named_parameters() if p.dim() >= 2}
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(**{**FLUX_DEV, **small, "num_attention_heads": width // 128})
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02 * math.sqrt(REAL_FAN_IN.get(n, fan_in[n]) / p.shape[1]))
            elif n.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
    model.to(torch.bfloat16).save_pretrained(tmp / "transformer")
    tmp.rename(folder)
    return folder


@contextlib.contextmanager
def as_on_a_gpu() -> Iterator[None]:
    """Within the block: bf16 compute, gradient checkpointing in training, the original streamed by copies (module
    docstring). Everything it replaces is put back on the way out (the test suite calls :func:`main`)."""
    saved = [
        (devices, "compute_dtype", devices.compute_dtype),
        (training, "load_image_emulator", training.load_image_emulator),
        (placement, "_transfer", placement._transfer),
        (anchors.OnlineBlockAnchors, "__init__", anchors.OnlineBlockAnchors.__init__),
    ]
    compute_dtype, load, init = saved[0][2], saved[1][2], saved[3][2]

    def bf16(device: Any, name: str = "auto") -> torch.dtype:
        return torch.bfloat16 if name == "auto" else compute_dtype(device, name)

    def load_checkpointed(*a: Any, **k: Any) -> Any:
        model = load(*a, **k)
        model.enable_gradient_checkpointing()
        return model

    def streaming(self: Any, original: Any, peft_model: Any, device: Any = "cpu", *, stream: Any = None) -> None:
        init(self, original, peft_model, device, stream=True)

    devices.compute_dtype = bf16
    training.load_image_emulator = load_checkpointed
    placement._transfer = lambda t, device: t.clone()
    anchors.OnlineBlockAnchors.__init__ = streaming  # type: ignore[method-assign]
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--width", type=int, default=384, help="a multiple of 128 (FLUX.1-dev: 3072)")
    ap.add_argument("--double", type=int, default=FLUX_DEV["num_layers"])
    ap.add_argument("--single", type=int, default=FLUX_DEV["num_single_layers"])
    ap.add_argument("--ratio", type=float, default=0.65)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.width < 128 or args.width % 128:
        ap.error(f"--width must be a positive multiple of 128, FLUX's head width (got {args.width}); e.g. 384")
    with as_on_a_gpu():
        return _run(args)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    from emloc_engine.images.cache import CacheConfig, build_cache
    from emloc_engine.images.dataset import ImageFolderConfig, scan_image_folder
    from emloc_engine.images.emulator import ImageEmulatorConfig, build_image_emulator
    from emloc_engine.images.pipelines import identify_pipeline
    from tests.tiny_pipelines import write_subject_images

    work: Path = args.work
    info = identify_pipeline(build(work, args.width, args.double, args.single))
    images = write_subject_images(work / "images", 4, size=(64, 64))
    items = scan_image_folder(ImageFolderConfig(images[0].parent, trigger="sks", min_side_px=16)).items
    run = work / f"run-{info.folder.name}-{args.ratio}"
    cache_dir, emulator_dir = run / "cache", run / "emulator"
    build_cache(CacheConfig(info, cache_dir, items, sample_prompts=(), resolution=64, max_sequence_length=32,
                            device="cpu"))
    build_image_emulator(ImageEmulatorConfig(info, cache_dir, emulator_dir, ratio=args.ratio, calibration_images=4,
                                             calibration_timesteps=4, calibration_batch=4, device="cpu"))
    out: dict[str, Any] = {"width": args.width, "double": args.double, "single": args.single, "ratio": args.ratio}
    for anchor in ("none", "blocks"):
        folder = run / f"train-{anchor}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        result = training.train_image_lora(training.ImageTrainConfig(
            info, cache_dir, emulator_dir, folder, steps=args.steps, rank=16, alpha=16.0,
            checkpoint_every=args.steps, sample_every=0, device="cpu", anchor=anchor))
        out[f"losses_{anchor}"] = list(result.losses)
    probe = bench_images.nan_probe(info, cache_dir, emulator_dir, torch.device("cpu"), torch.bfloat16)
    out["probe"] = {k: v for k, v in probe.items() if k != "blocks"}
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return out


if __name__ == "__main__":
    main()
