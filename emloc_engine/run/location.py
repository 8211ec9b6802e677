"""Where a run may write: never into the source model, a Hugging Face cache, or LM Studio's/Ollama's stores.

Checked before anything is written (the run folder is not even created when it fails).
"""

from __future__ import annotations

import os
from pathlib import Path

from emloc_engine.core.errors import RunStateError


def _inside(path: Path, root: Path) -> bool:
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


def check_run_location(run_dir: Path, model_dir: Path) -> None:
    """Refuse a run folder inside (or containing) the source model, a HF cache or a runtime's store.

    Raises:
        RunStateError: naming the protected folder and what to do instead.
    """
    out = Path(run_dir)
    protected = [Path(model_dir)]
    protected += [p for p in Path(model_dir).resolve().parents if p.name.startswith("models--")]
    for root in protected:
        if _inside(out, root) or _inside(root, out):
            raise RunStateError(f"Refusing to use {out} as the run folder: it is inside (or contains) the source "
                                f"model folder {root}.",
                                hint="Give --out a folder elsewhere; the source model is never modified.")
    for root in hf_cache_roots():
        if _inside(out, root):
            raise RunStateError(f"Refusing to use {out} as the run folder: it is inside the Hugging Face cache "
                                f"{root}.", hint="Give --out a folder outside the cache.")
    for root in runtime_store_roots():
        if _inside(out, root):
            raise RunStateError(f"Refusing to use {out} as the run folder: it is inside a model store of LM Studio "
                                f"or Ollama ({root}).", hint="Give --out a folder outside the runtime's store.")
