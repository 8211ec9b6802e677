"""Which image pipeline a folder holds, and loading its parts without remote code.

``identify_pipeline(folder)`` reads ``model_index.json`` of a diffusers pipeline folder (a snapshot of
the Hugging Face cache, or any folder ``save_pretrained`` wrote) and returns a :class:`PipelineInfo`
whose ``kind`` is one of :data:`KINDS`:

========  ============================  ======================  ==================
kind      pipeline class                denoiser (sub-folder)   training loss
========  ============================  ======================  ==================
flux      FluxPipeline                  transformer             flow matching
sd3       StableDiffusion3Pipeline      transformer             flow matching
sdxl      StableDiffusionXLPipeline     unet                    noise prediction
========  ============================  ======================  ==================

Anything else (another pipeline class, a component whose library is not ``diffusers`` or
``transformers``, i.e. code shipped with the model) is refused with
:class:`~emloc_engine.core.errors.UnsupportedModel`; nothing is ever loaded with remote code.

Single-file checkpoints (``flux1-dev.safetensors`` as ComfyUI/Forge keep them). diffusers'
``from_single_file`` needs the matching diffusers configs, which it downloads when they are not
given; this engine is offline, so a single file is accepted only together with ``config_dir``, a
diffusers pipeline folder of the same family (it supplies the configs, the text encoders, the VAE
and the scheduler). :func:`convert_single_file` then writes the denoiser once in diffusers layout
into the run folder (``RUN/denoiser/``), and every later stage reads it from there. A single file
without ``config_dir`` is refused with a message that says so.

Which linears the emulator compresses and LoRA adapts (:data:`COMPRESSED`, regular expressions on the
denoiser's module names): for FLUX and SD3 every attention projection (image and text streams) and
feed-forward linear of the transformer blocks (FLUX's single blocks: ``to_q/k/v``, ``proj_mlp``,
``proj_out``); for SDXL the attention (``attn1``, ``attn2``) and feed-forward linears of the UNet's
transformer blocks. Dense: embedders, adaLN modulation linears (``norm*.linear``: their input is one
vector per image, nothing to calibrate on), convolutions, the final ``norm_out``/``proj_out``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from emloc_engine.core.errors import MissingTool, ModelNotFound, UnsupportedModel
from emloc_engine.images.pipeline_index import (  # model_index.json alone, torch-free
    KINDS,
    MODEL_INDEX,
    PIPELINE_CLASSES,
    Kind,
    check_denoiser_dir,
    is_pipeline_folder,
    read_pipeline_index,
)

_ATTN = r"(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
COMPRESSED: dict[Kind, re.Pattern[str]] = {
    "flux": re.compile(
        rf"^(transformer_blocks\.\d+\.(attn\.{_ATTN}|ff(_context)?\.net\.(0\.proj|2))"
        rf"|single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out))$"
    ),
    "sd3": re.compile(rf"^transformer_blocks\.\d+\.(attn2?\.{_ATTN}|ff(_context)?\.net\.(0\.proj|2))$"),
    "sdxl": re.compile(
        r"\.transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))$"
    ),
}
BLOCK_PATTERN = re.compile(r"^(.*transformer_blocks\.\d+)\.")
"""The block a module belongs to (statistics of modules that share an input are shared within it)."""


@dataclass(frozen=True)
class PipelineInfo:
    """A recognised pipeline folder.

    Attributes:
        folder: the pipeline folder (text encoders, VAE, scheduler, and the denoiser unless ``denoiser_dir``).
        kind: ``"flux"``, ``"sd3"`` or ``"sdxl"``.
        pipeline_class: the diffusers class name from ``model_index.json``.
        denoiser: the denoiser's component name, ``"transformer"`` or ``"unet"``.
        components: component name -> (library, class) for every non-empty component.
        denoiser_dir: where the denoiser's config and weights are (default ``folder/denoiser``).
    """

    folder: Path
    kind: Kind
    pipeline_class: str
    denoiser: str
    components: dict[str, tuple[str, str]]
    denoiser_dir: Path

    @property
    def flow_matching(self) -> bool:
        return self.kind in ("flux", "sd3")


def require_diffusers() -> None:
    """Raise :class:`MissingTool` when the optional ``diffusers`` package (the ``images`` extra) is missing."""
    import importlib.util

    if importlib.util.find_spec("diffusers") is None:
        raise MissingTool(
            "Image models need the diffusers package, which is not installed.",
            hint="pip install 'emloc-studio[images]' (make run / make test install it).",
        )


def identify_pipeline(folder: Path) -> PipelineInfo:
    """Read ``folder/model_index.json`` and say which supported pipeline it is.

    Raises:
        ModelNotFound: no such folder, no ``model_index.json``, or the denoiser's weights are missing.
        UnsupportedModel: another pipeline class, or a component that needs code from the model.
    """
    require_diffusers()
    folder = Path(folder)
    if folder.is_file() and folder.suffix in (".safetensors", ".ckpt", ".gguf"):
        raise UnsupportedModel(
            f"{folder.name} is a single-file checkpoint; reading it needs the matching diffusers configs, "
            "which diffusers would download (this program works offline).",
            hint="Give a diffusers pipeline folder of the same family as config_dir (--config-dir); its "
            "configs, text encoders and VAE are used with this file's weights.",
        )
    index = read_pipeline_index(folder)
    info = PipelineInfo(
        folder, index.kind, index.pipeline_class, index.denoiser, index.components, folder / index.denoiser
    )
    check_denoiser_dir(info.denoiser_dir)
    return info


@dataclass(frozen=True)
class FoundPipeline:
    """A diffusers pipeline snapshot in a Hugging Face cache: usable (``info``) or why not (``problem``)."""

    repo_id: str
    folder: Path
    info: PipelineInfo | None
    problem: str = ""

    @property
    def kind(self) -> str:
        return self.info.kind if self.info is not None else "unsupported"


def find_pipelines(hub_dirs: list[Path] | None = None) -> list[FoundPipeline]:
    """Every pipeline snapshot (``refs/main``, else the newest) of the Hugging Face caches, by repo id.

    ``hub_dirs`` default to the caches the text catalog reads (``HF_HUB_CACHE`` / ``HF_HOME``...).
    """
    from emloc_engine.catalog.locations import hf_cache_roots

    found = []
    roots = hub_dirs if hub_dirs is not None else hf_cache_roots()
    hubs = list(dict.fromkeys(p.resolve() for r in roots for p in (Path(r), Path(r) / "hub") if p.is_dir()))
    for hub in hubs:
        for repo in sorted(hub.glob("models--*")):
            snaps = [p for p in (repo / "snapshots").glob("*") if (p / MODEL_INDEX).is_file()]
            if not snaps:
                continue
            ref = repo / "refs" / "main"
            main = repo / "snapshots" / ref.read_text().strip() if ref.is_file() else None
            snap = main if main in snaps else max(snaps, key=lambda p: p.stat().st_mtime)
            repo_id = repo.name.removeprefix("models--").replace("--", "/", 1)
            try:
                found.append(FoundPipeline(repo_id, snap, identify_pipeline(snap)))
            except (ModelNotFound, UnsupportedModel) as exc:
                found.append(FoundPipeline(repo_id, snap, None, exc.summary))
    return found


def with_denoiser_dir(info: PipelineInfo, denoiser_dir: Path) -> PipelineInfo:
    """The same pipeline with its denoiser read from ``denoiser_dir`` (a converted single file)."""
    check_denoiser_dir(Path(denoiser_dir))
    return PipelineInfo(
        info.folder, info.kind, info.pipeline_class, info.denoiser, info.components, Path(denoiser_dir)
    )


def denoiser_class(info: PipelineInfo) -> Any:
    """The diffusers model class of the denoiser (``FluxTransformer2DModel``...)."""
    import diffusers

    return getattr(diffusers, info.components[info.denoiser][1])


def load_denoiser(
    info: PipelineInfo, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Any:
    """The ORIGINAL denoiser (eval mode, no gradients), from ``info.denoiser_dir``."""
    model = denoiser_class(info).from_pretrained(info.denoiser_dir, dtype=dtype, local_files_only=True)
    model.requires_grad_(False)
    return model.to(device).eval()


def load_pipeline(
    info: PipelineInfo,
    *,
    without: tuple[str, ...] = (),
    dtype: torch.dtype = torch.float32,
    **components: Any,
) -> Any:
    """The pipeline (its own class, no remote code), leaving out the ``without`` components.

    ``components`` replace loaded ones (e.g. ``transformer=emulator``).
    """
    import diffusers

    cls = getattr(diffusers, info.pipeline_class)
    skip: dict[str, Any] = {name: None for name in without if name not in components}
    if (
        info.denoiser_dir != info.folder / info.denoiser
        and info.denoiser not in components
        and info.denoiser not in skip
    ):
        components[info.denoiser] = load_denoiser(info, dtype=dtype)
    return cls.from_pretrained(info.folder, dtype=dtype, local_files_only=True, **skip, **components)


def scheduler_config(info: PipelineInfo) -> dict[str, Any]:
    """The pipeline's ``scheduler/scheduler_config.json``."""
    path = info.folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise ModelNotFound(f"The pipeline {info.folder} has no scheduler/scheduler_config.json.")
    config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return config


def compressible_modules(kind: Kind, denoiser: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The denoiser's linears the emulator compresses (and LoRA adapts), by full module name."""
    pattern = COMPRESSED[kind]
    return {n: m for n, m in denoiser.named_modules() if isinstance(m, torch.nn.Linear) and pattern.search(n)}


def convert_single_file(file: Path, config_dir: Path, out_dir: Path) -> PipelineInfo:
    """Read a single-file denoiser with the configs of ``config_dir``; save it in diffusers layout to ``out_dir``.

    Returns the :class:`PipelineInfo` of ``config_dir`` with its denoiser read from ``out_dir``.
    A finished ``out_dir`` (``config.json`` and weights) is reused.

    Raises:
        UnsupportedModel: diffusers cannot read the file with these configs.
    """
    from emloc_engine.core.atomic import atomic_dir

    info = identify_pipeline(config_dir)
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file() and any(out_dir.glob("*.safetensors")):
        return with_denoiser_dir(info, out_dir)
    cls = denoiser_class(info)
    from emloc_engine.weights.headers import read_safetensors_header

    stored = {"F32": torch.float32, "F16": torch.float16}
    counts: dict[str, int] = {}
    if Path(file).suffix == ".safetensors":
        for entry in read_safetensors_header(Path(file)).tensors.values():
            counts[entry["dtype"]] = counts.get(entry["dtype"], 0) + 1
    dtype = stored.get(
        max(counts, key=lambda k: counts[k]) if counts else "", torch.bfloat16
    )  # keep the file's dtype
    try:
        model = cls.from_single_file(
            str(file),
            config=str(info.folder),
            subfolder=info.denoiser,
            local_files_only=True,
            dtype=dtype,
        )
    except Exception as exc:  # diffusers raises many types for files it cannot map
        raise UnsupportedModel(
            f"diffusers could not read {Path(file).name} as a {info.kind} {info.denoiser}: {exc}",
            hint="Check that the file is the denoiser of the same family as the config folder.",
        ) from exc
    with atomic_dir(out_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    return with_denoiser_dir(info, out_dir)


__all__ = [
    "COMPRESSED",
    "KINDS",
    "PIPELINE_CLASSES",
    "FoundPipeline",
    "Kind",
    "PipelineInfo",
    "compressible_modules",
    "convert_single_file",
    "denoiser_class",
    "find_pipelines",
    "identify_pipeline",
    "is_pipeline_folder",
    "load_denoiser",
    "load_pipeline",
    "require_diffusers",
    "scheduler_config",
    "with_denoiser_dir",
]
