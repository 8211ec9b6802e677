"""Reading dataset files into samples: containers, record formats, auto-detection.

Containers (by file suffix): ``.jsonl`` (streamed line by line), ``.json`` (an array of records,
a single record, an object holding one list of records, or JSON Lines misnamed ``.json``), ``.csv``
and ``.tsv`` (a header row; a ``messages``/``conversations`` cell holds a JSON list), ``.parquet``
(read in batches with pyarrow), and plain text ``.txt``/``.md``/``.text`` (cut into chunks).

Record formats (:data:`~emloc_engine.data.config.FORMATS`), detected from the first readable
record's fields after the column map is applied:

* ``messages`` — ``{"messages": [{"role": "user", "content": "..."}, ...]}``; roles ``system``,
  ``user``, ``assistant``, ``tool`` (``developer`` is read as ``system``). ``content`` may be a list
  of ``{"type": "text", "text": ...}`` parts. An assistant message may carry ``"weight": 0`` (as in
  OpenAI fine-tuning files) to be shown but not trained on, and ``tool_calls`` instead of content.
* ``sharegpt`` — ``{"conversations": [{"from": "human", "value": "..."}, ...]}``; ``human`` →
  user, ``gpt`` → assistant, ``system``, ``tool``/``function``/``observation`` → tool,
  ``function_call`` → assistant.
* ``alpaca`` — ``instruction`` + optional ``input`` (appended after a blank line) → user,
  ``output`` → assistant, optional ``system`` and ``history`` (a list of ``[user, assistant]`` pairs).
* ``prompt_completion`` — ``prompt`` + ``completion`` strings (rendered as plain text, no chat
  template, loss on the completion); if both are lists of messages they are read as a chat.
* ``text`` — ``{"text": "..."}``: one document, loss on every token.
* ``txt`` — a plain text file: line-aligned chunks of about ``max_length × 4`` characters (before a
  tokenizer exists); with a tokenizer, the pipeline re-cuts the token stream into
  ``max_length``-token pieces.

Numbers in text fields are read as their decimal text; lists, objects and booleans are type errors.

Hostile files cost bounded work: one record may hold at most :data:`MAX_RECORD_BYTES` (8 MiB) of text
(bytes of a ``.jsonl`` line, read without holding more than that; characters of text otherwise);
a bigger one is an error at its line and is not parsed. A file that is not text (NUL bytes, not
UTF-8, UTF-16) is one error for the file (:func:`not_text_problem`), not one per line.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emloc_engine.data.config import FORMATS, DataConfig
from emloc_engine.data.validation import ProblemLog

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4
"""Characters per token assumed when cutting plain text before a tokenizer exists."""

MAX_RECORD_BYTES = 8 * 2**20
"""Most text one record may hold (a ``.jsonl`` line's bytes, otherwise the sample's characters)."""
SNIFF_BYTES = 64 * 1024

ROLE_ALIASES = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "bot": "assistant",
    "function_call": "assistant",
    "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool",
}
ROLES = ("system", "user", "assistant", "tool")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt", ".md", ".text")
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")
RECORD_FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")


@dataclass(frozen=True, eq=False)
class Sample:
    """One training sample, normalised.

    Attributes:
        kind: ``"chat"`` (``messages``), ``"prompt_completion"`` or ``"text"``.
        line: 1-based line where the record starts (``None`` for Parquet rows).
        item: 0-based index in a JSON array / Parquet file, else ``None``.
        messages: chat messages with canonical roles (``role``, ``content`` and pass-through keys).
        prompt, completion: for ``prompt_completion``.
        text: for ``text``.
        tools: tool definitions to pass to the chat template, if the record has them.
        chunked: a piece of a longer plain text (re-cut by tokens, no end-of-sequence token added).
    """

    kind: str
    line: int | None
    item: int | None
    messages: tuple[dict[str, Any], ...] = ()
    prompt: str = ""
    completion: str = ""
    text: str = ""
    tools: tuple[dict[str, Any], ...] | None = None
    chunked: bool = False

    def char_length(self) -> int:
        """Characters of text in the sample (all message contents, or prompt + completion, or text)."""
        if self.kind == "chat":
            return sum(len(m.get("content") or "") for m in self.messages)
        return len(self.prompt) + len(self.completion) + len(self.text)

    def has_target(self) -> bool:
        """Whether the sample has something to learn when training on assistant replies only."""
        if self.kind == "chat":
            return any(m["role"] == "assistant" and m.get("weight", 1) != 0
                       and (m.get("content") or m.get("tool_calls")) for m in self.messages)
        return bool(self.completion or self.text)

    def preview(self) -> str:
        """A plain rendering (``role: content`` per message) for reports without a tokenizer."""
        if self.kind == "chat":
            return "\n".join(f"{m['role']}: {m.get('content') or ''}" for m in self.messages)
        if self.kind == "prompt_completion":
            return f"{self.prompt}{self.completion}"
        return self.text


# --------------------------------------------------------------------------------------------- records
Record = tuple[int | None, int | None, dict[str, Any]]
"""(line, item, fields) of one record."""


def container_of(path: Path, fmt: str) -> str | None:
    """``"json"``, ``"csv"``, ``"tsv"``, ``"parquet"``, ``"txt"``, or ``None`` when unknown."""
    suffix = path.suffix.lower()
    if fmt == "txt" or suffix in TEXT_SUFFIXES:
        return "txt"
    if suffix in JSON_SUFFIXES:
        return "json"
    if suffix in TABLE_SUFFIXES:
        return suffix[1:]
    with path.open("rb") as f:  # no known suffix: sniff the first non-blank byte
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return "json" if head[:1] in (b"{", b"[") else None


def iter_records(path: Path, container: str, problems: ProblemLog) -> Iterator[Record]:
    """Every record of a JSON/CSV/TSV/Parquet file or a dataset folder, with its location; bad ones go to ``problems``."""
    if container == "json":
        yield from _iter_json(path, problems)
    elif container in ("csv", "tsv"):
        yield from _iter_csv(path, problems, "\t" if container == "tsv" else ",")
    elif container == "parquet":
        yield from _iter_parquet(path, problems)
    elif container == "dataset":  # a datasets folder, Parquet/Arrow folder or cached dataset (hf_datasets)
        from emloc_engine.data.hf_datasets import iter_dataset_rows

        yield from iter_dataset_rows(path, problems)
    else:  # pragma: no cover - callers check the container
        raise ValueError(container)


def _first_char(path: Path) -> bytes:
    with path.open("rb") as f:
        while chunk := f.read(65536):
            stripped = chunk.lstrip(b"\xef\xbb\xbf \t\r\n")
            if stripped:
                return stripped[:1]
    return b""


def _iter_json(path: Path, problems: ProblemLog) -> Iterator[Record]:
    if _first_char(path) == b"[":
        yield from _iter_json_array(path, problems)
        return
    if path.suffix.lower() == ".json":
        text = path.read_text(encoding="utf-8-sig", errors="replace")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":  # "Extra data" = several objects: JSON Lines named .json
                problems.error(exc.lineno, f"bad JSON: {exc.msg} (column {exc.colno})", "bad_json")
                return
        else:
            yield from _records_of_object(obj, problems)
            return
    yield from _iter_jsonl(path, problems)


def _records_of_object(obj: Any, problems: ProblemLog) -> Iterator[Record]:
    if not isinstance(obj, dict):
        problems.error(1, f"the JSON file holds a {type(obj).__name__}, expected records (objects)", "wrong_type")
        return
    if set(obj) & {"messages", "conversations", "instruction", "prompt", "text", "output", "completion"}:
        yield 1, None, obj
        return
    lists = [(k, v) for k, v in obj.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
    if len(lists) != 1:
        yield 1, None, obj  # detection reports the unknown fields
        return
    key, rows = lists[0]
    log.info("reading the records of the top-level key %r", key)
    for i, row in enumerate(rows):
        yield None, i, row if isinstance(row, dict) else {"__not_an_object__": row}


def _iter_json_array(path: Path, problems: ProblemLog) -> Iterator[Record]:
    """Items of a top-level JSON array with their index and starting line (``raw_decode`` walk)."""
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    decoder = json.JSONDecoder()
    pos, line, n = text.index("[") + 1, 1 + text.count("\n", 0, text.index("[")), len(text)
    item = 0
    while True:
        start = pos
        while pos < n and text[pos] in " \t\r\n":
            pos += 1
        line += text.count("\n", start, pos)
        if pos >= n:
            problems.error(line, "bad JSON: the array is not closed with ']'", "bad_json", item=item)
            return
        if text[pos] == "]":
            return
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            problems.error(exc.lineno, f"bad JSON: {exc.msg} (column {exc.colno}); records after it "
                           "are not read", "bad_json", item=item)
            return
        yield line, item, obj if isinstance(obj, dict) else {"__not_an_object__": obj}
        line += text.count("\n", pos, end)
        pos, item = end, item + 1
        start = pos
        while pos < n and text[pos] in " \t\r\n":
            pos += 1
        line += text.count("\n", start, pos)
        if pos < n and text[pos] == ",":
            pos += 1
        elif pos < n and text[pos] != "]":
            problems.error(line, f"bad JSON: expected ',' or ']' after item {item - 1}, "
                           f"found {text[pos]!r}", "bad_json", item=item)
            return


def not_text_problem(path: Path) -> str | None:
    """Why ``path`` is not a UTF-8 text file, judged from its first 64 KiB (``None`` when it is text).

    NUL bytes (binary: compressed, Parquet, an image...) or a UTF-16 byte-order mark make it not text;
    so does invalid UTF-8 in most of its first lines (Latin-1 and other legacy encodings). A few bad
    lines in a UTF-8 file are left to the per-line checks, which name them.
    """
    with path.open("rb") as f:
        head = f.read(SNIFF_BYTES)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return f"{path.name} is UTF-16 text; save it as UTF-8"
    if b"\x00" in head:
        return (f"{path.name} is not text: it looks binary (NUL bytes in its first {max(1, len(head) // 1024)} "
                "KiB); if it is Parquet or compressed, give it its own suffix (.parquet) or decompress it")
    lines = head.split(b"\n")
    cut = len(head) == SNIFF_BYTES  # the last line may end in the middle of a character
    bad = [i for i, line in enumerate(lines) if not _utf8(line, final=not (cut and i == len(lines) - 1))]
    if bad and 2 * len(bad) > len(lines):
        return (f"{path.name} is not UTF-8 text ({len(bad)} of its first {len(lines)} lines are not, the first "
                f"at line {bad[0] + 1}); save it as UTF-8 (most editors: Save with encoding UTF-8)")
    return None


def _utf8(raw: bytes, final: bool = True) -> bool:
    import codecs

    try:
        codecs.getincrementaldecoder("utf-8")().decode(raw, final=final)
    except UnicodeDecodeError:
        return False
    return True


def _too_large(size: int) -> str:
    return (f"record of {size / 2**20:.1f} MiB, over the {MAX_RECORD_BYTES // 2**20} MiB limit for one record; "
            "it is not read. Split it into several records (long documents: a .txt file, which is cut "
            "into pieces)")


def _bounded_lines(f: Any) -> Iterator[tuple[int, bytes | None, int]]:
    """``(line number, bytes, size)`` of each line; ``bytes`` is ``None`` for a line over the limit, which
    is skipped without ever holding more than :data:`MAX_RECORD_BYTES` of it in memory."""
    number = 0
    while raw := f.readline(MAX_RECORD_BYTES + 1):
        number += 1
        if len(raw) <= MAX_RECORD_BYTES or raw.endswith(b"\n"):
            yield number, raw, len(raw)
            continue
        size = len(raw)
        while chunk := f.readline(1 << 20):
            size += len(chunk)
            if chunk.endswith(b"\n"):
                break
        yield number, None, size


def _iter_jsonl(path: Path, problems: ProblemLog) -> Iterator[Record]:
    with path.open("rb") as f:
        for number, raw, size in _bounded_lines(f):
            if raw is None:
                problems.error(number, _too_large(size), "too_large")
                continue
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except UnicodeDecodeError as exc:
                problems.error(number, f"not UTF-8 text ({exc.reason} at byte {exc.start})", "bad_json")
                continue
            except json.JSONDecodeError as exc:
                problems.error(number, f"bad JSON: {exc.msg} (column {exc.colno})", "bad_json")
                continue
            yield number, None, obj if isinstance(obj, dict) else {"__not_an_object__": obj}


def _iter_csv(path: Path, problems: ProblemLog, delimiter: str) -> Iterator[Record]:
    csv.field_size_limit(1 << 30)
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        start = 2
        try:
            for row in reader:
                extra = row.pop(None, None)
                if extra:
                    problems.error(start, f"{len(extra)} more cell(s) than header columns", "wrong_type")
                yield start, None, {k: v for k, v in row.items() if k is not None}
                start = reader.line_num + 1
        except csv.Error as exc:
            problems.error(reader.line_num, f"bad CSV: {exc}", "bad_json")


def _iter_parquet(path: Path, problems: ProblemLog) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        problems.error(None, f"cannot read Parquet: {exc}", "bad_json")
        return
    item = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield None, item, row
            item += 1


# ------------------------------------------------------------------------------------------ detection
def detect_format(fields: set[str]) -> str | None:
    """The record format whose fields are present, or ``None``."""
    if "messages" in fields:
        return "messages"
    if "conversations" in fields:
        return "sharegpt"
    if "instruction" in fields and "output" in fields:
        return "alpaca"
    if "prompt" in fields and "completion" in fields:
        return "prompt_completion"
    if "text" in fields:
        return "text"
    return None


def unknown_format_message(fields: set[str]) -> str:
    """Why no format fits, which formats exist, and how to override."""
    shown = ", ".join(sorted(fields)[:12]) or "none"
    formats = "; ".join(f"{k}: {v}" for k, v in FORMATS.items())
    return (f"unknown data format: the first record has the fields [{shown}]. Formats: {formats}. "
            "Pass --format FORMAT and map your columns with --map field=column "
            "(e.g. --map prompt=question --map completion=answer).")


def apply_column_map(obj: dict[str, Any], cfg: DataConfig) -> dict[str, Any]:
    """Rename the file's columns to canonical fields (the record is copied only if a map is given)."""
    if not cfg.column_map:
        return obj
    out = dict(obj)
    for canonical, column in cfg.column_map:
        if column in out and column != canonical:
            out[canonical] = out.pop(column)
    return out


# ------------------------------------------------------------------------------------------- samples
class _Bad(Exception):
    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def _field_name(cfg: DataConfig, canonical: str) -> str:
    column = cfg.column_for(canonical)
    return repr(canonical) if column == canonical else f"{canonical!r} (column {column!r})"


def _text(obj: dict[str, Any], key: str, cfg: DataConfig, *, required: bool = True) -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise _Bad(f"missing field {_field_name(cfg, key)}", "missing_field")
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _Bad(f"field {_field_name(cfg, key)} must be a string, got {type(value).__name__}", "wrong_type")
    text = str(value)
    if required and not text.strip():
        raise _Bad(f"field {_field_name(cfg, key)} is empty", "empty_field")
    return text


def _content(value: Any, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        texts = []
        for part in value:
            if part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
                raise _Bad(f"{where}: content part of type {part.get('type')!r} is not supported "
                           "(only text)", "wrong_type")
            texts.append(part["text"])
        return "".join(texts)
    raise _Bad(f"{where}: content must be a string, got {type(value).__name__}", "wrong_type")


def _messages(value: Any, key: str, cfg: DataConfig, problems: ProblemLog,
              line: int | None, item: int | None) -> tuple[dict[str, Any], ...]:
    if value is None:
        raise _Bad(f"missing field {_field_name(cfg, key)}", "missing_field")
    if isinstance(value, str) and value.lstrip().startswith("["):  # CSV cell holding JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise _Bad(f"field {_field_name(cfg, key)} is not valid JSON: {exc.msg}", "bad_json") from exc
    if not isinstance(value, list):
        raise _Bad(f"field {_field_name(cfg, key)} must be a list of messages, got {type(value).__name__}",
                   "wrong_type")
    if not value:
        raise _Bad(f"field {_field_name(cfg, key)} is empty", "empty_field")
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(value):
        where = f"message {i}"
        if not isinstance(msg, dict):
            raise _Bad(f"{where} must be an object, got {type(msg).__name__}", "wrong_type")
        raw_role = msg.get("role", msg.get("from"))
        if raw_role is None:
            raise _Bad(f"{where} has no 'role' (or ShareGPT 'from')", "missing_field")
        role = ROLE_ALIASES.get(str(raw_role).strip().lower())
        if role is None:
            raise _Bad(f"{where} has the unknown role {raw_role!r}; roles: {', '.join(ROLES)} "
                       "(ShareGPT: system, human, gpt, tool)", "unknown_role")
        content = _content(msg.get("content", msg.get("value")), where)
        if not (content or "").strip() and not (role == "assistant" and msg.get("tool_calls")):
            if role == "system":
                problems.warn(line, f"{where} (system) is empty; it is left out", "empty_field", item=item)
                continue
            raise _Bad(f"{where} ({role}) has empty content", "empty_field")
        clean = {k: v for k, v in msg.items() if k not in ("role", "from", "content", "value")}
        clean.update(role=role, content=content)
        out.append(clean)
    return tuple(out)


def _tools(obj: dict[str, Any]) -> tuple[dict[str, Any], ...] | None:
    tools = obj.get("tools")
    if isinstance(tools, str) and tools.strip().startswith("["):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            tools = None
    return tuple(tools) if isinstance(tools, list) and tools else None


def _sample_of(fmt: str, obj: dict[str, Any], line: int | None, item: int | None,
               cfg: DataConfig, problems: ProblemLog) -> Sample:
    if "__not_an_object__" in obj:
        raise _Bad(f"record must be an object, got {type(obj['__not_an_object__']).__name__}", "wrong_type")
    if fmt in ("messages", "sharegpt"):
        key = "messages" if fmt == "messages" else "conversations"
        return Sample("chat", line, item, messages=_messages(obj.get(key), key, cfg, problems, line, item),
                      tools=_tools(obj))
    if fmt == "alpaca":
        instruction, output = _text(obj, "instruction", cfg), _text(obj, "output", cfg)
        extra, system = _text(obj, "input", cfg, required=False), _text(obj, "system", cfg, required=False)
        msgs: list[dict[str, Any]] = [{"role": "system", "content": system}] if system.strip() else []
        for pair in obj.get("history") or []:
            if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
                raise _Bad("field 'history' must be a list of [user, assistant] string pairs", "wrong_type")
            msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return Sample("chat", line, item, messages=tuple(msgs))
    if fmt == "prompt_completion":
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if isinstance(prompt, list) and isinstance(completion, list):  # conversational prompt/completion
            msgs_p = _messages(prompt, "prompt", cfg, problems, line, item)
            msgs_c = _messages(completion, "completion", cfg, problems, line, item)
            return Sample("chat", line, item, messages=msgs_p + msgs_c, tools=_tools(obj))
        if prompt is None:
            raise _Bad(f"missing field {_field_name(cfg, 'prompt')}", "missing_field")
        return Sample("prompt_completion", line, item, prompt=_text(obj, "prompt", cfg, required=False),
                      completion=_text(obj, "completion", cfg))
    if fmt == "text":
        return Sample("text", line, item, text=_text(obj, "text", cfg))
    raise ValueError(fmt)  # pragma: no cover


@dataclass
class ReadState:
    """What reading found out: the format (detected or given) and how many records were read."""

    format: str
    n_records: int = 0


def iter_record_samples(path: Path, container: str, cfg: DataConfig, problems: ProblemLog,
                        state: ReadState) -> Iterator[Sample]:
    """Samples of a JSON/CSV/Parquet file; ``state`` receives the format and the record count.

    ``state.format`` starts as ``cfg.format``; with ``"auto"`` the first record that is an object decides.
    """
    fmt = state.format
    for line, item, raw in iter_records(path, container, problems):
        state.n_records += 1
        obj = apply_column_map(raw, cfg)
        if fmt == "auto":
            detected = detect_format(set(obj)) if "__not_an_object__" not in obj else None
            if detected is None:
                problems.error(line, unknown_format_message(set(obj)), "unknown_format", item=item)
                state.format = "unknown"
                return
            fmt = state.format = detected
        try:
            sample = _sample_of(fmt, obj, line, item, cfg, problems)
        except _Bad as bad:
            problems.error(line, str(bad), bad.code, item=item)
            continue
        if sample.char_length() > MAX_RECORD_BYTES:  # .json/.csv/.parquet (a .jsonl line is checked unread)
            problems.error(line, _too_large(sample.char_length()), "too_large", item=item)
            continue
        yield sample


def iter_text_chunks(path: Path, target_chars: int, problems: ProblemLog) -> Iterator[Sample]:
    """Line-aligned chunks of a plain text file of about ``target_chars`` characters each.

    A line longer than ``2 × target_chars`` is cut at whitespace (or hard) into pieces. Each chunk
    carries the line it starts on. Invalid UTF-8 bytes are replaced (one warning).
    """
    buf: list[str] = []
    size, start, warned = 0, 1, False
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("utf-8", errors="replace")
                if not warned:
                    problems.warn(number, "not UTF-8 text; undecodable bytes are replaced", "bad_json")
                    warned = True
            if number == 1:
                text = text.removeprefix("\ufeff")
            while len(text) > 2 * target_chars:  # one huge line: emit pieces of it
                cut = text.rfind(" ", target_chars // 2, target_chars) + 1 or target_chars
                piece, text = text[:cut], text[cut:]
                if buf:
                    yield Sample("text", start, None, text="".join(buf), chunked=True)
                    buf, size = [], 0
                yield Sample("text", number, None, text=piece, chunked=True)
                start = number
            if not buf:
                start = number
            buf.append(text)
            size += len(text)
            if size >= target_chars:
                yield Sample("text", start, None, text="".join(buf), chunked=True)
                buf, size = [], 0
    if buf and "".join(buf).strip():
        yield Sample("text", start, None, text="".join(buf), chunked=True)
