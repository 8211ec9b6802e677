"""The run folder: a fixed layout that the app, the CLI and users rely on.

::

    RUN_DIR/manifest.json          stages done, input fingerprints, settings, versions, peaks
    RUN_DIR/emulator/              HF-style folder; compressed module M stored as M.u.weight,
                                   M.v.weight (and M.u.bias), plus emloc.json
    RUN_DIR/adapter/               the peft adapter as trained (original module names)
    RUN_DIR/adapter-corrected/     the peft adapter after LoRA correction
    RUN_DIR/merged/                the merged Hugging Face model folder
    RUN_DIR/model.gguf             the GGUF export
    RUN_DIR/checkpoints/           training checkpoints (resume)
    RUN_DIR/cache/                 calibration statistics and other resumable intermediates
    RUN_DIR/logs/emloc.log         the engine's log for this run
    RUN_DIR/tensorboard/           every logged metric: TensorBoard event files and metrics.jsonl
    RUN_DIR/prompts.json           the Try page's conversation settings and prompts (the app's)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    """Paths inside one run folder. Pure path arithmetic; nothing is created here."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def emulator(self) -> Path:
        return self.root / "emulator"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def adapter_corrected(self) -> Path:
        return self.root / "adapter-corrected"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def gguf(self) -> Path:
        return self.root / "model.gguf"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def log_file(self) -> Path:
        return self.logs / "emloc.log"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def prompts(self) -> Path:
        return self.root / "prompts.json"
