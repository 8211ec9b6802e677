"""Datasets in the Hugging Face ``datasets`` layouts: read with pyarrow, validated like any file.

``DataConfig.path`` may name, besides one file:

* a folder saved with ``Dataset.save_to_disk`` (``state.json`` + ``data-*.arrow``) or
  ``DatasetDict.save_to_disk`` (``dataset_dict.json`` + one such folder per split);
* a folder of Parquet or Arrow files (a dataset repository downloaded from the Hub, ``data/train-*.parquet``,
  or any folder of ``*.parquet`` / ``*.arrow`` shards; subfolders are searched);
* a dataset already in the local cache, by its Hub name (``org/name`` or ``name``) when no such file or
  folder exists: first the ``datasets`` cache (``HF_DATASETS_CACHE``, what ``load_dataset`` prepared:
  ``org___name/CONFIG/VERSION/HASH/*.arrow``; config ``default`` if present, else the first; the newest
  prepared copy), then the Hub cache (``HF_HUB_CACHE``, ``datasets--org--name/snapshots/REV``: the
  revision of ``refs/main``, else the newest). Nothing is downloaded; nothing in the caches is written.

**Split.** One split is read: ``train`` when the dataset has one, else the only split, else the first of
``validation``, ``test`` and the rest in name order (the held-out part comes from ``eval_fraction`` as
for files). To train on another split, point at its folder (``DatasetDict`` folders have one per split).
A file's split is read from its name as the Hub and ``datasets`` write them (``train-00000-of-00002.parquet``,
``name-validation.arrow``, ``train/part-0.parquet``); files without a split name are all one split.

**Rows.** Columns become record fields, so the formats, ``--format`` and ``--map field=column`` work as for
JSONL/Parquet files, and every problem names its row: ``FOLDER: row 17`` (0-based, counted over the
split's files in order). Arrow files may be in the IPC stream format (what ``datasets`` writes) or the
IPC file format; both are read batch by batch.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emloc_engine.data.validation import ProblemLog

log = logging.getLogger(__name__)

DATA_SUFFIXES = (".parquet", ".arrow")
SPLIT_ORDER = ("train", "validation", "test")
_SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation", "eval": "validation"}
_SPLIT_RE = re.compile(r"(?:^|[-_./])(train|validation|valid|val|dev|eval|test)(?=$|[-_./])")
_NAME_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass(frozen=True)
class DatasetSource:
    """The files of one split of a dataset folder or cached dataset.

    Attributes:
        kind: ``"save_to_disk"``, ``"folder"`` (Parquet/Arrow shards), ``"datasets-cache"`` or ``"hub-cache"``.
        root: the folder the files were found in.
        files: the split's files, in reading order.
        split: the split read (``""`` when the files name none).
        splits: every split the dataset has.
    """

    kind: str
    root: Path
    files: tuple[Path, ...]
    split: str
    splits: tuple[str, ...]


class DatasetSourceError(Exception):
    """Why a folder or name is not a dataset this module reads (shown as the data report's problem)."""


def looks_like_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder, or names a dataset in the local cache (no such file or folder exists)."""
    path = Path(path)
    if path.is_dir():
        return True
    return not path.exists() and _cached_root(str(path)) is not None


def find_source(path: Path) -> DatasetSource:
    """The split's files of the dataset folder or cached dataset ``path``.

    Raises:
        DatasetSourceError: the folder holds no Parquet/Arrow data, or the name is not in a local cache.
    """
    path = Path(path)
    if path.is_dir():
        return _folder_source(path, "folder")
    found = _cached_root(str(path))
    if found is None:
        raise DatasetSourceError(
            f"not found, neither as a file or folder nor as a dataset in the local Hugging "
            f"Face caches ({datasets_cache_dir()}, {hub_cache_dir()})"
        )
    kind, root = found
    return _folder_source(root, kind)


def _folder_source(root: Path, kind: str) -> DatasetSource:
    if (root / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk
        splits = tuple(str(s) for s in _json(root / "dataset_dict.json").get("splits", []))
        split = choose_split(splits)
        if not split:
            raise DatasetSourceError("dataset_dict.json lists no split")
        inner = _folder_source(root / split, "save_to_disk")
        return DatasetSource("save_to_disk", root, inner.files, split, splits)
    if (root / "state.json").is_file():  # Dataset.save_to_disk
        names = [str(f.get("filename", "")) for f in _json(root / "state.json").get("_data_files", [])]
        files = tuple(root / n for n in names if n)
        missing = [f.name for f in files if not f.is_file()]
        if not files or missing:
            raise DatasetSourceError(
                f"state.json names data files that are missing: {', '.join(missing) or 'none'}"
            )
        return DatasetSource("save_to_disk", root, files, "", ("",))
    # cache-*.arrow / tmp*: what datasets' map() and filter() leave beside a prepared dataset, not its data
    shards: list[Path] = sorted(
        (
            p
            for p in root.rglob("*")
            if p.suffix in DATA_SUFFIXES
            and p.is_file()
            and not p.name.startswith(("cache-", "tmp"))
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        ),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not shards:
        raise DatasetSourceError(
            "is a folder without a dataset: no .parquet or .arrow files, no dataset_dict.json "
            "or state.json (Dataset.save_to_disk); point at a dataset file or folder"
        )
    if any(p.suffix == ".parquet" for p in shards) and any(p.suffix == ".arrow" for p in shards):
        shards = [
            p for p in shards if p.suffix == ".parquet"
        ]  # a repo with both: the Parquet files are the data
    by_split: dict[str, list[Path]] = {}
    for p in shards:
        by_split.setdefault(split_of(p.relative_to(root).as_posix()), []).append(p)
    splits = tuple(sorted(by_split, key=_split_key))
    split = choose_split(splits)
    return DatasetSource(kind, root, tuple(by_split[split]), split, splits)


def split_of(relative: str) -> str:
    """The split a data file belongs to, from its path inside the dataset (``""``: none named)."""
    found = _SPLIT_RE.findall(relative.rsplit(".", 1)[0].lower())
    return _SPLIT_ALIASES.get(found[-1], found[-1]) if found else ""


def _split_key(name: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(name) if name in SPLIT_ORDER else len(SPLIT_ORDER), name)


def choose_split(splits: tuple[str, ...] | list[str]) -> str:
    """``train``, else the only split, else the first of validation, test, the rest by name (``""`` if none)."""
    ordered = sorted(splits, key=_split_key)
    return ordered[0] if ordered else ""


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetSourceError(f"{path.name} cannot be read ({exc})") from exc
    if not isinstance(data, dict):
        raise DatasetSourceError(f"{path.name} is not a JSON object")
    return data


# ----------------------------------------------------------------------------------------------- caches
def datasets_cache_dir() -> Path:
    """Where ``datasets`` keeps prepared datasets (``HF_DATASETS_CACHE``, else ``HF_HOME/datasets``)."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser()
    return home / "datasets"


def hub_cache_dir() -> Path:
    """The Hugging Face Hub's download cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser()
    return home / "hub"


def _cached_root(name: str) -> tuple[str, Path] | None:
    """``(kind, folder)`` of the dataset ``org/name`` in the ``datasets`` cache, else the Hub cache; or None."""
    if not _NAME_RE.match(name):
        return None
    prepared = _prepared_copy(datasets_cache_dir() / name.replace("/", "___"))
    if prepared is not None:
        return "datasets-cache", prepared
    repo = hub_cache_dir() / ("datasets--" + name.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file() and (snapshots / ref.read_text(encoding="utf-8").strip()).is_dir():
        return "hub-cache", snapshots / ref.read_text(encoding="utf-8").strip()
    revisions = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return ("hub-cache", revisions[-1]) if revisions else None


def _prepared_copy(builder_dir: Path) -> Path | None:
    """The newest ``CONFIG/VERSION/HASH`` folder holding Arrow files (config ``default`` first)."""
    if not builder_dir.is_dir():
        return None
    configs = sorted(
        (p for p in builder_dir.iterdir() if p.is_dir()), key=lambda p: (p.name != "default", p.name)
    )
    for config in configs:
        copies = [h for h in config.glob("*/*") if h.is_dir() and any(h.glob("*.arrow"))]
        if copies:
            return max(copies, key=lambda p: p.stat().st_mtime)
    return None


# ------------------------------------------------------------------------------------------------- rows
def iter_dataset_rows(path: Path, problems: ProblemLog) -> Iterator[tuple[None, int, dict[str, Any]]]:
    """``(None, row, fields)`` for every row of the dataset ``path`` (one split); problems go to ``problems``."""
    try:
        source = find_source(path)
    except DatasetSourceError as exc:
        problems.error(None, str(exc), "not_found")
        return
    log.info(
        "Reading %s %s: split %r of %s (%d file(s))",
        source.kind,
        source.root,
        source.split,
        ", ".join(repr(s) for s in source.splits),
        len(source.files),
    )
    row = 0
    for file in source.files:
        try:
            for batch in _batches(file):
                for fields in batch.to_pylist():
                    yield None, row, fields
                    row += 1
        except Exception as exc:  # pyarrow's ArrowInvalid/OSError: a damaged shard
            problems.error(
                None,
                f"cannot read {file.relative_to(source.root)} after row {row}: {exc}",
                "bad_json",
                item=row,
            )
            return


def _batches(file: Path) -> Iterator[Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if file.suffix == ".parquet":
        yield from pq.ParquetFile(file).iter_batches(batch_size=1024)
        return
    with pa.memory_map(str(file)) as source:
        try:
            reader: Any = pa.ipc.open_stream(source)  # what datasets writes
        except pa.ArrowInvalid:
            source.seek(0)
            file_reader = pa.ipc.open_file(source)
            for i in range(file_reader.num_record_batches):
                yield file_reader.get_batch(i)
            return
        yield from reader


def source_files(path: Path) -> list[Path]:
    """The files whose bytes make the dataset ``path`` (for its fingerprint); ``[]`` when it is not one."""
    try:
        return list(find_source(path).files)
    except DatasetSourceError:
        return []
