"""Conversations with images: reading, checking (before any model loads) and rendering with a processor.

Record formats (the container readers of :mod:`emloc_engine.data.formats` are reused: ``.jsonl``,
``.json``, ``.csv``/``.tsv``, ``.parquet``):

* ``messages`` with content parts — ``{"messages": [{"role": "user", "content": [{"type": "image",
  "image": "cat.jpg"}, {"type": "text", "text": "What is this?"}]}, {"role": "assistant",
  "content": "A cat."}]}``; an image part may name its file with ``image``, ``path`` or ``url``
  (a local path; ``file://`` is stripped).
* LLaVA / ShareGPT — ``{"image": "cat.jpg", "conversations": [{"from": "human", "value":
  "<image>\\nWhat is this?"}, {"from": "gpt", "value": "A cat."}]}``; ``image`` may be a list
  (``images`` too), and ``messages`` with string contents and a top-level ``images`` list work the
  same (LLaMA-Factory's layout). Each ``<image>`` placeholder takes the next image, in order; a
  record whose placeholders and images differ in number is an error. Without any placeholder the
  images go before the first user message's text (LLaVA's own convention for a single image).
* A table (CSV/TSV/Parquet/JSON records) with an image-path column ``image`` (or ``image_path``,
  ``file_name``) and question/answer columns (``question``/``prompt``/``query``/``instruction``
  → user, ``answer``/``response``/``output``/``completion`` → assistant), or a ``messages`` /
  ``conversations`` cell holding the JSON list.

Image paths are relative to the data file's folder (absolute paths are kept). Every image is
checked at read time (:func:`check_image`): missing, unreadable (not an image, truncated) or
oversized (more than :data:`MAX_IMAGE_BYTES` bytes or :data:`MAX_IMAGE_PIXELS` pixels) images are
errors at the record's ``file:line``, all listed at once.

Rendering (:func:`render_vision_sample`): the conversation is rendered with the model's chat
template turn by turn exactly as for text (loss on assistant replies only, or ``train_on="all"``),
where every image part becomes the family's placeholder; the processor then expands each
placeholder into the image's tokens, and the labels follow the expansion (image tokens never carry
loss). A sample longer than ``max_length`` is cut after its last image; one whose images do not
fit in ``max_length`` is skipped with a warning (cutting through an image would break the model's
image/token count check).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from emloc_engine.data.config import DataConfig
from emloc_engine.data.formats import ROLE_ALIASES, Sample, container_of, iter_records
from emloc_engine.data.render import IGNORE_INDEX, TemplateFailure, render_chat
from emloc_engine.data.validation import ProblemLog

IMAGE_TOKEN = "<image>"
"""The placeholder of LLaVA/ShareGPT-style records."""
MAX_IMAGE_BYTES = 64 * 2**20
"""Largest image file accepted (64 MiB)."""
MAX_IMAGE_PIXELS = 64 * 2**20
"""Largest image accepted, in pixels (about 8k × 8k); bigger ones are decompression-bomb sized."""
_IMAGE_COLUMNS = ("image", "images", "image_path", "file_name")
_USER_COLUMNS = ("question", "prompt", "query", "instruction")
_ASSISTANT_COLUMNS = ("answer", "response", "output", "completion")


@dataclass(frozen=True, eq=False)
class VisionSample:
    """A conversation whose messages hold ``{"type": "text"|"image"}`` parts, and its image files."""

    line: int | None
    item: int | None
    messages: tuple[dict[str, Any], ...]
    images: tuple[Path, ...]

    def preview(self) -> str:
        """``role: text`` per message, each image as ``[image: name]``."""
        out = []
        for m in self.messages:
            parts = [
                f"[image: {p['path'].name}]" if p["type"] == "image" else p["text"] for p in m["content"]
            ]
            out.append(f"{m['role']}: {' '.join(parts)}")
        return "\n".join(out)


def record_has_images(fields: dict[str, Any]) -> bool:
    """Whether a record (after the column map) is an image record of one of the formats above."""
    if any(fields.get(c) for c in _IMAGE_COLUMNS):
        return True
    msgs = fields.get("messages")
    if isinstance(msgs, list):
        for m in msgs:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list) and any(
                isinstance(p, dict) and p.get("type") == "image" for p in content
            ):
                return True
    return False


def is_image_dataset(cfg: DataConfig) -> bool:
    """Whether the dataset's first readable record holds images (reads one record)."""
    container = container_of(cfg.path, cfg.format) if cfg.path.is_file() else None
    if container in (None, "txt"):
        return False
    log = ProblemLog(str(cfg.path))
    for _, _, obj in iter_records(cfg.path, str(container), log):
        return record_has_images(_mapped(obj, cfg))
    return False


def _mapped(obj: dict[str, Any], cfg: DataConfig) -> dict[str, Any]:
    return {**obj, **{canonical: obj[col] for canonical, col in cfg.column_map if col in obj}}


# -- images ---------------------------------------------------------------------------------------------
def check_image(path: Path) -> str | None:
    """What is wrong with an image file, or None. Reads the header and decodes the image once."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return f"image not found: {path}"
    size = path.stat().st_size
    if size > MAX_IMAGE_BYTES:
        return f"image too large: {path} is {size / 2**20:.0f} MiB (at most {MAX_IMAGE_BYTES // 2**20} MiB)"
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                return f"image too large: {path} is {w}×{h} pixels (at most {MAX_IMAGE_PIXELS // 2**20} Mpx)"
            img.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        return f"image unreadable: {path} ({type(exc).__name__}: {exc})"
    return None


def load_image(path: Path) -> Any:
    """The image as an RGB ``PIL.Image`` (already checked by :func:`check_image`)."""
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")


def _resolve(base: Path, value: Any) -> Path | None:
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip().removeprefix("file://")
    p = Path(text).expanduser()
    return p if p.is_absolute() else base / p


# -- records --------------------------------------------------------------------------------------------
class _Bad(Exception):
    pass


def _paths(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _text_parts(text: str, images: list[Path], used: list[int]) -> list[dict[str, Any]]:
    """Split ``text`` at ``<image>`` placeholders; each takes the next image."""
    parts: list[dict[str, Any]] = []
    pieces = text.split(IMAGE_TOKEN)
    for k, piece in enumerate(pieces):
        if k:
            if used[0] < len(images):
                parts.append({"type": "image", "path": images[used[0]]})
            used[0] += 1
        if piece.strip():
            parts.append({"type": "text", "text": piece.strip("\n") if k else piece.rstrip("\n")})
    return parts


def _content_parts(content: Any, base: Path) -> tuple[list[dict[str, Any]], list[Path]]:
    parts: list[dict[str, Any]] = []
    found: list[Path] = []
    for p in content:
        if not isinstance(p, dict) or p.get("type") not in ("text", "image"):
            raise _Bad(
                "a content part must be {'type': 'text', 'text': ...} or {'type': 'image', 'image': PATH}"
            )
        if p["type"] == "text":
            if not isinstance(p.get("text"), str):
                raise _Bad("a text part needs a string 'text'")
            parts.append({"type": "text", "text": p["text"]})
        else:
            path = _resolve(base, p.get("image") or p.get("path") or p.get("url"))
            if path is None:
                raise _Bad("an image part needs the image's file path in 'image' (or 'path')")
            parts.append({"type": "image", "path": path})
            found.append(path)
    return parts, found


def _turns(obj: dict[str, Any]) -> list[tuple[str, Any]]:
    if isinstance(obj.get("messages"), list):
        raw, role_key, text_key = obj["messages"], "role", "content"
    elif isinstance(obj.get("conversations"), list):
        raw, role_key, text_key = obj["conversations"], "from", "value"
    else:
        user = next((obj[c] for c in _USER_COLUMNS if isinstance(obj.get(c), str)), None)
        answer = next((obj[c] for c in _ASSISTANT_COLUMNS if isinstance(obj.get(c), (str, int, float))), None)
        if user is None or answer is None:
            raise _Bad(
                f"no conversation: give messages/conversations, or a question ({'/'.join(_USER_COLUMNS)}) "
                f"and an answer ({'/'.join(_ASSISTANT_COLUMNS)}) column"
            )
        return [("user", user), ("assistant", str(answer))]
    turns = []
    for m in raw:
        if not isinstance(m, dict):
            raise _Bad("every message must be an object")
        role = ROLE_ALIASES.get(str(m.get(role_key, m.get("role", ""))).lower())
        if role is None:
            raise _Bad(f"unknown role {m.get(role_key)!r}")
        turns.append((role, m.get(text_key, m.get("content"))))
    return turns


def parse_vision_record(
    obj: dict[str, Any], base: Path
) -> tuple[tuple[dict[str, Any], ...], tuple[Path, ...]]:
    """Messages with ``text``/``image`` parts and the images in order, from one record.

    Raises:
        _Bad: the record is malformed or its placeholders and images differ in number.
    """
    listed = [
        _resolve(base, v)
        for v in _paths(obj.get("images", obj.get("image") or obj.get("image_path") or obj.get("file_name")))
    ]
    if any(p is None for p in listed):
        raise _Bad("an image entry is not a file path")
    images: list[Path] = [p for p in listed if p is not None]
    used = [0]
    messages: list[dict[str, Any]] = []
    inline: list[Path] = []
    for role, content in _turns(obj):
        if isinstance(content, list):
            parts, found = _content_parts(content, base)
            inline += found
        elif isinstance(content, str):
            parts = _text_parts(content, images, used)
        else:
            raise _Bad(f"a {role} message has no text content")
        messages.append({"role": role, "content": parts})
    if used[0] != len(images) and used[0]:
        raise _Bad(f"{used[0]} {IMAGE_TOKEN} placeholder(s) but {len(images)} image(s)")
    if images and not used[0]:  # no placeholder: the images lead the first user message
        first = next((m for m in messages if m["role"] == "user"), None)
        if first is None:
            raise _Bad("images but no user message to attach them to")
        first["content"] = [{"type": "image", "path": p} for p in images] + first["content"]
    all_images = tuple(images + inline)
    if not any(m["role"] == "assistant" for m in messages):
        raise _Bad("the conversation has no assistant reply to learn from")
    return tuple(messages), all_images


def iter_vision_samples(cfg: DataConfig, problems: ProblemLog) -> Iterator[VisionSample]:
    """Every sample of an image dataset; malformed records and bad images go to ``problems`` (fatal)."""
    container = container_of(cfg.path, cfg.format)
    if container in (None, "txt"):
        problems.error(
            None, "an image dataset must be .jsonl, .json, .csv, .tsv or .parquet", "unknown_format"
        )
        return
    base = cfg.path.resolve().parent
    n = 0
    for line, item, obj in iter_records(cfg.path, str(container), problems):
        try:
            messages, images = parse_vision_record(_mapped(obj, cfg), base)
        except _Bad as exc:
            problems.error(line, str(exc), "bad_image_record", item=item)
            continue
        bad = [msg for msg in (check_image(p) for p in images) if msg]
        for msg in bad:
            problems.error(line, msg, "bad_image", item=item)
        if not bad:
            yield VisionSample(line, item, messages, images)
        n += 1
        if cfg.max_samples is not None and n >= cfg.max_samples:
            return


def preview_images(cfg: DataConfig, n: int) -> tuple[tuple[Path, ...], ...]:
    """The image files of the first ``n`` usable samples (for previews beside the conversations)."""
    out: list[tuple[Path, ...]] = []
    for sample in iter_vision_samples(cfg, ProblemLog(str(cfg.path))):
        out.append(sample.images)
        if len(out) >= n:
            break
    return tuple(out)


# -- rendering ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VisionExample:
    """One training sequence with images: the processor's ids, labels of the same length, the inputs."""

    text: str
    images: tuple[Path, ...]
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    line: int | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_label_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def template_messages(sample: VisionSample) -> list[dict[str, Any]]:
    """The messages as chat templates expect them (image parts carry no data, the processor adds it)."""
    return [
        {
            "role": m["role"],
            "content": [{"type": "image"} if p["type"] == "image" else p for p in m["content"]],
        }
        for m in sample.messages
    ]


def _align(labels: list[int], short: list[int], long: list[int]) -> list[int]:
    """Labels of ``short`` carried onto ``long`` (``short`` with each placeholder expanded): matched
    tokens keep their label, inserted (image) tokens get none."""
    out = [IGNORE_INDEX] * len(long)
    matcher = difflib.SequenceMatcher(None, short, long, autojunk=False)
    for a, b, size in matcher.get_matching_blocks():
        out[b : b + size] = labels[a : a + size]
    return out


def processor_inputs(processor: Any, texts: list[str], images: list[list[Path]]) -> Any:
    """The processor's tensors for rendered texts and their images (``return_tensors="pt"``)."""
    flat = [load_image(p) for imgs in images for p in imgs]
    kwargs: dict[str, Any] = {"images": flat} if flat else {}
    if flat and type(processor).__name__.startswith(("Idefics3", "SmolVLM", "LlavaOnevision")):
        kwargs["images"] = [[load_image(p) for p in imgs] for imgs in images]  # nested per sample
    # the rendered text already holds the template's special tokens (BOS included)
    return processor(text=texts, return_tensors="pt", padding=True, add_special_tokens=False, **kwargs)


def render_vision_sample(
    sample: VisionSample, processor: Any, train_on: str, max_length: int
) -> tuple[VisionExample | None, str]:
    """The sample as the model sees it, or ``(None, why)`` when it cannot be trained on.

    Raises:
        TemplateFailure: the chat template refused the conversation.
    """
    tok = processor.tokenizer
    flat = Sample(kind="chat", line=sample.line, item=sample.item, messages=tuple(template_messages(sample)))
    rendered = render_chat(flat, tok, processor.chat_template, train_on)
    if rendered.no_label_reason:
        return None, rendered.no_label_reason
    text = str(
        tok.apply_chat_template(
            template_messages(sample), chat_template=processor.chat_template, tokenize=False
        )
    )
    ids = processor_inputs(processor, [text], [list(sample.images)])["input_ids"][0].tolist()
    labels = _align(rendered.labels, rendered.input_ids, ids)
    if len(ids) > max_length:
        image_ids = set(ids) - set(rendered.input_ids)
        last_image = max((i for i, t in enumerate(ids) if t in image_ids), default=-1)
        if last_image >= max_length:
            return None, (
                f"its images alone take {last_image + 1} tokens, more than max_length {max_length}; "
                "raise max_length or use smaller images"
            )
        ids, labels = ids[:max_length], labels[:max_length]
    if all(t == IGNORE_INDEX for t in labels):
        return None, "no assistant token left within max_length"
    return VisionExample(text, sample.images, tuple(ids), tuple(labels), sample.line), ""


def truncated(example: VisionExample, max_length: int) -> VisionExample:
    """``example`` cut to ``max_length`` tokens (callers check that no image is cut)."""
    return replace(example, input_ids=example.input_ids[:max_length], labels=example.labels[:max_length])


__all__ = [
    "IMAGE_TOKEN",
    "MAX_IMAGE_BYTES",
    "MAX_IMAGE_PIXELS",
    "TemplateFailure",
    "VisionExample",
    "VisionSample",
    "check_image",
    "is_image_dataset",
    "iter_vision_samples",
    "load_image",
    "parse_vision_record",
    "preview_images",
    "processor_inputs",
    "record_has_images",
    "render_vision_sample",
    "template_messages",
]
