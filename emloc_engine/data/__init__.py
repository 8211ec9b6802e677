"""The data pipeline: read the datasets users have, check them before any model loads, render them.

See :mod:`emloc_engine.data.formats` for the formats, :mod:`emloc_engine.data.render` for chat
templates and labels, :mod:`emloc_engine.data.calibration` for the emulator's calibration samples.
"""

from emloc_engine.data.calibration import calibration_token_ids
from emloc_engine.data.config import FORMATS, DataConfig
from emloc_engine.data.pipeline import PreparedData, inspect_dataset, load_tokenizer, prepare_dataset
from emloc_engine.data.render import Example
from emloc_engine.data.validation import DataProblem, DataReport

__all__ = [
    "FORMATS",
    "DataConfig",
    "DataProblem",
    "DataReport",
    "Example",
    "PreparedData",
    "calibration_token_ids",
    "inspect_dataset",
    "load_tokenizer",
    "prepare_dataset",
]
