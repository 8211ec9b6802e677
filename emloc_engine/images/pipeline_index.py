"""Which diffusers pipeline a folder holds, from its ``model_index.json`` alone (no torch, no diffusers).

The model catalog (:mod:`emloc_engine.catalog.discovery`) lists image pipelines beside language
models and runs at the app's start-up, so it may import neither torch nor diffusers; it reads the
same facts :func:`emloc_engine.images.pipelines.identify_pipeline` uses, from here.

* :func:`read_pipeline_index` reads ``model_index.json`` and says which supported family it is
  (:data:`PIPELINE_CLASSES`), or raises a typed error naming the file and the fix: no file, a file
  that is not valid JSON (an interrupted download or a hand edit), another pipeline class, or a
  component that would need code shipped with the model.
* :func:`check_denoiser_dir` checks that the denoiser sub-folder has a config and safetensors weights.
* :func:`single_file_family` says which family a single-file checkpoint is, from its header.
* :func:`check_config_dir` checks that a pipeline folder can supply a single file's configs, text
  encoders and VAE (same family, readable), before anything loads.
* :func:`pipeline_problems` lists everything wrong with a pipeline folder in one line each (the
  catalog's "why is it greyed out"), never raising.

Decisions: a pipeline is listed with the parameter count and dtype of its denoiser (the part EMLoC
compresses and trains: FLUX.1's 12 B transformer, SDXL's 2.6 B UNet), read from the safetensors
headers; the text encoders and VAE are only used to encode the photos once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from emloc_engine.core.errors import ConfigError, EngineError, ModelNotFound, UnsupportedModel

Kind = Literal["flux", "sd3", "sdxl"]
KINDS: tuple[Kind, ...] = ("flux", "sd3", "sdxl")
MODEL_INDEX = "model_index.json"
PIPELINE_CLASSES: dict[str, Kind] = {
    "FluxPipeline": "flux",
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusionXLPipeline": "sdxl",
}
DENOISER: dict[Kind, str] = {"flux": "transformer", "sd3": "transformer", "sdxl": "unet"}
FAMILY_NAMES: dict[str, str] = {"flux": "FLUX.1", "sd3": "Stable Diffusion 3", "sdxl": "SDXL"}
"""The families as users name them (the catalog's architecture column)."""
_LIBRARIES = ("diffusers", "transformers", None)
_REFETCH = (
    "Download the pipeline again (an interrupted download leaves such files), or restore the file "
    "from the model's page."
)


@dataclass(frozen=True)
class PipelineIndex:
    """What ``model_index.json`` says about a supported pipeline folder.

    Attributes:
        folder: the pipeline folder.
        kind: ``"flux"``, ``"sd3"`` or ``"sdxl"``.
        pipeline_class: the diffusers class name.
        denoiser: the denoiser's component (sub-folder) name, ``"transformer"`` or ``"unet"``.
        components: component name -> (library, class) for every non-empty component.
    """

    folder: Path
    kind: Kind
    pipeline_class: str
    denoiser: str
    components: dict[str, tuple[str, str]]


def is_pipeline_folder(folder: Path) -> bool:
    """Whether ``folder`` has a ``model_index.json`` (a diffusers pipeline, supported or not)."""
    return (Path(folder) / MODEL_INDEX).is_file()


def _load_index(folder: Path) -> dict[str, Any]:
    path = folder / MODEL_INDEX
    if not path.is_file():
        raise ModelNotFound(
            f"{folder} is not a diffusers pipeline folder (no {MODEL_INDEX}).",
            hint="Choose the snapshot folder of a FLUX.1, Stable Diffusion 3 or SDXL pipeline.",
        )
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelNotFound(f"{path} is not valid JSON ({exc}).", hint=_REFETCH) from exc
    if not isinstance(index, dict):
        raise ModelNotFound(f"{path} is not a JSON object.", hint=_REFETCH)
    return index


def read_pipeline_index(folder: Path) -> PipelineIndex:
    """Read ``folder/model_index.json`` and say which supported pipeline it is.

    Args:
        folder: a diffusers pipeline folder (a Hugging Face cache snapshot, or ``save_pretrained``'s output).

    Returns:
        The family, classes and components (the denoiser's files are not checked: :func:`check_denoiser_dir`).

    Raises:
        ModelNotFound: no ``model_index.json``, or it is not valid JSON (the message names the file).
        UnsupportedModel: another pipeline class, or a component that needs code from the model.
    """
    folder = Path(folder)
    index = _load_index(folder)
    cls = str(index.get("_class_name", ""))
    kind = PIPELINE_CLASSES.get(cls)
    if kind is None:
        raise UnsupportedModel(
            f"{folder.name} holds a {cls or 'unknown'} pipeline; image fine-tuning supports "
            f"{', '.join(PIPELINE_CLASSES)}.",
            hint="Choose a FLUX.1, Stable Diffusion 3.x or SDXL pipeline folder.",
        )
    components: dict[str, tuple[str, str]] = {}
    foreign = []
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[1] is None:
            continue
        lib, comp_cls = spec
        if lib not in _LIBRARIES:
            foreign.append(f"{name}: {lib}.{comp_cls}")
        components[name] = (str(lib), str(comp_cls))
    if foreign:
        raise UnsupportedModel(
            f"{folder.name} needs code shipped with the model to load; it is never run.",
            problems=foreign,
            hint="Use a pipeline whose components all come from diffusers and transformers.",
        )
    return PipelineIndex(folder, kind, cls, DENOISER[kind], components)


def weight_files(component_dir: Path) -> list[Path]:
    """The ``*.safetensors`` diffusers loads from a component folder without a ``variant``, sorted.

    ``diffusion_pytorch_model.safetensors`` and its shards (``…-00001-of-00003.safetensors``); variant
    files (``diffusion_pytorch_model.fp16.safetensors``, ``….fp16-00001-of-00002.safetensors``) are not
    read by the stages (they load the main weights) and are left out.
    """
    return sorted(
        f for f in Path(component_dir).glob("*.safetensors") if "." not in f.name[: -len(".safetensors")]
    )


def check_denoiser_dir(denoiser_dir: Path) -> None:
    """Raise :class:`ModelNotFound` unless ``denoiser_dir`` has a config and (non-variant) safetensors weights."""
    if not (denoiser_dir / "config.json").is_file():
        raise ModelNotFound(f"The denoiser folder {denoiser_dir} has no config.json.")
    if not weight_files(denoiser_dir):
        variants = sorted(f.name for f in denoiser_dir.glob("*.safetensors"))
        if variants:
            raise ModelNotFound(
                f"The denoiser folder {denoiser_dir} has only variant weights ({', '.join(variants[:2])}); "
                "the main weights are read.",
                hint=f"Download the {denoiser_dir.name}/ weights without a variant (e.g. `hf download REPO "
                f"--include '{denoiser_dir.name}/*'`).",
            )
        raise ModelNotFound(
            f"The denoiser folder {denoiser_dir} has no .safetensors weights.",
            hint="Download the pipeline with safetensors weights (pickle .bin files are not read).",
        )


SINGLE_FILE_KEYS: dict[Kind, tuple[str, ...]] = {
    "flux": ("double_blocks.0.img_attn.norm.key_norm.scale", "single_transformer_blocks.0.proj_mlp.weight"),
    "sd3": ("joint_blocks.0.context_block.adaLN_modulation.1.bias",),
    "sdxl": ("conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias",),
}
"""A tensor name only that family's original-format checkpoint has (diffusers'
``single_file_utils.CHECKPOINT_KEY_NAMES``), with or without the ``model.diffusion_model.`` prefix;
for FLUX.1 also a key of its diffusers-format transformer saved as one file (``single_transformer_blocks``
is FLUX's alone), which ``from_single_file`` reads as well."""
SINGLE_FILE_PREFIX = "model.diffusion_model."  # the denoiser's keys in an all-in-one checkpoint


def single_file_family(file: Path) -> Kind | None:
    """The family of a single-file checkpoint (FLUX.1, SD3 or SDXL, as ComfyUI/Forge keep them), or None.

    Reads the safetensors header only. None for anything else: a LoRA, a VAE, a text encoder, another
    family, an unreadable file (the catalog does not list those).
    """
    from emloc_engine.weights.headers import read_safetensors_header

    try:
        names = read_safetensors_header(Path(file)).tensors.keys()
    except EngineError:
        return None
    for kind, keys in SINGLE_FILE_KEYS.items():
        if any(k in names or SINGLE_FILE_PREFIX + k in names for k in keys):
            return kind
    return None


def _a(name: str) -> str:
    """``name`` with its article as it is read aloud: "an SDXL" (S-D-X-L), "a FLUX.1", "a Stable Diffusion 3"."""
    return f"{'an' if name == 'SDXL' else 'a'} {name}"


def check_config_dir(single_file: Path, config_dir: Path) -> PipelineIndex:
    """Check that ``config_dir`` can supply the configs, text encoders and VAE of ``single_file``.

    The pipeline folder must be a readable diffusers pipeline (``model_index.json``, a denoiser with its
    config and weights, no missing shards) of the same family as the file: diffusers reads the file's
    weights with that folder's denoiser config, and a FLUX.1 file with an SDXL folder cannot be read.
    A file whose family the header does not tell (e.g. an SDXL UNet saved in diffusers naming; the
    catalog does not list those, ``emloc image`` takes them) is checked against the folder only, and
    diffusers says whether it can read it.
    Reads the file's safetensors header and the folder's JSON only (no torch): the app checks the
    folder as soon as it is chosen, the planner and ``emloc image`` before they start.

    Args:
        single_file: a single-file checkpoint (FLUX.1, SD3 or SDXL, as ComfyUI/Forge keep them).
        config_dir: the diffusers pipeline folder chosen for it.

    Returns:
        The folder's pipeline index.

    Raises:
        ModelNotFound: the file or the folder is missing, or the folder has no ``model_index.json``.
        ConfigError: the folder is broken (every problem listed) or of another family than the file;
            each message names the folder and what to choose instead.
    """
    single_file, config_dir = Path(single_file), Path(config_dir)
    if not single_file.is_file():
        raise ModelNotFound(f"The checkpoint {single_file} does not exist.", hint="Choose the file again.")
    family = single_file_family(single_file)
    name = FAMILY_NAMES[family] if family is not None else "FLUX.1, Stable Diffusion 3 or SDXL"
    wanted = (
        f"Choose a diffusers {name} pipeline folder (the one that holds {MODEL_INDEX}, e.g. a Hugging Face "
        "cache snapshot of such a model): its configs, text encoders and VAE go with this file's weights."
    )
    if not config_dir.is_dir() or not is_pipeline_folder(config_dir):
        raise ModelNotFound(
            f"{config_dir} is not a diffusers pipeline folder (no {MODEL_INDEX}).", hint=wanted
        )
    index, problems = pipeline_problems(config_dir)
    if index is not None and family is not None and index.kind != family:
        raise ConfigError(
            f"{config_dir} is {_a(FAMILY_NAMES[index.kind])} pipeline; {single_file.name} is {_a(name)} checkpoint.",
            hint=wanted,
        )
    if index is None or problems:
        raise ConfigError(
            f"The pipeline folder {config_dir} cannot supply the configs of {single_file.name}.",
            problems=problems,
            hint=wanted,
        )
    return index


def _error_line(exc: EngineError) -> str:
    detail = f" ({'; '.join(exc.problems)})" if exc.problems else ""
    return exc.summary + detail + (f" Fix: {exc.hint}" if exc.hint else "")


def pipeline_problems(folder: Path) -> tuple[PipelineIndex | None, list[str]]:
    """The pipeline's index (None when unreadable or unsupported) and every problem, one line each.

    Never raises: the catalog lists a broken pipeline with the reason. Problems: the index's own
    (invalid JSON, another pipeline class, remote code), a denoiser without config or safetensors
    weights, and shards missing from a component's ``*.safetensors.index.json``.
    """
    folder = Path(folder)
    try:
        index = read_pipeline_index(folder)
    except EngineError as exc:
        return None, [_error_line(exc)]
    problems: list[str] = []
    try:
        check_denoiser_dir(folder / index.denoiser)
    except EngineError as exc:
        problems.append(_error_line(exc))
    for name in index.components:
        for shard_index in sorted((folder / name).glob("*.safetensors.index.json")):
            try:
                wanted = set(
                    json.loads(shard_index.read_text(encoding="utf-8")).get("weight_map", {}).values()
                )
            except (OSError, ValueError, AttributeError) as exc:
                problems.append(f"{shard_index} is unreadable ({exc}). Fix: {_REFETCH}")
                continue
            missing = sorted(w for w in wanted if not (shard_index.parent / w).exists())
            if missing:
                problems.append(
                    f"incomplete download: {name}/ misses {len(missing)} of {len(wanted)} shard(s) "
                    f"({', '.join(missing[:3])}{' …' if len(missing) > 3 else ''})"
                )
    return index, problems


__all__ = [
    "DENOISER",
    "FAMILY_NAMES",
    "KINDS",
    "MODEL_INDEX",
    "PIPELINE_CLASSES",
    "SINGLE_FILE_KEYS",
    "SINGLE_FILE_PREFIX",
    "Kind",
    "PipelineIndex",
    "check_config_dir",
    "check_denoiser_dir",
    "is_pipeline_folder",
    "pipeline_problems",
    "read_pipeline_index",
    "single_file_family",
    "weight_files",
]
