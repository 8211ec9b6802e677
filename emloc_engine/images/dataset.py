"""An image folder for DreamBooth-style personalisation: images, captions, and what is wrong with them.

``scan_image_folder(ImageFolderConfig(folder, trigger="sks"))`` -> :class:`ImageFolderReport`.

What counts as the dataset:

* every file directly in ``folder`` (sub-folders are ignored) whose suffix is one of
  :data:`IMAGE_SUFFIXES`, in name order;
* its caption, by ``caption_mode``:
  ``"files"`` — the same-name ``.txt`` beside it (``cat.jpg`` -> ``cat.txt``; whitespace trimmed,
  lines joined by spaces); a missing or empty caption is a problem;
  ``"files-or-prompt"`` (default) — the ``.txt`` when there is one, else ``prompt``;
  ``"prompt"`` — ``prompt`` for every image (``.txt`` files ignored).
* the trigger word: when ``trigger`` is set and a caption does not contain it (whole word,
  case-sensitive), it is put in front (``"sks, a dog on grass"``), as kohya's ``keep_tokens`` /
  the diffusers DreamBooth scripts expect the instance token in every prompt. When neither a
  prompt nor captions are given the caption is the trigger alone (``prompt`` defaults to
  ``"a photo of {trigger}"`` in the run settings).

Problems (:class:`ImageProblem`: file, message, fix) never stop the scan: ``report.ok`` is False
when any is an error; the items list holds only usable images. Problems: unreadable (not an
image, truncated, unsupported format), too small (short side < ``min_side_px``, default 256),
missing/empty caption in ``"files"`` mode, a ``.txt`` caption without an image (a warning:
probably a renamed image), and an empty folder. Image sizes come from the file header plus a full
decode (``verify`` + ``load``) so truncated files are caught here, not mid-training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from emloc_engine.core.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CaptionMode = Literal["files", "files-or-prompt", "prompt"]
CAPTION_MODES: tuple[CaptionMode, ...] = ("files", "files-or-prompt", "prompt")


@dataclass(frozen=True)
class ImageFolderConfig:
    folder: Path = field(
        metadata={"help": "Folder of the subject's images (PNG/JPEG/WebP/BMP), captions beside them as .txt."}
    )
    trigger: str = field(
        default="",
        metadata={
            "help": "The made-up word that names the subject (e.g. 'sks'); added to every caption that lacks it."
        },
    )
    prompt: str = field(
        default="",
        metadata={
            "help": "One caption for every image without its own .txt (or for all images in 'prompt' mode)."
        },
    )
    caption_mode: CaptionMode = field(
        default="files-or-prompt",
        metadata={
            "help": "Where captions come from: 'files' (.txt beside each image, required), 'files-or-prompt' (.txt, else the prompt) or 'prompt' (the prompt for all)."
        },
    )
    min_side_px: int = field(
        default=256,
        metadata={"help": "Images whose shorter side is below this many pixels are reported as too small."},
    )

    def __post_init__(self) -> None:
        if self.caption_mode not in CAPTION_MODES:
            raise ConfigError(
                f"caption_mode must be one of {', '.join(CAPTION_MODES)} (got {self.caption_mode!r})."
            )
        if self.min_side_px < 1:
            raise ConfigError(f"min_side_px must be at least 1 (got {self.min_side_px}).")
        if self.trigger and not re.fullmatch(r"\S+", self.trigger):
            raise ConfigError(f"The trigger must be one word without spaces (got {self.trigger!r}).")


@dataclass(frozen=True)
class ImageItem:
    """One usable image: its file, final caption (trigger included) and pixel size."""

    path: Path
    caption: str
    width: int
    height: int


@dataclass(frozen=True)
class ImageProblem:
    """Something wrong with one file; ``severity`` "error" makes the dataset unusable as is."""

    path: Path
    message: str
    fix: str
    severity: Literal["error", "warning"] = "error"

    def line(self) -> str:
        return f"{self.path.name}: {self.message} Fix: {self.fix}"


@dataclass(frozen=True)
class ImageFolderReport:
    folder: Path
    items: tuple[ImageItem, ...]
    problems: tuple[ImageProblem, ...]

    @property
    def ok(self) -> bool:
        """True when there is at least one image and no problem is an error."""
        return bool(self.items) and not any(p.severity == "error" for p in self.problems)

    def raise_if_unusable(self) -> None:
        """Raise :class:`DataError` listing every error (warnings are not listed)."""
        if self.ok:
            return
        errors = [p.line() for p in self.problems if p.severity == "error"]
        raise DataError(f"The image folder {self.folder} cannot be used as is.", problems=errors)


def scan_image_folder(cfg: ImageFolderConfig) -> ImageFolderReport:
    """Read every image of ``cfg.folder`` (header and full decode) and its caption; report problems."""
    folder = Path(cfg.folder)
    if not folder.is_dir():
        raise DataError(
            f"The image folder {folder} does not exist or is not a folder.",
            hint="Choose the folder that holds your subject's photos.",
        )
    files = sorted(p for p in folder.iterdir() if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    items: list[ImageItem] = []
    problems: list[ImageProblem] = []
    for path in images:
        size = _read_size(path, problems)
        if size is None:
            continue
        w, h = size
        if min(w, h) < cfg.min_side_px:
            problems.append(
                ImageProblem(
                    path,
                    f"is {w}x{h} pixels, smaller than {cfg.min_side_px} on its short side.",
                    f"use a larger photo (at least {cfg.min_side_px} px on the short side) or remove it.",
                )
            )
            continue
        caption = _caption(path, cfg, problems)
        if caption is None:
            continue
        items.append(ImageItem(path=path, caption=caption, width=w, height=h))
    stems = {p.stem for p in images}
    for txt in (p for p in files if p.suffix.lower() == ".txt" and p.stem not in stems):
        problems.append(
            ImageProblem(
                txt,
                "is a caption without an image of the same name.",
                "rename it like its image (cat.jpg -> cat.txt) or delete it.",
                "warning",
            )
        )
    if not images:
        problems.append(
            ImageProblem(
                folder,
                "holds no image.",
                f"put your photos ({', '.join(IMAGE_SUFFIXES)}) directly in this folder.",
            )
        )
    return ImageFolderReport(folder=folder, items=tuple(items), problems=tuple(problems))


def _read_size(path: Path, problems: list[ImageProblem]) -> tuple[int, int] | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            size = img.size
            img.verify()
        with Image.open(path) as img:
            img.load()  # verify() misses truncated pixel data; a full decode does not
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        problems.append(
            ImageProblem(
                path, f"cannot be read as an image ({exc}).", "re-save it as PNG or JPEG, or remove it."
            )
        )
        return None
    return int(size[0]), int(size[1])


def _caption(path: Path, cfg: ImageFolderConfig, problems: list[ImageProblem]) -> str | None:
    txt = path.with_suffix(".txt")
    text = ""
    if cfg.caption_mode != "prompt" and txt.is_file():
        try:
            text = " ".join(txt.read_text(encoding="utf-8").split())
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(
                ImageProblem(txt, f"cannot be read as UTF-8 text ({exc}).", "re-save it as UTF-8.")
            )
            return None
    if not text and cfg.caption_mode == "files":
        problems.append(
            ImageProblem(
                path,
                f"has no caption ({txt.name} is missing or empty).",
                f"write {txt.name} beside it, or switch captions to 'files-or-prompt' with one prompt for all.",
            )
        )
        return None
    if not text:
        text = cfg.prompt.strip()
    return add_trigger(text, cfg.trigger)


def add_trigger(caption: str, trigger: str) -> str:
    """``caption`` with ``trigger`` in front unless it already holds it as a whole word."""
    if not trigger:
        return caption
    if not caption:
        return trigger
    if re.search(rf"(?<!\S){re.escape(trigger)}(?=[\s,.;:!?]|$)", caption):
        return caption
    return f"{trigger}, {caption}"
