"""``emloc image PIPELINE IMAGES --trigger WORD --out RUN``: personalise an image model, resumable.

The options are :class:`~emloc_engine.images.run.ImageRunConfig`'s fields (generated from them:
name, type, default and help come from the one place the settings are defined).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any

HELP = "Personalise an image model (FLUX.1, SD3, SDXL) on your photos: cache, emulator, train, correct."
_POSITIONAL = ("pipeline_dir", "images_dir", "run_dir")


def _parser_of(type_text: str) -> tuple[Any, dict[str, Any]]:
    """argparse ``type`` (and extra kwargs) for a dataclass field's annotation text."""
    base = type_text.replace(" | None", "").strip()
    if base == "bool":
        return None, {"action": argparse.BooleanOptionalAction}
    if base.startswith("tuple["):
        return str, {"nargs": "*"}
    if base == "float":
        return (lambda s: math.inf if s in ("inf", "∞") else float(s)), {}
    if base == "int":
        return int, {}
    if base == "Path":
        return Path, {}
    return str, {}


def register(sub: Any) -> None:
    from emloc_engine.images.run import ImageRunConfig

    p: argparse.ArgumentParser = sub.add_parser("image", help=HELP, description=HELP)
    p.add_argument(
        "pipeline", help="Diffusers pipeline folder (FLUX.1, SD3, SDXL) or a single-file denoiser."
    )
    p.add_argument("images", help="Folder of the subject's images; captions as .txt beside them.")
    p.add_argument("--out", required=True, help="Run folder (created; rerunning resumes).")
    for f in dataclasses.fields(ImageRunConfig):
        if f.name in _POSITIONAL:
            continue
        conv, extra = _parser_of(str(f.type))
        kw: dict[str, Any] = {"default": f.default, "help": f.metadata["help"], **extra}
        if conv is not None:
            kw["type"] = conv
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from emloc_engine.core.progress import TqdmProgress
    from emloc_engine.images.run import ImageRunConfig, run_images

    values = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(ImageRunConfig) if f.name not in _POSITIONAL
    }
    values["sample_prompts"] = tuple(values["sample_prompts"] or ())
    cfg = ImageRunConfig(
        pipeline_dir=Path(args.pipeline), images_dir=Path(args.images), run_dir=Path(args.out), **values
    )
    bar = TqdmProgress("emloc image")
    try:
        result = run_images(cfg, bar)
    finally:
        bar.close()
    print(f"Run folder: {result.run_dir} ({result.kind})")
    if not result.finished:
        print(f"Stopped after step {result.steps_done}; run the same command again to continue.")
        return 0
    print(f"λ = {result.lam}; held-out denoising loss per λ: {list(result.lambda_table)}")
    print(f"  adapter (for the emulator): {result.adapter_dir}")
    print(f"  corrected adapter (for the original pipeline): {result.corrected_dir}")
    return 0
