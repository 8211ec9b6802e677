"""A vision-language model's processor (tokenizer + image processor + chat template), offline.

:func:`load_processor` is ``AutoProcessor.from_pretrained(folder, local_files_only=True)`` with one
difference: without torchvision, transformers cannot build the *video* processor that Qwen2-VL,
InternVL, SmolVLM and LLaVA-OneVision processors declare, and refuses the whole processor. We train
on images only, so we then load the processor without its video part (images and text work the
same; the image processors fall back to their PIL implementations). Decision: torchvision stays
optional, because its wheels must match the installed torch build exactly (a CUDA-built torchvision
next to a CPU torch fails at import).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

from emloc_engine.core.errors import ModelNotFound

log = logging.getLogger(__name__)

PROCESSOR_FILES = (
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "chat_template.jinja",
    "chat_template.json",
)
"""Processor files a merged export copies next to the tokenizer's (those present in the source)."""


@functools.cache
def _without_video(cls: Any) -> Any:
    """``cls`` with no video attribute: ``get_attributes`` drops it, so nothing tries to build one."""

    def get_attributes(klass: Any) -> list[str]:
        return [a for a in cls.get_attributes() if "video" not in a]

    return type(cls.__name__, (cls,), {"get_attributes": classmethod(get_attributes)})


def _processor_class_name(model_dir: Path) -> str | None:
    for name in ("processor_config.json", "preprocessor_config.json"):
        f = model_dir / name
        if f.is_file():
            data = json.loads(f.read_text(encoding="utf-8"))
            if isinstance(data.get("processor_class"), str):
                return str(data["processor_class"])
    return None


def load_processor(model_dir: Path) -> Any:
    """The model's processor from a local folder (no network).

    Args:
        model_dir: a model folder with its processor files.

    Returns:
        A transformers ``ProcessorMixin`` (with ``video_processor = None`` when torchvision is absent).

    Raises:
        ModelNotFound: the folder has no usable processor (names the folder and the cause).
    """
    from transformers import AutoProcessor
    from transformers.utils.import_utils import is_torchvision_available

    model_dir = Path(model_dir)
    try:
        if is_torchvision_available():
            return AutoProcessor.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
        from transformers.models.auto.processing_auto import processor_class_from_name

        name = _processor_class_name(model_dir)
        if name is None:
            return AutoProcessor.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
        cls: Any = processor_class_from_name(name)
        if cls is None:
            raise ValueError(f"unknown processor class {name}")
        if any("video" in a for a in cls.get_attributes()):
            log.info("torchvision is not installed: loading %s without its video processor", name)
            cls = _without_video(cls)
            # video_processor=None reaches __init__ (SmolVLM's requires the argument)
            return cls.from_pretrained(model_dir, local_files_only=True, video_processor=None)
        return cls.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError) as exc:
        raise ModelNotFound(
            f"Cannot load the processor of {model_dir}: {exc}",
            hint="A vision-language model folder needs its processor files "
            "(preprocessor_config.json, tokenizer, chat template).",
        ) from exc


def save_processor_parts(processor: Any, folder: Path) -> None:
    """Write a processor's files into ``folder`` without needing its video part (used by test models).

    Writes the tokenizer, the image processor, ``chat_template.jinja`` and ``processor_config.json``
    (the processor class and its own settings such as ``image_seq_length``).
    """
    folder = Path(folder)
    processor.tokenizer.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    if processor.chat_template:
        (folder / "chat_template.jinja").write_text(processor.chat_template, encoding="utf-8")
    own = {
        k: v
        for k, v in processor.to_dict().items()
        if k not in ("tokenizer", "image_processor", "video_processor", "chat_template", "audio_tokenizer")
        and isinstance(v, (int, float, str, bool, list))
        and not k.startswith("_")
    }
    own["processor_class"] = type(processor).__name__
    (folder / "processor_config.json").write_text(json.dumps(own, indent=2), encoding="utf-8")


__all__ = ["PROCESSOR_FILES", "load_processor", "save_processor_parts"]
