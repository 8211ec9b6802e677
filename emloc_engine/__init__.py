"""EMLoC engine: emulator construction, LoRA training, correction and export. Never imports Qt.

Public stage functions are re-exported here as they land (``__all__``).
"""

from emloc_engine.core.errors import (
    Cancelled,
    ConfigError,
    DataError,
    EngineError,
    InsufficientMemory,
    MergeError,
    ModelNotFound,
    RunStateError,
    UnsupportedModel,
)
from emloc_engine.core.progress import NULL_PROGRESS, NullProgress, Progress, RecordingProgress, sub
from emloc_engine.core.version import __version__

__all__ = [
    "NULL_PROGRESS",
    "Cancelled",
    "ConfigError",
    "DataError",
    "EngineError",
    "InsufficientMemory",
    "MergeError",
    "ModelNotFound",
    "NullProgress",
    "Progress",
    "RecordingProgress",
    "RunStateError",
    "UnsupportedModel",
    "__version__",
    "sub",
]
