"""``emloc image-export RUN``: the image run's LoRA as files image tools load, each checked by loading it back.

The options are :class:`~emloc_engine.images.export.ImageExportConfig`'s fields. Writes
``RUN/export/diffusers/pytorch_lora_weights.safetensors``, ``RUN/export/kohya/<name>.safetensors`` and,
with ``--format merged``, ``RUN/export/merged/`` (a whole pipeline folder).

The adapter defaults to ``RUN/adapter-corrected`` (else ``RUN/adapter``); the pipeline to the one the
run recorded in ``RUN/image_run.json`` (its ``pipeline_dir``; for a single-file checkpoint its
``config_dir`` with the denoiser ``RUN/denoiser`` that the run converted), else ``--model``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from emloc_engine.core.errors import ConfigError

HELP = "Export an image run's LoRA (diffusers, kohya naming, merged pipeline), each loaded back and checked."
MANIFEST = "image_run.json"


def register(sub: Any) -> None:
    from emloc_engine.images.export import IMAGE_EXPORT_FORMATS, ImageExportConfig

    fields: dict[str, Any] = ImageExportConfig.__dataclass_fields__  # help texts and defaults are the config's own
    helps = {f: fields[f].metadata["help"] for f in ("formats", "name", "verify", "device")}
    p: argparse.ArgumentParser = sub.add_parser("image-export", help=HELP, description=HELP)
    p.add_argument("run_dir", metavar="RUN", help="The image run folder.")
    p.add_argument("--model", help="The original pipeline folder (default: the one the run recorded).")
    p.add_argument(
        "--adapter", help="peft adapter folder (default: RUN/adapter-corrected, else RUN/adapter)."
    )
    p.add_argument("--out", help="Output folder (default: RUN/export).")
    p.add_argument(
        "--format",
        default=",".join(fields["formats"].default),
        help=f"{helps['formats']} Comma-separated, from {', '.join(IMAGE_EXPORT_FORMATS)}.",
    )
    p.add_argument("--name", default=fields["name"].default, help=helps["name"])
    p.add_argument("--device", default=fields["device"].default, help=helps["device"])
    p.add_argument(
        "--no-verify", action="store_true", help="Do not load the outputs back. " + helps["verify"]
    )
    p.set_defaults(func=run)


def _recorded_pipeline(run_dir: Path) -> tuple[Path, Path | None]:
    """``(pipeline folder, denoiser folder or None)`` the run recorded; a single-file run's denoiser is
    ``RUN/denoiser`` (converted once by the run) with the configs of its ``config_dir``."""
    manifest = run_dir / MANIFEST
    if manifest.is_file():
        recorded = json.loads(manifest.read_text(encoding="utf-8"))
        pipeline, config_dir = recorded.get("pipeline_dir"), recorded.get("config_dir")
        if pipeline and Path(pipeline).is_file() and config_dir not in (None, "None"):
            return Path(config_dir), run_dir / "denoiser"
        if pipeline:
            return Path(pipeline), None
    raise ConfigError(f"{run_dir} records no original pipeline.", hint="Pass it with --model PIPELINE_DIR.")


def _adapter(run_dir: Path) -> Path:
    for name in ("adapter-corrected", "adapter"):
        if (run_dir / name / "adapter_config.json").is_file():
            return run_dir / name
    raise ConfigError(
        f"{run_dir} holds no adapter (adapter-corrected/ or adapter/).",
        hint="Train the run first, or pass --adapter ADAPTER_DIR.",
    )


def config_from_args(args: argparse.Namespace) -> Any:
    from emloc_engine.images.export import ImageExportConfig

    run_dir = Path(args.run_dir)
    pipeline, denoiser = (Path(args.model), None) if args.model else _recorded_pipeline(run_dir)
    return ImageExportConfig(
        pipeline_dir=pipeline,
        denoiser_dir=denoiser,
        adapter_dir=Path(args.adapter) if args.adapter else _adapter(run_dir),
        out_dir=Path(args.out) if args.out else run_dir / "export",
        formats=tuple(f.strip() for f in args.format.split(",") if f.strip()),
        name=args.name or run_dir.resolve().name,
        verify=not args.no_verify,
        device=args.device,
    )


def run(args: argparse.Namespace) -> int:
    from emloc_engine.core.progress import TqdmProgress
    from emloc_engine.images.export import export_image_lora

    cfg = config_from_args(args)
    bar = TqdmProgress("image export")
    try:
        result = export_image_lora(cfg, bar)
    finally:
        bar.close()
    print(f"{result.family} LoRA from {cfg.adapter_dir}")
    for label, path in (
        ("diffusers", result.diffusers_file),
        ("kohya", result.kohya_file),
        ("merged", result.merged_dir),
    ):
        if path is not None:
            print(f"  {label}: {path}")
    for c in result.checks:
        print(f"  checked {c.what}: max |diff| {c.max_abs_diff:.2e} (adapter effect {c.adapter_effect:.2e})")
    return 0
