"""``RUN_DIR/prompts.json``: the Try page's prompts and chat settings, kept with the run they were asked of.

Reopening a run (or another session on it) offers the same prompts and the same system prompt,
temperature, top-p and max tokens, so answers before and after another training run can be compared::

    {"schema": 1, "system_prompt": "", "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 256,
     "prompts": ["oldest", ..., "newest"]}

At most :data:`MAX_PROMPTS` prompts are kept (a prompt asked again moves to the end). A missing or
unreadable file gives the defaults; the file is written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from emloc_app.generation import ChatSettings
from emloc_engine.core.atomic import write_json_atomic
from emloc_engine.core.layout import RunLayout

log = logging.getLogger(__name__)

MAX_PROMPTS = 50
SCHEMA = 1


@dataclass(frozen=True)
class SavedPrompts:
    settings: ChatSettings = field(default_factory=ChatSettings)
    prompts: tuple[str, ...] = ()

    def with_prompt(self, prompt: str) -> SavedPrompts:
        """These prompts with ``prompt`` (moved) at the end, at most :data:`MAX_PROMPTS`."""
        kept = (*(p for p in self.prompts if p != prompt), prompt)
        return dataclasses.replace(self, prompts=kept[-MAX_PROMPTS:])


def load_prompts(run_dir: Path) -> SavedPrompts:
    """The run's saved prompts and settings (the defaults when there are none or the file is unreadable)."""
    path = RunLayout(Path(run_dir)).prompts
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return SavedPrompts()
    except (OSError, ValueError) as exc:
        log.warning("Ignoring the saved prompts %s: %s", path, exc)
        return SavedPrompts()
    if not isinstance(data, dict):
        return SavedPrompts()
    defaults = ChatSettings()
    values = {}
    for f in dataclasses.fields(ChatSettings):
        default = getattr(defaults, f.name)
        value = data.get(f.name, default)
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        values[f.name] = value if type(value) is type(default) else default
    prompts = tuple(p for p in data.get("prompts") or [] if isinstance(p, str) and p.strip())
    return SavedPrompts(ChatSettings(**values), prompts[-MAX_PROMPTS:])


def save_prompts(run_dir: Path, saved: SavedPrompts) -> None:
    """Write ``RUN_DIR/prompts.json`` (atomically)."""
    data = {"schema": SCHEMA, **dataclasses.asdict(saved.settings), "prompts": list(saved.prompts)}
    write_json_atomic(RunLayout(Path(run_dir)).prompts, data)
