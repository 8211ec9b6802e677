"""Image quality benchmark (issue 23, CPU): EMLoC's fraction of the full-LoRA gain on a new synthetic subject.

No pretrained image model installs offline, so the "pretrained" model is a tiny random pipeline
(:mod:`tests.tiny_pipelines`) whose denoiser is first fully trained on synthetic images of many
shapes and colours with their captions, then personalised to a NEW subject (a shape/colour pair
never seen in pretraining, with the trigger word ``sks``):

* ``base``: the pretrained denoiser's held-out denoising loss on unseen images of the new subject
  (fixed images, noise levels and noise seeds: :func:`emloc_engine.images.batches.batches_loss`);
* ``full_lora``: LoRA trained on the original denoiser (a full-rank emulator is the original);
* ``emloc``: LoRA trained on the emulator at ``--ratio``, corrected (λ chosen on held-out images of
  the subject that are NOT the test images), applied to the original; ``emloc_uncorrected`` is λ = 0.

``fraction = (base − emloc) / (base − full_lora)``, as for text. Prints one JSON object.

    python benchmarks/bench_images_quality.py --model flux --work /tmp/img-quality
    python benchmarks/bench_images_quality.py --model sdxl --work /tmp/img-quality --ratio 0.4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.image_anchors import OnlineBlockAnchors
from emloc_engine.images.batches import batches_loss, calibration_batches
from emloc_engine.images.cache import CacheConfig, ImageCache, build_cache
from emloc_engine.images.correction import ImageCorrectionConfig, correct_image_adapter
from emloc_engine.images.dataset import ImageFolderConfig, scan_image_folder
from emloc_engine.images.emulator import ImageEmulatorConfig, build_image_emulator
from emloc_engine.images.families import NoiseSchedule, denoising_loss
from emloc_engine.images.pipelines import PipelineInfo, identify_pipeline, load_denoiser, scheduler_config
from emloc_engine.images.training import ImageTrainConfig, train_image_lora
from tests.tiny_pipelines import build_tiny_pipeline, write_subject_images

CPU = torch.device("cpu")
SEQ = 16


def _items(folder: Path) -> Any:
    return scan_image_folder(ImageFolderConfig(folder, trigger="", min_side_px=8)).items


def pretrain(info: PipelineInfo, work: Path, steps: int, lr: float) -> PipelineInfo:
    """Fully train the denoiser on many shapes/colours (not the new subject's pair); save a new pipeline folder."""
    folder = work / "pretrained"
    if not (folder / "model_index.json").is_file():
        data = work / "pretrain-images"
        for c in range(6):
            for shape in ("circle", "square", "triangle"):
                if (shape, c) == ("triangle", 4):
                    continue  # the new subject
                write_subject_images(data, 3, trigger="a", shape=shape, colour=c, seed=10 * c + len(shape))
                for p in sorted(data.glob("img_*")):
                    p.rename(data / f"{shape}{c}_{p.name}")
        cache = build_cache(
            CacheConfig(
                info,
                work / "pretrain-cache",
                _items(data),
                resolution=32,
                max_sequence_length=SEQ,
                device="cpu",
            )
        ).cache_dir
        model = load_denoiser(info).train()
        model.requires_grad_(True)
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        c, sched = ImageCache(cache), NoiseSchedule(info.kind, scheduler_config(info))
        gen = torch.Generator().manual_seed(0)
        buckets = list(c.buckets("train").values())
        for step in range(steps):
            idx = [buckets[0][int(i)] for i in torch.randint(0, len(buckets[0]), (8,), generator=gen)]
            x0 = c.latents(idx, generator=gen)
            loss = denoising_loss(
                info.kind,
                model,
                sched,
                x0,
                torch.randn(x0.shape, generator=gen),
                sched.sample_indices(len(idx), gen),
                c.cond(idx),
            )
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step % 100 == 0:
                print(f"pretrain step {step}: {float(loss):.4f}", flush=True)
        shutil.copytree(info.folder, folder, ignore=shutil.ignore_patterns(info.denoiser))
        model.eval().save_pretrained(folder / info.denoiser, safe_serialization=True)
    return identify_pipeline(folder)


def _train(cfg: ImageTrainConfig) -> None:
    train_image_lora(cfg)


@contextlib.contextmanager
def _anchored_training(info: PipelineInfo) -> Iterator[None]:
    """While inside, the engine's image training attaches :class:`OnlineBlockAnchors` (the original denoiser
    resident) to the LoRA it trains."""
    from emloc_engine.images import training

    real = training.attach_image_lora

    def attach(model: Any, *a: Any, **kw: Any) -> Any:
        peft_model = real(model, *a, **kw)
        OnlineBlockAnchors(load_denoiser(info), peft_model)
        return peft_model

    training.attach_image_lora = attach  # type: ignore[assignment]
    try:
        yield
    finally:
        training.attach_image_lora = real  # type: ignore[assignment]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("flux", "sd3", "sdxl"), default="flux")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--anchor", action="store_true",
                    help="EMLoC's training anchored at every transformer block to the original, online "
                         "(benchmarks/image_anchors.py)")
    ap.add_argument("--seed", type=int, default=0, help="training seed of both LoRAs")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work: Path = args.work
    t0 = time.monotonic()
    info = pretrain(
        identify_pipeline(build_tiny_pipeline(args.model, work / "hub", weight_std=0.1)),
        work,
        args.pretrain_steps,
        1e-3,
    )
    subject = {"trigger": "sks", "shape": "triangle", "colour": 4}
    train = _items(Path(write_subject_images(work / "subject-train", 8, seed=100, **subject)[0]).parent)
    held = _items(Path(write_subject_images(work / "subject-held", 4, seed=200, **subject)[0]).parent)
    test = _items(Path(write_subject_images(work / "subject-test", 6, seed=300, **subject)[0]).parent)
    cache = build_cache(
        CacheConfig(
            info,
            work / "cache",
            train,
            held,
            sample_prompts=(),
            resolution=32,
            max_sequence_length=SEQ,
            device="cpu",
        )
    ).cache_dir
    test_cache = build_cache(
        CacheConfig(info, work / "test-cache", test, resolution=32, max_sequence_length=SEQ, device="cpu")
    ).cache_dir
    sched = NoiseSchedule(info.kind, scheduler_config(info))
    batches = calibration_batches(ImageCache(test_cache), sched, 6, 8, 8, seed=999)

    def loss_with(adapter: Path | None) -> float:
        from peft import PeftModel

        model = load_denoiser(info)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, str(adapter)).get_base_model()
        return batches_loss(info.kind, model, sched, batches, CPU, torch.float32)

    results: dict[str, Any] = {
        "model": args.model,
        "anchor": "blocks, online" if args.anchor else "none",
        "seed": args.seed,
        "ratio": args.ratio,
        "steps": args.steps,
        "rank": args.rank,
    }
    results["base"] = loss_with(None)
    for name, ratio, full in (("full_lora", 1.0, True), ("emloc", args.ratio, False)):
        run = work / f"run-{name}"
        shutil.rmtree(run, ignore_errors=True)  # a rerun with other settings must not resume old checkpoints
        build_image_emulator(
            ImageEmulatorConfig(
                info, cache, run / "emulator", ratio=ratio, full_rank=full, calibration_images=8, device="cpu"
            )
        )
        anchored = args.anchor and not full
        with _anchored_training(info) if anchored else contextlib.nullcontext():
            _train(ImageTrainConfig(
                info,
                cache,
                run / "emulator",
                run,
                steps=args.steps,
                lr=args.lr,
                rank=args.rank,
                alpha=float(args.rank),
                batch_size=4,
                device="cpu",
                checkpoint_every=args.steps,
                seed=args.seed,
            ))
        if full:
            results[name] = loss_with(run / "adapter")
            continue
        res = correct_image_adapter(
            ImageCorrectionConfig(
                info, cache, run / "emulator", run / "adapter", run / "adapter-corrected", device="cpu"
            )
        )
        results["emloc"] = loss_with(res.adapter_dir)
        results["emloc_uncorrected"] = loss_with(run / "adapter")
        results["lambda"] = res.lambda_ if math.isfinite(res.lambda_) else "inf"
        results["lambda_table"] = [[lam if math.isfinite(lam) else "inf", v] for lam, v in res.lambda_table]
    gain = results["base"] - results["full_lora"]
    results["fraction_of_full_lora_gain"] = (results["base"] - results["emloc"]) / gain if gain > 0 else None
    results["fraction_uncorrected"] = (
        (results["base"] - results["emloc_uncorrected"]) / gain if gain > 0 else None
    )
    results["wall_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
