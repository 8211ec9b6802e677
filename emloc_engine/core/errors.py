"""Typed errors of the engine.

Every message says what went wrong, which item, and what to do next. The app shows an
``EngineError`` on the page that caused it (with a Retry button); anything else is a bug and
opens the error dialog. ``Cancelled`` is not an error: it is how a cooperative cancel unwinds.
"""

from __future__ import annotations

from collections.abc import Iterable


class EngineError(Exception):
    """Base of every error the engine raises on purpose.

    Attributes:
        problems: every individual problem found (one line each); ``str(error)`` lists them all.
        hint: what the user can do about it, if one thing fixes it.
    """

    def __init__(self, message: str, *, problems: Iterable[str] = (), hint: str = "") -> None:
        self.summary = message
        self.problems = list(problems)
        self.hint = hint
        text = message
        if self.problems:
            text += "\n" + "\n".join(f"  - {p}" for p in self.problems)
        if hint:
            text += f"\nFix: {hint}"
        super().__init__(text)


class ConfigError(EngineError):
    """A setting is out of range or settings contradict each other."""


class DataError(EngineError):
    """The dataset cannot be used; ``problems`` holds one ``file:line: message`` per problem."""


class ModelNotFound(EngineError):
    """A model folder, file or cache entry does not exist or is incomplete."""


class UnsupportedModel(EngineError):
    """The model's architecture or checkpoint format is not supported."""


class UntrustedCode(UnsupportedModel):
    """The model folder needs its own Python code to load (``auto_map``); the engine never runs it."""


class InsufficientMemory(EngineError):
    """The work does not fit in the memory budget; the hint says which setting to lower."""


class MergeError(EngineError):
    """Merging or exporting failed; the message names the tensor or module that broke it."""


class DiskFull(EngineError):
    """Writing an output ran out of disk space (or hit a file-size limit); names the folder and the space."""


class MissingTool(EngineError):
    """An outside program a requested output needs (llama.cpp's ``llama-quantize``) is not installed;
    the message names the output and how to get the program."""


class RunStateError(EngineError):
    """The run folder is in a state that forbids the request (e.g. correcting twice)."""


class Cancelled(Exception):  # not an error: the name says what happened
    """Raised by ``Progress.check_cancelled`` when the user asked to stop."""
