"""One pass over a dataset file: read, check, render, split. No model weights are ever loaded here.

:func:`inspect_dataset` reports (never raises for content problems); :func:`prepare_dataset` does the
same pass, keeps the examples, and raises one :class:`~emloc_engine.core.errors.DataError` listing every
fatal problem. Records are streamed; only the rendered examples (token tuples) are kept, and only
by :func:`prepare_dataset`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emloc_engine.core.errors import ConfigError, ModelNotFound
from emloc_engine.core.trust import refuse_remote_code
from emloc_engine.data.config import DataConfig
from emloc_engine.data.formats import (
    CHARS_PER_TOKEN,
    ReadState,
    Sample,
    container_of,
    iter_record_samples,
    iter_text_chunks,
    not_text_problem,
)
from emloc_engine.data.hf_datasets import looks_like_dataset, source_files
from emloc_engine.data.render import (
    FALLBACK_CHAT_TEMPLATE,
    Example,
    TemplateFailure,
    has_chat_template,
    label_text,
    pack,
    render_sample,
    split_indices,
    truncate,
    window_stream,
)
from emloc_engine.data.validation import (
    NO_LABEL_FIX,
    DataReport,
    LengthStats,
    ProblemLog,
    split_sizes,
)

log = logging.getLogger(__name__)

N_PREVIEWS = 3
FINGERPRINT_CHARS = 16


@dataclass(frozen=True)
class PreparedData:
    """Examples ready for training: the seeded split (packed if asked) and the report."""

    train: tuple[Example, ...]
    eval: tuple[Example, ...]
    report: DataReport


TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tiktoken.model")
"""Any one of these holds a tokenizer's vocabulary (``tokenizer.json`` is the usual one)."""


def missing_tokenizer_files(folder: Path) -> list[str]:
    """The tokenizer files a model folder lacks: ``tokenizer_config.json`` (special tokens, chat template)
    and ``tokenizer.json`` (or another vocabulary file, :data:`TOKENIZER_VOCAB_FILES`)."""
    missing = []
    if not any((folder / f).is_file() for f in TOKENIZER_VOCAB_FILES) and not any(folder.glob("*.tiktoken")):
        missing.append("tokenizer.json")
    if not (folder / "tokenizer_config.json").is_file():
        missing.append("tokenizer_config.json")
    return missing


def _local_folder(model: Path | str) -> Path | None:
    """The folder of a model folder or of a repo id in the Hugging Face cache (``None`` if not found)."""
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(str(model), "config.json")
    except Exception:  # not a repo id: transformers reports it below
        return None
    return Path(found).parent if isinstance(found, str) else None


def load_tokenizer(model_dir: Path | str) -> Any:
    """The model's tokenizer only (no weights), from local files; the folder's own code is never run.

    Args:
        model_dir: a model folder, or a repo id already in the Hugging Face cache.

    Returns:
        A ``transformers`` tokenizer.

    Raises:
        ModelNotFound: tokenizer files are missing (named, with the folder), or the tokenizer cannot
            be read (the folder is not a model, or the repo is not cached).
        UntrustedCode: the folder would need its own Python code to load (checked before loading).
    """
    folder = _local_folder(model_dir)
    if folder is not None:
        refuse_remote_code(folder)
        missing = missing_tokenizer_files(folder)
        if missing:
            raise ModelNotFound(
                f"The tokenizer files {' and '.join(missing)} are missing from {folder}.",
                hint="Download them with the model (e.g. `hf download ORG/NAME " + " ".join(missing) + "`) "
                     "or copy them from the original model's folder; an interrupted download also leaves "
                     "them out.")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise ModelNotFound(f"Cannot load the tokenizer of {model_dir}: {exc}",
                            hint="point at a model folder with tokenizer files, or a repo id already "
                                 "in the Hugging Face cache") from exc


def fingerprint(cfg: DataConfig) -> str:
    """sha256 prefix of the file's bytes (a dataset folder's data files) and the settings that change the
    examples (not the path)."""
    h = hashlib.sha256()
    for file in [cfg.path] if cfg.path.is_file() else source_files(cfg.path):  # a dataset folder: its data files
        with file.open("rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    settings = {"format": cfg.format, "column_map": [list(p) for p in cfg.column_map],
                "max_length": cfg.max_length, "train_on": cfg.train_on, "eval_fraction": cfg.eval_fraction,
                "seed": cfg.seed, "packing": cfg.packing, "max_samples": cfg.max_samples}
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:FINGERPRINT_CHARS]


@dataclass
class _Scan:
    """Mutable state of one pass."""

    problems: ProblemLog
    fmt: str = "unknown"
    n_records: int = 0
    n_truncated: int = 0
    n_no_labels: int = 0
    n_label_tokens: int = 0
    token_lengths: list[int] = field(default_factory=list)
    char_lengths: list[int] = field(default_factory=list)
    examples: list[Example] = field(default_factory=list)
    text_chunks: list[tuple[int | None, list[int]]] = field(default_factory=list)
    previews: list[str] = field(default_factory=list)
    preview_labels: list[str] = field(default_factory=list)
    fallback_warned: bool = False
    no_label_reasons: Counter[str] = field(default_factory=Counter)


def _samples(cfg: DataConfig, scan: _Scan) -> Iterator[Sample]:
    path, problems = cfg.path, scan.problems
    if looks_like_dataset(path):  # a folder, or a dataset in the local Hugging Face caches
        yield from _dataset_samples(cfg, scan)
        return
    if not path.exists():
        problems.error(None, "file not found", "not_found")
        return
    if _blank(path):
        problems.error(None, "the file is empty", "empty_file")
        return
    container = container_of(path, cfg.format)
    if container is None:
        problems.error(None, f"unknown file type {path.suffix or '(no suffix)'!r} and the content is not "
                       "JSON; use .jsonl, .json, .csv, .tsv, .parquet or .txt, or pass --format txt "
                       "to read it as plain text", "unknown_format")
        return
    if container == "txt":
        if (not_text := not_text_problem(path)) is not None:
            problems.error(None, not_text, "not_text")  # once for the file, not once per line
            return
        if cfg.format not in ("auto", "txt", "text"):
            problems.error(None, f"{path.name} is plain text but --format {cfg.format} was given; use "
                           "--format txt, or a .jsonl/.csv file for records", "unknown_format")
            return
        scan.fmt = "txt"
        for chunk in iter_text_chunks(path, cfg.max_length * CHARS_PER_TOKEN, problems):
            scan.n_records += 1
            if chunk.text.strip():
                yield chunk
        return
    if cfg.format == "txt":
        problems.error(None, f"--format txt reads plain text files, but {path.name} is {container}",
                       "unknown_format")
        return
    if container != "parquet" and (not_text := not_text_problem(path)):
        problems.error(None, not_text, "not_text")  # once for the file, not once per line
        return
    state = ReadState(cfg.format)
    try:
        yield from iter_record_samples(path, container, cfg, problems, state)
    finally:
        scan.fmt, scan.n_records = state.format, state.n_records


def _dataset_samples(cfg: DataConfig, scan: _Scan) -> Iterator[Sample]:
    """Samples of a ``datasets`` folder, Parquet/Arrow folder or cached dataset (:mod:`.hf_datasets`)."""
    if cfg.format == "txt":
        scan.problems.error(None, f"--format txt reads plain text files, but {cfg.path} is a dataset folder",
                            "unknown_format")
        return
    state = ReadState(cfg.format)
    try:
        yield from iter_record_samples(cfg.path, "dataset", cfg, scan.problems, state)
    finally:
        scan.fmt, scan.n_records = state.format, state.n_records


def _blank(path: Path) -> bool:
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            if block.strip(b"\xef\xbb\xbf \t\r\n"):
                return False
    return True


def _template_for(sample: Sample, tokenizer: Any, scan: _Scan) -> str | None:
    if sample.kind != "chat" or has_chat_template(tokenizer):
        return None
    if not scan.fallback_warned:
        scan.problems.warn(None, "the tokenizer has no chat template; chat samples are rendered with the "
                           "simple '### User: / ### Assistant:' template. Prefer an instruct model whose "
                           "tokenizer has a chat template", "no_chat_template")
        scan.fallback_warned = True
    return FALLBACK_CHAT_TEMPLATE


def _take(sample: Sample, cfg: DataConfig, tokenizer: Any, scan: _Scan, keep: bool) -> bool:
    """Check and render one sample; returns whether it is usable."""
    problems = scan.problems
    if tokenizer is None:
        if cfg.train_on == "assistant" and not sample.has_target():
            scan.n_no_labels += 1
            scan.no_label_reasons["the samples have no assistant reply"] += 1
            problems.warn(sample.line, "no trainable label: the sample has no assistant reply; it is skipped",
                          "no_labels", item=sample.item)
            return False
        scan.char_lengths.append(sample.char_length())
        if len(scan.previews) < 3:
            scan.previews.append(sample.preview())
        return True
    try:
        rendered = render_sample(sample, tokenizer, _template_for(sample, tokenizer, scan), cfg.train_on,
                                 cfg.max_length)
    except TemplateFailure as exc:
        problems.error(sample.line, str(exc), "template_error", item=sample.item)
        return False
    if sample.chunked:  # plain text: re-cut by tokens after the pass, nothing is truncated
        scan.text_chunks.append((sample.line, rendered.input_ids))
        scan.char_lengths.append(sample.char_length())
        return True
    ex = truncate(rendered, cfg.max_length)
    n_labels = ex.n_label_tokens
    if n_labels == 0:
        scan.n_no_labels += 1
        reason = rendered.no_label_reason or (
            f"the reply starts after max_length ({cfg.max_length} tokens) and is cut off; raise "
            "--max-length or shorten the prompt")
        scan.no_label_reasons[reason] += 1
        problems.warn(sample.line, f"no trainable label: {reason}; the sample is skipped", "no_labels",
                      item=sample.item)
        return False
    full = len(rendered.input_ids)
    if rendered.clipped:  # only the beginning was tokenised (render.bound_sample)
        scan.n_truncated += 1
        problems.warn(sample.line, f"{sample.char_length()} characters, far more than max_length "
                      f"{cfg.max_length} tokens hold: truncated to the first {cfg.max_length} tokens",
                      "truncated", item=sample.item)
    elif full > cfg.max_length:
        scan.n_truncated += 1
        problems.warn(sample.line, f"{full} tokens > max_length {cfg.max_length}: truncated (the last "
                      f"{full - cfg.max_length} tokens are dropped)", "truncated", item=sample.item)
    scan.token_lengths.append(full)
    scan.char_lengths.append(sample.char_length())
    scan.n_label_tokens += n_labels
    if keep:
        scan.examples.append(ex)
    if len(scan.previews) < N_PREVIEWS:
        scan.previews.append(tokenizer.decode(list(ex.input_ids), skip_special_tokens=False))
        scan.preview_labels.append(label_text(tokenizer, ex))
    return True


def _scan(cfg: DataConfig, tokenizer: Any, keep: bool) -> tuple[DataReport, list[Example]]:
    scan = _Scan(ProblemLog(str(cfg.path)))
    n_ok = 0
    for sample in _samples(cfg, scan):
        if _take(sample, cfg, tokenizer, scan, keep):
            n_ok += 1
        if cfg.max_samples is not None and n_ok >= cfg.max_samples:
            break
    if scan.text_chunks:  # .txt with a tokenizer: pieces of max_length tokens, loss everywhere
        pieces = window_stream(scan.text_chunks, cfg.max_length)
        if cfg.max_samples is not None:
            pieces = pieces[:cfg.max_samples]
        scan.examples = [ex for _, ex in pieces] if keep else []
        scan.token_lengths = [len(ex) for _, ex in pieces]
        scan.n_label_tokens = sum(scan.token_lengths)
        n_ok = len(pieces)
        for _, ex in pieces[:N_PREVIEWS]:
            scan.previews.append(tokenizer.decode(list(ex.input_ids), skip_special_tokens=False))
            scan.preview_labels.append(label_text(tokenizer, ex))
    _final_checks(scan, n_ok)
    n_train, n_eval = split_sizes(n_ok, cfg.eval_fraction)
    report = DataReport(
        path=str(cfg.path), format=scan.fmt, n_records=scan.n_records, n_samples=n_ok,
        n_train=n_train, n_eval=n_eval,
        token_stats=LengthStats.of(scan.token_lengths, "tokens"),
        char_stats=LengthStats.of(scan.char_lengths, "chars"),
        n_truncated=scan.n_truncated, n_no_labels=scan.n_no_labels, n_label_tokens=scan.n_label_tokens,
        rendered_examples=scan.previews, rendered_labels=scan.preview_labels,
        problems=scan.problems.problems, fingerprint=fingerprint(cfg),
        tokenizer=getattr(tokenizer, "name_or_path", None) or (type(tokenizer).__name__ if tokenizer else None),
    )
    return report, scan.examples


def _final_checks(scan: _Scan, n_ok: int) -> None:
    problems = scan.problems
    if n_ok:
        return
    if scan.n_no_labels and not problems.counts.get("template_error"):
        why = scan.no_label_reasons.most_common(1)[0][0]
        problems.error(None, f"all {scan.n_no_labels} samples are left without a trainable label ({why}); "
                       f"training would show a flat, meaningless loss. Fix: {NO_LABEL_FIX}", "all_masked")
    elif scan.n_records == 0 and not problems.has_fatal:
        problems.error(None, "the file holds no records", "empty_file")
    elif not problems.has_fatal:
        problems.error(None, "no usable sample", "no_samples")


def inspect_dataset(cfg: DataConfig, tokenizer: Any = None) -> DataReport:
    """Read and check the whole dataset, render it if a tokenizer is given, and report.

    Without a tokenizer only the structure is checked and lengths are in characters. Never loads
    model weights.

    Args:
        cfg: the dataset and how to render it.
        tokenizer: the model's tokenizer (:func:`load_tokenizer`), or ``None``.

    Returns:
        The report; content problems are listed in ``report.problems``, never raised.
    """
    report, _ = _scan(cfg, tokenizer, keep=False)
    return report


def prepare_dataset(cfg: DataConfig, tokenizer: Any) -> PreparedData:
    """Render every sample, split train/eval with ``cfg.seed``, pack if asked.

    The split is taken over samples (before packing): ``n_eval = clamp(round(n·eval_fraction), 1, n−1)``
    for ``n ≥ 2`` and a positive fraction.

    Args:
        cfg: the dataset and how to render it.
        tokenizer: the model's tokenizer.

    Returns:
        Train and eval examples (ids and labels, ``-100`` where no loss) and the report.

    Raises:
        ConfigError: no tokenizer was given.
        DataError: one error listing every fatal problem (``error.report`` is the full report).
    """
    if tokenizer is None:
        raise ConfigError("prepare_dataset needs the model's tokenizer.", hint="use load_tokenizer(model_dir)")
    report, examples = _scan(cfg, tokenizer, keep=True)
    report.raise_if_fatal()
    train_idx, eval_idx = split_indices(len(examples), report.n_eval, cfg.seed)
    train = tuple(examples[i] for i in train_idx)
    evals = tuple(examples[i] for i in eval_idx)
    if cfg.packing:
        train, evals = pack(train, cfg.max_length), pack(evals, cfg.max_length)
    log.info("prepared %s: %d train and %d eval sequences", cfg.path, len(train), len(evals))
    return PreparedData(train, evals, report)
