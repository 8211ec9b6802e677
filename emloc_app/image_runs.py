"""Opening an image run folder (``emloc image`` writes ``RUN/image_run.json``, not ``manifest.json``).

``emloc-studio --run-dir RUN`` on such a folder opens the gallery: the run's sample images and the
export. The state gets the run's pipeline (for a single-file checkpoint the file as ``model_dir`` and
the pipeline folder that holds its configs, text encoders and VAE as ``config_dir``, as the Model page
leaves them), its photo folder and trigger word.
"""

from __future__ import annotations

import json
from pathlib import Path

from emloc_app.state import WizardState
from emloc_engine.images.options import RUN_SETTINGS as IMAGE_RUN_SETTINGS


def is_image_run(run_dir: Path) -> bool:
    return (Path(run_dir) / IMAGE_RUN_SETTINGS).is_file()


def image_state_from_run_dir(run_dir: Path) -> WizardState:
    """The wizard's state for an image run folder, read from its ``image_run.json``.

    Raises:
        RunStateError: the file is unreadable.
    """
    from emloc_engine.core.errors import RunStateError

    try:
        recorded = json.loads((Path(run_dir) / IMAGE_RUN_SETTINGS).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunStateError(f"{run_dir / IMAGE_RUN_SETTINGS} cannot be read: {exc}",
                            hint="Start the run again with `emloc image` into a new folder.") from exc

    def path(key: str) -> Path | None:
        value = recorded.get(key)
        return Path(value) if value not in (None, "", "None") else None

    pipeline, config_dir = path("pipeline_dir"), path("config_dir")
    if pipeline is not None and pipeline.is_dir():
        config_dir = None  # emloc image ignores --config-dir for a pipeline folder
    state = WizardState(run_dir=Path(run_dir), model_dir=pipeline, config_dir=config_dir,
                        image_folder=path("images_dir"))
    state.image_trigger = str(recorded.get("trigger", ""))
    prompt = recorded.get("prompt")
    state.image_prompt = "" if prompt in (None, "None") else str(prompt)
    return state
