"""Image datasets end to end: check (no model), render with the model's processor, split.

The counterpart of :mod:`emloc_engine.data.pipeline` for conversations with images
(:mod:`emloc_engine.data.images`): the same :class:`~emloc_engine.data.validation.DataReport`, the
same seeded train/eval split (:func:`~emloc_engine.data.render.split_indices`), no packing (each
sequence keeps its own images).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from emloc_engine.core.errors import ConfigError
from emloc_engine.data.config import DataConfig
from emloc_engine.data.images import (
    TemplateFailure,
    VisionExample,
    iter_vision_samples,
    render_vision_sample,
)
from emloc_engine.data.pipeline import fingerprint
from emloc_engine.data.render import IGNORE_INDEX, split_indices
from emloc_engine.data.validation import NO_LABEL_FIX, DataReport, LengthStats, ProblemLog, split_sizes

log = logging.getLogger(__name__)

N_PREVIEWS = 3
FORMAT_NAME = "vision-chat"


@dataclass(frozen=True)
class PreparedVisionData:
    """Examples with images, split, and the report."""

    train: tuple[VisionExample, ...]
    eval: tuple[VisionExample, ...]
    report: DataReport


def _scan(cfg: DataConfig, processor: Any) -> tuple[DataReport, list[VisionExample]]:
    if not cfg.path.is_file():
        problems = ProblemLog(str(cfg.path))
        problems.error(None, f"file not found: {cfg.path}", "not_found")
        return _report(cfg, problems, 0, [], [], [], [], 0, processor), []
    problems = ProblemLog(str(cfg.path))
    examples: list[VisionExample] = []
    n_records = n_no_labels = 0
    char_lengths: list[int] = []
    previews: list[str] = []
    labels_preview: list[str] = []
    reasons: Counter[str] = Counter()
    for sample in iter_vision_samples(cfg, problems):
        n_records += 1
        char_lengths.append(len(sample.preview()))
        if processor is None:
            if len(previews) < N_PREVIEWS:
                previews.append(sample.preview())
            continue
        try:
            ex, why = render_vision_sample(sample, processor, cfg.train_on, cfg.max_length)
        except TemplateFailure as exc:
            problems.error(sample.line, str(exc), "template_error", item=sample.item)
            continue
        if ex is None:
            n_no_labels += 1
            reasons[why] += 1
            problems.warn(sample.line, f"skipped: {why}", "no_labels", item=sample.item)
            continue
        examples.append(ex)
        if len(previews) < N_PREVIEWS:
            previews.append(ex.text)
            labels_preview.append(processor.tokenizer.decode([t for t in ex.labels if t != IGNORE_INDEX]))
    n_ok = len(examples) if processor is not None else len(char_lengths)
    if not n_ok and not problems.has_fatal:
        if n_no_labels:
            why = reasons.most_common(1)[0][0]
            problems.error(
                None,
                f"all {n_no_labels} samples are left without a trainable label ({why}). Fix: {NO_LABEL_FIX}",
                "all_masked",
            )
        else:
            problems.error(None, "no usable sample", "no_samples")
    report = _report(
        cfg, problems, n_records, examples, char_lengths, previews, labels_preview, n_no_labels, processor
    )
    return report, examples


def _report(
    cfg: DataConfig,
    problems: ProblemLog,
    n_records: int,
    examples: list[VisionExample],
    char_lengths: list[int],
    previews: list[str],
    labels_preview: list[str],
    n_no_labels: int,
    processor: Any,
) -> DataReport:
    n_ok = len(examples) if processor is not None else len(char_lengths)
    n_train, n_eval = split_sizes(n_ok, cfg.eval_fraction)
    return DataReport(
        path=str(cfg.path),
        format=FORMAT_NAME,
        n_records=n_records,
        n_samples=n_ok,
        n_train=n_train,
        n_eval=n_eval,
        token_stats=LengthStats.of([len(e) for e in examples], "tokens"),
        char_stats=LengthStats.of(char_lengths, "chars"),
        n_truncated=0,
        n_no_labels=n_no_labels,
        n_label_tokens=sum(e.n_label_tokens for e in examples),
        rendered_examples=previews,
        rendered_labels=labels_preview,
        problems=problems.problems,
        fingerprint=fingerprint(cfg) if cfg.path.is_file() else "",
        tokenizer=type(processor).__name__ if processor is not None else None,
    )


def inspect_vision_dataset(cfg: DataConfig, processor: Any = None) -> DataReport:
    """Check every record and image (and render them when a processor is given); never raises for content.

    Args:
        cfg: the dataset (``format``/``column_map`` as for text; ``packing`` is ignored).
        processor: the model's processor (:func:`emloc_engine.vision.processor.load_processor`) or None.

    Returns:
        The report; every bad record, image and placeholder/image count mismatch at its ``file:line``.
    """
    return _scan(cfg, processor)[0]


def prepare_vision_dataset(cfg: DataConfig, processor: Any) -> PreparedVisionData:
    """Render every sample with the processor and split train/eval with ``cfg.seed``.

    Raises:
        ConfigError: no processor.
        DataError: one error listing every fatal problem (``error.report`` is the report).
    """
    if processor is None:
        raise ConfigError(
            "prepare_vision_dataset needs the model's processor.",
            hint="use emloc_engine.vision.processor.load_processor(model_dir)",
        )
    report, examples = _scan(cfg, processor)
    report.raise_if_fatal()
    train_idx, eval_idx = split_indices(len(examples), report.n_eval, cfg.seed)
    train = tuple(examples[i] for i in train_idx)
    evals = tuple(examples[i] for i in eval_idx)
    log.info("prepared %s: %d train and %d eval examples with images", cfg.path, len(train), len(evals))
    return PreparedVisionData(train, evals, report)


__all__ = ["PreparedVisionData", "inspect_vision_dataset", "prepare_vision_dataset"]
