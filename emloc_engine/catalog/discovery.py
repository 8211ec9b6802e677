"""The local model catalog: the Hugging Face cache, folders the user added, LM Studio and Ollama stores.

Nothing is copied and no weights are read: each model is described from ``config.json`` and the
safetensors headers (:mod:`emloc_engine.catalog.model_facts`). A model that cannot be used is still
listed, with what is wrong (incomplete download, missing shard, broken symlink, pickle-only
``.bin`` weights, unknown architecture, bad ``config.json``, a folder that would need its own Python
code), so the user sees why it is greyed out.

* Hugging Face cache: ``huggingface_hub.scan_cache_dir`` (honours ``HF_HUB_CACHE`` / ``HF_HOME``
  read at call time); every cached revision is listed. Repos it reports as corrupted (in its
  ``warnings``) are scanned leniently here so they are listed with the reason.
* Added folders (:mod:`emloc_engine.catalog.model_folders`): a folder may be a model or hold
  models one or two levels down.
* LM Studio (``LMSTUDIO_MODELS_DIR`` or ``~/.lmstudio/models``, ``~/.cache/lm-studio/models``) and
  Ollama (``OLLAMA_MODELS`` or ``~/.ollama/models``: manifests name the GGUF blob): listed with
  ``needs_conversion=True``; :func:`emloc_engine.catalog.gguf_import.convert_for_catalog` makes its model
  view (config and tokenizer from the file's metadata, no weights: every stage streams them from the
  GGUF), which then goes through the pipeline like any other model.
* The demo model (``paths.demo_model_dir()``) when it has been built.
* Image pipelines (FLUX.1, Stable Diffusion 3, SDXL in diffusers layout: a folder with
  ``model_index.json``), in the Hugging Face cache and in added folders, with ``kind="image"``
  (:func:`inspect_pipeline_dir`, torch-free: :mod:`emloc_engine.images.pipeline_index`). Their
  parameters and dtype are the denoiser's (the part EMLoC compresses and trains). A pipeline folder
  is never searched for models inside it (its ``text_encoder/`` is not a language model to list).
  Without the ``images`` extra (diffusers) they are listed greyed out with the install command.
  Single-file checkpoints (``flux1-dev.safetensors`` as ComfyUI/Forge keep them) in added folders
  are listed too, greyed out with the command that trains them: reading one needs a diffusers
  pipeline folder of the same family for its configs, text encoders and VAE (``emloc image FILE
  --config-dir PIPELINE``); the app trains pipeline folders.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emloc_engine.catalog.gguf_import import inspect_gguf
from emloc_engine.catalog.model_facts import (
    ModelFacts,
    facts_from_config,
    read_preprocessor,
    read_tensor_shapes,
)
from emloc_engine.catalog.model_folders import added_model_folders
from emloc_engine.core import paths
from emloc_engine.core.dtypes import dtype_name
from emloc_engine.core.errors import EngineError
from emloc_engine.core.trust import remote_code_problem
from emloc_engine.images.pipeline_index import (
    SINGLE_FILE_PREFIX,
    is_pipeline_folder,
    pipeline_problems,
    single_file_family,
    weight_files,
)
from emloc_engine.vision.families import is_vision_language
from emloc_engine.weights.gguf_view import is_gguf_view, read_view_marker
from emloc_engine.weights.headers import read_config, read_safetensors_header

log = logging.getLogger(__name__)

GIB = 1024**3
_OLLAMA_MODEL_MEDIA = "application/vnd.ollama.image.model"


@dataclass(frozen=True)
class ModelInfo:
    """One model (one revision of one repo, one folder, or one GGUF file) as the catalog shows it.

    Attributes:
        source: ``"hf-cache"``, ``"folder"``, ``"lmstudio"``, ``"ollama"`` or ``"demo"``.
        supported: usable by the pipeline as is (or after conversion, for GGUF).
        problem: what is wrong, in one line, when something is; None otherwise.
        needs_conversion: a GGUF file; make its model view with ``gguf_import.convert_for_catalog`` (seconds).
        facts: the planner's shape facts (None when they could not be read).
    """

    name: str
    path: Path
    revision: str | None
    source: str
    model_type: str | None
    architecture: str | None
    num_parameters: int | None
    dtype: str | None
    size_on_disk_bytes: int
    supported: bool
    problem: str | None
    needs_conversion: bool = False
    refs: tuple[str, ...] = ()
    facts: ModelFacts | None = field(default=None, compare=False, repr=False)
    kind: str = "text"
    """``"text"`` (a causal LM), ``"vision-language"`` (a config with a vision tower) or ``"image"`` (a
    diffusers pipeline: FLUX.1, SD3, SDXL; ``model_type`` is its family, ``architecture`` its pipeline class)."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "revision": self.revision, "source": self.source,
                "model_type": self.model_type, "architecture": self.architecture,
                "num_parameters": self.num_parameters, "dtype": self.dtype,
                "size_on_disk_bytes": self.size_on_disk_bytes, "supported": self.supported,
                "problem": self.problem, "needs_conversion": self.needs_conversion, "refs": list(self.refs),
                "kind": self.kind}


@dataclass(frozen=True)
class ModelScan:
    """Every model found, plus scan-level warnings (unreadable folders, corrupted cache entries)."""

    models: tuple[ModelInfo, ...]
    warnings: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------------
# where things are


def hf_cache_dir() -> Path:
    """The hub cache: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``.

    Read from the environment at call time (``huggingface_hub.constants`` freezes it at import).
    """
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "huggingface" / "hub"


def lmstudio_dirs() -> list[Path]:
    """LM Studio model folders: ``LMSTUDIO_MODELS_DIR`` or the two default locations."""
    env = os.environ.get("LMSTUDIO_MODELS_DIR")
    if env:
        return [Path(env).expanduser()]
    home = Path.home()
    return [home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"]


def ollama_dir() -> Path:
    """Ollama's model store (``OLLAMA_MODELS`` or ``~/.ollama/models``)."""
    env = os.environ.get("OLLAMA_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".ollama" / "models"


# ------------------------------------------------------------------------------------------------
# one folder


def _dir_size(folder: Path) -> int:
    total = 0
    for f in folder.rglob("*"):
        try:
            if f.is_file():
                total += f.stat().st_size
        except OSError:
            continue
    return total


def _folder_problems(folder: Path) -> list[str]:
    """Broken symlinks and shards missing from the index, in a model folder."""
    problems = []
    broken = sorted(f.name for f in folder.iterdir() if f.is_symlink() and not f.exists())
    if broken:
        problems.append(f"broken symlink(s): {', '.join(broken[:5])}{' …' if len(broken) > 5 else ''} "
                        "(interrupted or cleaned-up download; download it again)")
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            wanted = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError) as exc:
            problems.append(f"model.safetensors.index.json is unreadable ({exc})")
        else:
            missing = sorted(w for w in wanted if not (folder / w).exists())
            if missing:
                problems.append(f"incomplete download: {len(missing)} of {len(wanted)} shard(s) missing "
                                f"({', '.join(missing[:3])}{' …' if len(missing) > 3 else ''})")
    return problems


def inspect_model_dir(folder: Path, *, name: str | None = None, source: str = "folder",
                      revision: str | None = None, size_on_disk_bytes: int | None = None,
                      refs: tuple[str, ...] = (), extra_problems: Iterable[str] = ()) -> list[ModelInfo]:
    """Describe one model folder (or the GGUF files in a folder without ``config.json``). Never raises.

    Args:
        folder: a snapshot folder or a plain model folder.
        name: display name (default: the folder name).
        source: catalog source label.
        revision: commit hash for cache snapshots.
        size_on_disk_bytes: known size (the cache scan computes it from blobs); default: summed here.
        refs: cache refs pointing at this revision (``main``...).
        extra_problems: problems already known (e.g. ``.incomplete`` blobs in the cache).

    Returns:
        One :class:`ModelInfo`, or one per GGUF file for a GGUF-only folder.
    """
    folder = Path(folder)
    name = name or folder.name
    problems = list(extra_problems)
    try:
        problems += _folder_problems(folder)
        size = size_on_disk_bytes if size_on_disk_bytes is not None else _dir_size(folder)
    except OSError as exc:
        return [ModelInfo(name, folder, revision, source, None, None, None, None, 0, False,
                          f"cannot read the folder ({exc})", refs=refs)]
    if is_pipeline_folder(folder):
        return [inspect_pipeline_dir(folder, name=name, source=source, revision=revision, size_on_disk_bytes=size,
                                     refs=refs, extra_problems=problems)]
    if not (folder / "config.json").exists():
        ggufs = sorted(folder.glob("*.gguf"))
        if ggufs:
            return [gguf_model_info(g, name=f"{name}/{g.name}", source=source, revision=revision) for g in ggufs]
        singles = single_file_infos(folder, source=source, label=name, revision=revision)
        if singles:  # e.g. only flux1-dev.safetensors downloaded from a pipeline repo
            return singles
        reason = "no config.json (not a transformers model folder)"
        if (folder / "config.json").is_symlink():
            reason = "config.json is a broken symlink (download it again)"
        return [ModelInfo(name, folder, revision, source, None, None, None, None, size, False,
                          "; ".join([reason, *problems]), refs=refs)]
    model_type = architecture = dtype = None
    kind = "text"
    num_parameters: int | None = None
    facts: ModelFacts | None = None
    try:
        config = read_config(folder)
        model_type = str(config.get("model_type")) if config.get("model_type") else None
        archs = config.get("architectures") or [None]
        architecture = str(archs[0]) if archs[0] else None
        kind = "vision-language" if is_vision_language(config) else "text"
        untrusted = remote_code_problem(folder)
        if untrusted:  # listed, never loaded: nothing below may import the folder's code
            return [ModelInfo(name, folder, revision, source, model_type, architecture, None, None, size, False,
                              "; ".join([f"{untrusted}; use a model of a supported family", *problems]),
                              refs=refs, kind=kind)]
        view = is_gguf_view(folder)  # weights in a GGUF (checked here: gone or changed is a problem)
        if view:
            size = Path(read_view_marker(folder)["source"]).stat().st_size
        has_st = view or any(folder.glob("*.safetensors"))
        if not has_st:
            if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
                problems.append("pickle-only weights (.bin): convert to safetensors "
                                "(model.save_pretrained(dir, safe_serialization=True))")
            else:
                problems.append("no weight files (*.safetensors)")
        tensors = read_tensor_shapes(folder) if has_st else None
        facts = facts_from_config(config, tensors=tensors, name=name, model_dir=folder,
                                  preprocessor=read_preprocessor(folder))
        model_type, num_parameters = facts.model_type, facts.num_parameters
        dtype = facts.dtype if tensors else None
        if facts.quantization:
            problems.append(f"quantized checkpoint ({facts.quantization}): EMLoC needs 16/32-bit weights")
    except EngineError as exc:
        problems.append(exc.summary + (f" {exc.hint}" if exc.hint else ""))
    except Exception as exc:  # a malformed file must not stop the scan
        problems.append(f"unreadable model files ({type(exc).__name__}: {exc})")
    return [ModelInfo(name, folder, revision, source, model_type, architecture, num_parameters, dtype, size,
                      not problems, "; ".join(problems) or None, refs=refs, facts=facts, kind=kind)]


def _diffusers_problem() -> list[str]:
    import importlib.util

    if importlib.util.find_spec("diffusers") is None:
        return ["image models need the diffusers package: pip install 'emloc-studio[images]'"]
    return []


def _weight_facts(folder: Path) -> tuple[int | None, str | None]:
    """Parameters and dominant dtype of a pipeline component's weights (headers only, no variants)."""
    return _count_entries(e for f in weight_files(folder) for e in read_safetensors_header(f).tensors.values())


def _single_file_facts(file: Path) -> tuple[int | None, str | None]:
    """Parameters and dominant dtype of a single-file checkpoint's denoiser (header only).

    An all-in-one checkpoint (SDXL's, with the VAE and text encoders beside the UNet) keeps the denoiser
    under ``model.diffusion_model.``: only those tensors count, as a pipeline folder's row counts its
    denoiser alone. Unreadable: ``(None, None)`` (the row still lists the file).
    """
    try:
        tensors = read_safetensors_header(file).tensors
    except Exception:  # a malformed header must not stop the scan
        return None, None
    denoiser = [e for k, e in tensors.items() if k.startswith(SINGLE_FILE_PREFIX)]
    return _count_entries(denoiser or tensors.values())


def _count_entries(entries: Iterable[Any]) -> tuple[int | None, str | None]:
    """Total elements and the dtype holding most of them, of safetensors header entries."""
    counts: dict[str, int] = {}
    for entry in entries:
        n = 1
        for d in entry.get("shape", ()):
            n *= int(d)
        counts[str(entry.get("dtype"))] = counts.get(str(entry.get("dtype")), 0) + n
    if not counts:
        return None, None
    return sum(counts.values()), dtype_name(max(counts, key=lambda k: counts[k]))


def inspect_pipeline_dir(folder: Path, *, name: str | None = None, source: str = "folder",
                         revision: str | None = None, size_on_disk_bytes: int | None = None,
                         refs: tuple[str, ...] = (), extra_problems: Iterable[str] = ()) -> ModelInfo:
    """Describe a diffusers pipeline folder (``kind="image"``) from ``model_index.json`` and headers. Never raises.

    A broken ``model_index.json`` (not JSON), another pipeline class, code shipped with the model or a
    denoiser without weights is listed unsupported with the reason (which file, what to do).
    """
    folder = Path(folder)
    problems = list(extra_problems)
    try:
        size = size_on_disk_bytes if size_on_disk_bytes is not None else _dir_size(folder)
    except OSError:
        size = 0
    index, found = pipeline_problems(folder)
    problems += found
    num_parameters = dtype = None
    if index is not None:
        try:
            num_parameters, dtype = _weight_facts(folder / index.denoiser)
        except EngineError as exc:
            problems.append(exc.summary + (f" {exc.hint}" if exc.hint else ""))
        except Exception as exc:  # a malformed header must not stop the scan
            problems.append(f"unreadable denoiser weights ({type(exc).__name__}: {exc})")
        problems += _diffusers_problem()
    return ModelInfo(name or folder.name, folder, revision, source,
                     index.kind if index else None, index.pipeline_class if index else None, num_parameters,
                     dtype, size, not problems, "; ".join(problems) or None, refs=refs, kind="image")


def single_file_infos(folder: Path, *, source: str = "folder", label: str | None = None,
                      revision: str | None = None) -> list[ModelInfo]:
    """The single-file image checkpoints (FLUX.1, SD3, SDXL) directly in ``folder``.

    A single file needs a diffusers pipeline folder of the same family for its configs, text encoders
    and VAE, so it is not ``supported`` on its own (a command given only the file would fail); the
    problem says how to give the folder (the app's Model page asks for it). Other
    ``.safetensors`` files (LoRAs, VAEs, text encoders) are not listed.
    """
    out: list[ModelInfo] = []
    for f in sorted(Path(folder).glob("*.safetensors")):
        kind = single_file_family(f)
        if kind is None:
            continue
        try:
            size = f.stat().st_size
        except OSError:
            continue
        why = (f"single-file {kind} checkpoint: it needs a diffusers {kind} pipeline folder for its configs, "
               "text encoders and VAE; choose one for it on the app's Model page, or train it with "
               f"`emloc image {f} PHOTOS --config-dir PIPELINE`")
        params, dtype = _single_file_facts(f)
        out.append(ModelInfo(f"{label}/{f.name}" if label else f.name, f, revision, source, kind, None, params, dtype,
                             size, False, why, kind="image"))
    return out


def gguf_model_info(path: Path, *, name: str | None = None, source: str = "folder",
                    revision: str | None = None) -> ModelInfo:
    """Describe a GGUF file (header only); it ``needs_conversion`` before training. Never raises."""
    path = Path(path)
    name = name or path.name
    try:
        size = path.stat().st_size
    except OSError as exc:
        return ModelInfo(name, path, revision, source, None, None, None, None, 0, False,
                         f"GGUF file missing ({exc})", needs_conversion=True)
    try:
        info = inspect_gguf(path)
        n_params = info.n_params
        quant = "/".join(t for t in info.tensor_types if t not in ("F32",)) or "F32"
        return ModelInfo(name, path, revision, source, info.architecture, info.name, n_params, quant, size,
                         info.supported, None if info.supported else info.reason, needs_conversion=True)
    except EngineError as exc:
        return ModelInfo(name, path, revision, source, None, None, None, None, size, False, exc.summary,
                         needs_conversion=True)
    except Exception as exc:
        return ModelInfo(name, path, revision, source, None, None, None, None, size, False,
                         f"not a readable GGUF file ({type(exc).__name__}: {exc})", needs_conversion=True)


# ------------------------------------------------------------------------------------------------
# sources


def _incomplete_blobs(repo_path: Path) -> list[str]:
    blobs = repo_path / "blobs"
    return [p.name for p in blobs.glob("*.incomplete")] if blobs.is_dir() else []


def _incomplete_problem(repo_path: Path) -> list[str]:
    inc = _incomplete_blobs(repo_path)
    return [f"download in progress or interrupted ({len(inc)} partial file(s) in blobs/)"] if inc else []


def scan_hf_cache(cache_dir: Path | None = None) -> tuple[list[ModelInfo], list[str]]:
    """Every revision of every model repo in the hub cache, and the scan's warnings. Never raises."""
    cache = (Path(cache_dir) if cache_dir else hf_cache_dir()).expanduser().resolve()
    if not cache.is_dir():
        return [], []
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir(cache)
    except Exception as exc:
        return [], [f"Cannot scan the Hugging Face cache {cache}: {exc}"]
    models: list[ModelInfo] = []
    seen: set[Path] = set()
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        seen.add(Path(repo.repo_path))
        if repo.repo_type != "model":
            continue
        extra = _incomplete_problem(Path(repo.repo_path))
        for rev in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            models += inspect_model_dir(Path(rev.snapshot_path), name=repo.repo_id, source="hf-cache",
                                        revision=rev.commit_hash, size_on_disk_bytes=rev.size_on_disk,
                                        refs=tuple(sorted(rev.refs)), extra_problems=extra)
    warnings = [str(w) for w in info.warnings]
    for repo_path in sorted(cache.glob("models--*")):
        if repo_path in seen or not repo_path.is_dir():
            continue
        models += _lenient_repo(repo_path, [w for w in warnings if repo_path.name in w])
    return models, warnings


def _lenient_repo(repo_path: Path, warnings: list[str]) -> list[ModelInfo]:
    """A repo ``scan_cache_dir`` rejected (e.g. a broken symlink): list its snapshots with the reason."""
    repo_id = repo_path.name.split("--", 1)[-1].replace("--", "/")
    refs: dict[str, list[str]] = {}
    refs_dir = repo_path / "refs"
    if refs_dir.is_dir():
        for r in refs_dir.rglob("*"):
            if r.is_file():
                try:
                    refs.setdefault(r.read_text().strip(), []).append(r.relative_to(refs_dir).as_posix())
                except OSError:
                    continue
    snaps = sorted(p for p in (repo_path / "snapshots").glob("*") if p.is_dir())
    extra = _incomplete_problem(repo_path) + [f"cache entry damaged: {w}" for w in warnings[:1]]
    if not snaps:
        return [ModelInfo(repo_id, repo_path, None, "hf-cache", None, None, None, None, 0, False,
                          "; ".join(["no snapshot downloaded", *extra]))]
    out: list[ModelInfo] = []
    for s in snaps:
        out += inspect_model_dir(s, name=repo_id, source="hf-cache", revision=s.name,
                                 refs=tuple(sorted(refs.get(s.name, []))), extra_problems=extra)
    return out


def _is_model_dir(folder: Path) -> bool:
    """A model folder: a diffusers pipeline, a transformers model, or GGUF files."""
    return is_pipeline_folder(folder) or (folder / "config.json").exists() or any(folder.glob("*.gguf"))


def _candidate_dirs(folder: Path) -> Iterator[Path]:
    """A model folder itself, or its model subfolders (one and two levels down); never inside a model folder."""
    if _is_model_dir(folder):
        yield folder
        return
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if _is_model_dir(sub):
            yield sub
        else:
            yield from (s for s in sorted(sub.iterdir()) if s.is_dir() and _is_model_dir(s))


def _single_file_dirs(folder: Path) -> Iterator[Path]:
    """Where single-file checkpoints may be: the folder and its subfolders (ComfyUI's ``models/unet/``), not
    model folders (a pipeline's own files are its components)."""
    if _is_model_dir(folder):
        return
    yield folder
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if not _is_model_dir(sub):
            yield sub


def scan_folders(folders: Iterable[Path], source: str = "folder") -> tuple[list[ModelInfo], list[str]]:
    """Models in user folders (each a model or a folder of models). Never raises."""
    models: list[ModelInfo] = []
    warnings: list[str] = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            warnings.append(f"Added folder {folder} no longer exists (remove it with `emloc models --remove`).")
            continue
        try:
            for d in _candidate_dirs(folder):
                rel = d.relative_to(folder).as_posix() if d != folder else ""
                label = f"{folder.name}/{rel}" if rel else folder.name
                models += inspect_model_dir(d, name=label, source=source)
            for d in _single_file_dirs(folder):
                rel = d.relative_to(folder).as_posix() if d != folder else ""
                models += single_file_infos(d, source=source, label=f"{folder.name}/{rel}" if rel else folder.name)
        except OSError as exc:
            warnings.append(f"Cannot read {folder}: {exc}")
    return models, warnings


def scan_lmstudio() -> list[ModelInfo]:
    """GGUF files (and MLX/safetensors folders) in LM Studio's model folders."""
    out: list[ModelInfo] = []
    for root in lmstudio_dirs():
        if not root.is_dir():
            continue
        for g in sorted(root.rglob("*.gguf")):
            if g.name.lower().startswith("mmproj"):  # vision projector, not a model
                continue
            out.append(gguf_model_info(g, name=g.relative_to(root).as_posix(), source="lmstudio"))
        for cfg in sorted(root.rglob("config.json")):
            out += inspect_model_dir(cfg.parent, name=cfg.parent.relative_to(root).as_posix(), source="lmstudio")
    return out


def scan_ollama() -> list[ModelInfo]:
    """Models in Ollama's store: each manifest names its GGUF blob."""
    root = ollama_dir()
    manifests = root / "manifests"
    if not manifests.is_dir():
        return []
    out: list[ModelInfo] = []
    for m in sorted(p for p in manifests.rglob("*") if p.is_file()):
        parts = m.relative_to(manifests).parts  # registry / namespace / model / tag
        name = f"{'/'.join(parts[-3:-1]) if len(parts) >= 3 and parts[-3] != 'library' else parts[-2]}:{parts[-1]}" \
            if len(parts) >= 2 else m.name
        try:
            layers = json.loads(m.read_text(encoding="utf-8")).get("layers", [])
            digest = next(x["digest"] for x in layers if x.get("mediaType") == _OLLAMA_MODEL_MEDIA)
        except (OSError, ValueError, StopIteration, KeyError, AttributeError, TypeError) as exc:
            out.append(ModelInfo(name, m, None, "ollama", None, None, None, None, 0, False,
                                 f"unreadable Ollama manifest ({type(exc).__name__})", needs_conversion=True))
            continue
        blob = root / "blobs" / str(digest).replace(":", "-")
        if not blob.exists():
            out.append(ModelInfo(name, blob, None, "ollama", None, None, None, None, 0, False,
                                 "model blob missing (pull it again with `ollama pull`)", needs_conversion=True))
            continue
        out.append(gguf_model_info(blob, name=name, source="ollama", revision=str(digest)[:19]))
    return out


def find_models(cache_dir: Path | None = None, extra_dirs: Iterable[Path] = (), include_stores: bool = True,
                include_added: bool = True) -> list[ModelInfo]:
    """Every model on this machine (see :func:`scan_models`, which also returns warnings)."""
    return list(scan_models(cache_dir, extra_dirs, include_stores, include_added).models)


def scan_models(cache_dir: Path | None = None, extra_dirs: Iterable[Path] = (), include_stores: bool = True,
                include_added: bool = True) -> ModelScan:
    """Scan the HF cache, added and extra folders, LM Studio and Ollama, and the demo model. Never raises.

    Args:
        cache_dir: the hub cache (default :func:`hf_cache_dir`).
        extra_dirs: more folders to scan this time (not persisted).
        include_stores: also scan LM Studio and Ollama.
        include_added: also scan the folders in ``model_folders.json``.

    Returns:
        A :class:`ModelScan`: models (cache first, then folders, stores, demo) and warnings.
    """
    models, warnings = scan_hf_cache(cache_dir)
    folders = [*(added_model_folders() if include_added else []), *extra_dirs]
    found, w = scan_folders(dict.fromkeys(Path(f) for f in folders))
    models += found
    warnings += w
    if include_stores:
        for scan in (scan_lmstudio, scan_ollama):
            try:
                models += scan()
            except OSError as exc:
                warnings.append(f"{scan.__name__}: {exc}")
    demo = paths.demo_model_dir()
    if (demo / "config.json").exists():
        models += inspect_model_dir(demo, name=f"demo: {demo.name}", source="demo")
    return ModelScan(tuple(models), tuple(warnings))


# ------------------------------------------------------------------------------------------------
# does it fit?


@dataclass(frozen=True)
class FitAssessment:
    """Whether a model fits a machine, as a badge: ``"fits"``, ``"tight"``, ``"exceeds"`` or ``"unknown"``."""

    inference: str
    training: str
    ratio: float | None
    message: str
    plan: Any = field(default=None, compare=False, repr=False)  # MemoryPlan


def assess_fit(model: ModelInfo, machine: Any, *, context_length: int = 512, batch_size: int = 1,
               lora_rank: int = 16, safety_margin: float = 0.1, budget_bytes: int | None = None,
               gpu_memory_bytes: int | None = None, train_steps: int = 100) -> FitAssessment:
    """Does ``model`` fit ``machine`` for inference, and for EMLoC training at the planned ratio?

    Args:
        model: from :func:`find_models`.
        machine: a :class:`~emloc_engine.machine.hardware.MachineInfo`; with no GPU, system RAM is the budget.
        context_length: tokens per sequence to plan for.
        batch_size: sequences per step.
        lora_rank: LoRA rank.
        safety_margin: fraction of the budget kept free.
        budget_bytes: the budget; default: the GPU's free memory (or ``gpu_memory_bytes`` when lower)
            less the margin, as ``emloc run`` computes it (:func:`~emloc_engine.machine.budget.default_budget_bytes`).
        gpu_memory_bytes: the process cap (``--gpu-memory``).
        train_steps: optimizer steps, for the time estimate.

    Returns:
        The badges, the chosen ρ and a one-line message; ``plan`` holds the full MemoryPlan. A model
        whose original does not fit trains with it streamed (``plan.stream_original``): the message says
        "Runs offloaded here; EMLoC trains it at ρ … in about … (needs … GiB of RAM)".
    """
    from emloc_engine.core.progress import format_seconds
    from emloc_engine.machine.budget import default_budget_bytes
    from emloc_engine.run.planning import PlanConfig, plan_memory

    if model.facts is None:
        why = "prepare it to train first (emloc models --convert FILE)" if model.needs_conversion else (model.problem or "no shape facts")
        return FitAssessment("unknown", "unknown", None, f"Cannot plan: {why}.")
    gpu = machine.best_gpu
    device = machine.backend if machine.backend in ("cuda", "rocm", "mps", "cpu") else "cpu"
    total = gpu.total_bytes if gpu is not None else machine.ram_total_bytes
    free = gpu.free_bytes if gpu is not None else (machine.ram_available_bytes or total)
    cap = gpu_memory_bytes if gpu is not None else None
    if cap is not None:
        total, free = min(total, cap), min(free, cap)
    budget = budget_bytes if budget_bytes is not None else default_budget_bytes(free)
    cfg = PlanConfig(budget_bytes=budget, gpu_total_bytes=total, context_length=context_length, batch_size=batch_size,
                     lora_rank=lora_rank, safety_margin=safety_margin, device=device,
                     gpu_name=gpu.name if gpu is not None else None, train_steps=train_steps,
                     ram_bytes=machine.ram_total_bytes or None)
    plan = plan_memory(model.facts, cfg)
    need = plan.inference.peak_bytes
    inference = "exceeds" if need > total else "tight" if need > free or need > 0.9 * total else "fits"
    training = "fits" if plan.fits else "exceeds"
    where = gpu.name if gpu is not None else "system RAM (no GPU)"
    if plan.fits and plan.stream_original:
        msg = (f"Runs offloaded here (inference needs {need / GIB:.1f} GiB, the budget is {budget / GIB:.1f} GiB); "
               f"EMLoC trains it at ρ = {plan.ratio:.2f} in about {format_seconds(plan.total_seconds)} "
               f"(needs {plan.ram_bytes / GIB:.0f} GiB of RAM).")
    elif plan.fits:
        msg = (f"Inference {need / GIB:.1f} GiB of {total / GIB:.1f} GiB on {where}; "
               f"EMLoC training fits at ρ = {plan.ratio:.2f} in about {format_seconds(plan.total_seconds)}.")
    else:
        msg = plan.reason
    return FitAssessment(inference, training, plan.ratio, msg, plan)
