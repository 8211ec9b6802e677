"""Turn what a user types (a folder, ``org/name``, ``demo``) into a model folder or dataset file."""

from __future__ import annotations

import logging
from pathlib import Path

from emloc_engine.core.errors import DataError, ModelNotFound
from emloc_engine.core.trust import refuse_remote_code

log = logging.getLogger(__name__)


def resolve_model(text: str | Path) -> Path:
    """A model folder from a path, a cached repo id (``org/name``), ``demo``, or a GGUF file.

    A GGUF (given as a path, or found in LM Studio's/Ollama's store by name) gets a model view in the
    app's data folder (:func:`emloc_engine.catalog.gguf_import.convert_for_catalog`): its config and
    tokenizer, no weights; every stage reads the weights from the GGUF itself.

    Image pipelines of the catalog (``kind="image"``) are not language models: naming one raises
    :class:`ModelNotFound` with the ``emloc image`` command that trains it.

    Raises:
        ModelNotFound: nothing matches, or only an image model does; the message says what to do.
        UntrustedCode: the folder would need its own Python code to load (never run).
    """
    s = str(text)
    p = Path(s).expanduser()
    if p.is_dir() and (p / "config.json").exists():
        refuse_remote_code(p)
        return p
    if p.is_file() and p.suffix.lower() == ".gguf":
        from emloc_engine.catalog.gguf_import import convert_for_catalog

        log.info("Reading %s in place (a model view of its metadata; the weights stay in the file).", p)
        return convert_for_catalog(p)
    if s == "demo":
        from emloc_engine.catalog.demo import ensure_demo_model

        return ensure_demo_model()
    from emloc_engine.catalog.discovery import find_models

    matches = [m for m in find_models() if s in (m.name, str(m.path)) or m.name.endswith("/" + s)]
    images = [m for m in matches if m.kind == "image"]
    matches = [m for m in matches if m.kind != "image"]  # the language-model commands resolve through here
    if images and not matches:
        m = images[0]
        raise ModelNotFound(f"{s!r} is an image model ({m.architecture or m.model_type or 'a diffusers pipeline'}), "
                            "not a language model.",
                            hint=f"Fine-tune it with `emloc image {m.path} PHOTOS --trigger WORD --out RUN` (its memory "
                                 f"plan: `emloc plan {m.path}`), or choose it in the app.")
    usable = [m for m in matches if m.supported and not m.needs_conversion]
    if usable:
        refuse_remote_code(Path(usable[0].path))  # the catalog lists such folders as unusable already
        return Path(usable[0].path)
    convertible = [m for m in matches if m.supported and m.needs_conversion]
    if convertible:
        from emloc_engine.catalog.gguf_import import convert_for_catalog

        log.info("Reading %s in place (a model view of its metadata).", convertible[0].path)
        return convert_for_catalog(Path(convertible[0].path))
    if matches:
        m = matches[0]
        if Path(m.path).is_dir():
            refuse_remote_code(Path(m.path))  # the typed error, not only the catalog's line
        raise ModelNotFound(f"Model {s!r} was found but cannot be used: {m.problem or 'needs conversion'}.")
    if p.is_dir():
        raise ModelNotFound(f"{p} is a folder but not a model folder: it has no config.json.",
                            hint="Pass the folder that holds config.json and the *.safetensors shards (in a Hugging "
                                 "Face cache: snapshots/REVISION), or a .gguf file; `emloc models` lists the models "
                                 "found on this machine.")
    if p.suffix.lower() == ".gguf":
        raise ModelNotFound(f"There is no GGUF file at {p}.",
                            hint="Check the path; `emloc models` lists the GGUF files of LM Studio and Ollama too.")
    raise ModelNotFound(f"No model folder or cached model named {s!r}.",
                        hint="Pass a folder holding config.json and *.safetensors, or see `emloc models`.")


def resolve_data(text: str | Path) -> Path:
    """A dataset file or folder (or cached dataset name) from a path, or ``demo`` (the default demo dataset).

    Raises:
        DataError: the file does not exist.
    """
    s = str(text)
    if s == "demo":
        from emloc_engine.catalog.demo import ensure_demo_datasets

        sets = ensure_demo_datasets()
        default = [d for d in sets if d.default] or sets
        return Path(default[0].path)
    p = Path(s).expanduser()
    if not p.is_file():
        from emloc_engine.data.hf_datasets import looks_like_dataset

        if looks_like_dataset(p):  # a datasets/Parquet/Arrow folder, or a dataset in the local cache
            return p
        raise DataError(f"Dataset file {p} does not exist.",
                        hint="Pass a .jsonl/.json/.csv/.parquet/.txt file, a datasets folder, a dataset in the "
                             "local Hugging Face cache (org/name) or 'demo'.")
    return p
