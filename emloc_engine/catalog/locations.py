"""Where we may write: never into the source model, a Hugging Face cache, or LM Studio's/Ollama's stores.

Checked before anything is written (the run folder is not even created when it fails).
"""

from __future__ import annotations

import os
from pathlib import Path

from emloc_engine.core.errors import RunStateError


def inside(path: Path, root: Path) -> bool:
    """Whether ``path`` is ``root`` or below it (symlinks resolved)."""
    try:
        path.resolve().relative_to(root.resolve())
    except (ValueError, OSError):
        return False
    return True


def hf_cache_roots() -> list[Path]:
    """Every folder that may hold a Hugging Face cache on this machine (environment, defaults)."""
    roots = [Path(os.environ[env]) for env in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME")
             if os.environ.get(env)]
    roots.append(Path.home() / ".cache" / "huggingface")
    from huggingface_hub import constants

    roots.append(Path(constants.HF_HUB_CACHE))
    return roots


def runtime_store_roots() -> list[Path]:
    """LM Studio's and Ollama's model stores (read-only for us)."""
    from emloc_engine.catalog.discovery import lmstudio_dirs, ollama_dir

    return [*lmstudio_dirs(), ollama_dir()]


def protected_place(out: Path, model_dir: Path) -> str | None:
    """Why ``out`` may not be written, or None: inside (or containing) the source model, a HF cache or a store."""
    out = Path(out)
    protected = [Path(model_dir)]
    protected += [p for p in Path(model_dir).resolve().parents if p.name.startswith("models--")]
    from emloc_engine.weights.gguf_source import is_gguf_view, read_view_marker

    if is_gguf_view(Path(model_dir)):  # the weights' real home: the GGUF's folder (LM Studio, Ollama's blobs)
        protected.append(Path(read_view_marker(Path(model_dir))["source"]).parent)
    for root in protected:
        if inside(out, root) or inside(root, out):
            return f"it is inside (or contains) the source model folder {root}"
    for root in hf_cache_roots():
        if inside(out, root):
            return f"it is inside the Hugging Face cache {root}"
    for root in runtime_store_roots():
        if inside(out, root):
            return f"it is inside a model store of LM Studio or Ollama ({root})"
    return None


def check_run_location(run_dir: Path, model_dir: Path) -> None:
    """Refuse a run folder inside (or containing) the source model, a HF cache or a runtime's store.

    Raises:
        RunStateError: naming the protected folder and what to do instead.
    """
    why = protected_place(run_dir, model_dir)
    if why is not None:
        raise RunStateError(f"Refusing to use {run_dir} as the run folder: {why}.",
                            hint="Give --out a folder elsewhere; the source model, caches and stores are never "
                                 "modified.")
