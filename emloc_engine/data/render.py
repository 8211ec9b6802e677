"""Turning samples into token ids and labels with the model's own chat template.

Labels follow the Hugging Face causal-LM convention: ``labels[t] = input_ids[t]`` where the loss is
computed and ``-100`` elsewhere (the model shifts them by one itself).

**Assistant spans without string matching.** For a conversation ``m`` rendered to ids ``T`` and an
assistant message at index ``i``, let ``P = ids(render(m[:i], add_generation_prompt=True))`` and
``F = ids(render(m[:i+1]))``. The reply occupies ``T[a:b]`` with ``a = lcp(P, T)`` and
``b = lcp(F, T)`` (``lcp`` = length of the longest common prefix of two id lists). This works for
any template that renders a conversation left to right (ChatML, Llama 3, Gemma, Mistral, ...), includes
the template's end-of-turn token in the labels (whitespace the template prints after that special
token is not trained on), needs no knowledge of the markers, and degrades
gracefully (a few tokens fewer) when a template renders earlier turns differently from the last one.

Prompt/completion and text samples are tokenised as plain text with the tokenizer's own special
tokens (BOS where the model uses one) and end with the EOS token; plain-text pieces cut from a
``.txt`` file get no EOS (they continue each other).

**Only what max_length can use is tokenised.** Given ``max_length``, a sample is first cut to
:data:`MAX_CHARS_PER_TOKEN` × ``max_length`` characters of text in total (and ``max_length`` messages):
no token spans more than that many characters, so everything cut off would lie past ``max_length``
tokens and be truncated anyway; and assistant turns that start past ``max_length`` are not rendered.
A 5 MB conversation then costs what a ``max_length``-token one does, not a tokenisation of 5 MB.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from emloc_engine.data.formats import Sample

IGNORE_INDEX = -100

MAX_CHARS_PER_TOKEN = 32
"""No token of a real tokenizer spans more characters than this; text beyond ``max_length`` × this is
past ``max_length`` tokens, so it is never tokenised (see the module docstring)."""

FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ '### User:\n' + m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ '### Assistant:\n' + (m['content'] or '') + (eos_token or '') + '\n\n' }}"
    "{% else %}{{ '### Tool:\n' + (m['content'] or '') + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)
"""Used (with a warning) when chat data meets a tokenizer without a chat template::

    <system text>\\n\\n### User:\\n<user text>\\n\\n### Assistant:\\n<reply><eos>\\n\\n
"""


@dataclass(frozen=True)
class Example:
    """One training sequence: token ids and labels of the same length (``-100`` = no loss)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_label_tokens(self) -> int:
        """Tokens that carry loss."""
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass(frozen=True)
class Rendered:
    """A sample as ids and labels before truncation, plus why it may have no label.

    ``clipped``: the text was cut before tokenising (see :func:`bound_sample`): the sample is longer
    than ``max_length`` and ``input_ids`` hold its beginning only.
    """

    input_ids: list[int]
    labels: list[int]
    no_label_reason: str = ""
    clipped: bool = False


def bound_sample(sample: Sample, max_length: int) -> tuple[Sample, bool]:
    """``sample`` cut to what ``max_length`` tokens can hold, and whether anything was cut.

    At most ``max_length × MAX_CHARS_PER_TOKEN`` characters of text are kept in total (message
    contents in order, or prompt then completion/text) and at most ``max_length`` messages (each
    renders to one token at least); the message that crosses the budget keeps its beginning.
    """
    budget = max_length * MAX_CHARS_PER_TOKEN
    if sample.char_length() <= budget and len(sample.messages) <= max_length:
        return sample, False
    if sample.kind == "chat":
        kept: list[dict[str, Any]] = []
        for m in sample.messages[:max_length]:
            if budget <= 0:
                break
            content = m.get("content") or ""
            kept.append({**m, "content": content[:budget]} if len(content) > budget else m)
            budget -= len(content)
        return replace(sample, messages=tuple(kept)), True
    prompt = sample.prompt[:budget]
    rest = budget - len(prompt)
    return replace(sample, prompt=prompt, completion=sample.completion[:max(0, rest)],
                   text=sample.text[:max(0, rest - len(sample.completion))]), True


class TemplateFailure(Exception):
    """The chat template raised while rendering a sample (message says why)."""


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries its own chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def lcp(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    backend = getattr(tokenizer, "backend_tokenizer", None) if not special else None
    if backend is not None:  # same ids as tokenizer(text, add_special_tokens=False), half the overhead
        return list(backend.encode(text, add_special_tokens=False).ids)
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _eos(tokenizer: Any) -> int | None:
    eos = getattr(tokenizer, "eos_token_id", None)
    return eos if isinstance(eos, int) else None


def render_chat(sample: Sample, tokenizer: Any, template: str | None, train_on: str,
                max_length: int | None = None) -> Rendered:
    """Render a chat sample with the chat template; labels on assistant replies (or ``"all"``).

    Args:
        sample: a ``kind == "chat"`` sample.
        tokenizer: a Hugging Face tokenizer.
        template: the chat template to use (``None``: the tokenizer's own).
        train_on: ``"assistant"`` or ``"all"``.
        max_length: when given, assistant turns that start at or past it are not rendered (they
            would be truncated away).

    Returns:
        Ids and labels of the whole conversation (not truncated).

    Raises:
        TemplateFailure: the template refused the conversation (e.g. roles must alternate).
    """
    msgs = [{k: v for k, v in m.items() if k != "weight"} for m in sample.messages]
    tools = list(sample.tools) if sample.tools else None
    cache: dict[tuple[int, bool], list[int]] = {}

    def ids(k: int, gen: bool) -> list[int]:
        if (k, gen) not in cache:
            try:
                text = tokenizer.apply_chat_template(msgs[:k], tools=tools, chat_template=template,
                                                     tokenize=False, add_generation_prompt=gen)
            except Exception as exc:
                raise TemplateFailure(f"the chat template cannot render this conversation: {exc}") from exc
            cache[(k, gen)] = _encode(tokenizer, str(text), special=False)
        return cache[(k, gen)]

    full = ids(len(msgs), False)
    if train_on == "all":
        return Rendered(full, list(full))
    labels = [IGNORE_INDEX] * len(full)
    targets = [i for i, m in enumerate(sample.messages) if m["role"] == "assistant" and m.get("weight", 1) != 0]
    for i in targets:
        try:
            prompt = ids(i, True)
        except TemplateFailure:
            if i:  # only an empty prefix may be refused; the reply then starts at the beginning
                raise
            prompt = []
        start = lcp(prompt, full)
        if max_length is not None and start >= max_length:
            past_max = True  # this reply and every later one begin after the truncation point
            break
        end = _trim_after_end_of_turn(tokenizer, full, start, lcp(ids(i + 1, False), full))
        labels[start:end] = full[start:end]
    else:
        past_max = False
    reason = ""
    if not targets:
        reason = "the conversation has no assistant reply to learn from"
    elif past_max:
        pass  # the caller says "the reply starts after max_length"
    elif all(t == IGNORE_INDEX for t in labels):
        reason = ("the chat template renders nothing for the assistant replies after its generation "
                  "prompt (no assistant turn marker)")
    return Rendered(full, labels, reason)


def _trim_after_end_of_turn(tokenizer: Any, ids: list[int], start: int, end: int) -> int:
    """Drop whitespace tokens that follow the reply's closing special token (ChatML's ``\\n``)."""
    k = end
    while k > start and not tokenizer.decode([ids[k - 1]]).strip():
        k -= 1
    return k if start < k < end and ids[k - 1] in special_ids(tokenizer) else end


def special_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of every special token: the named ones and added tokens flagged special (``<|eot_id|>``, ...)."""
    try:
        return _special_ids_cached(tokenizer)
    except TypeError:  # an unhashable tokenizer class: compute each time
        return _special_ids(tokenizer)


@functools.lru_cache(maxsize=4)
def _special_ids_cached(tokenizer: Any) -> frozenset[int]:
    return _special_ids(tokenizer)


def _special_ids(tokenizer: Any) -> frozenset[int]:
    ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids.update(i for i, t in decoder.items() if getattr(t, "special", False))
    return frozenset(ids)


def render_plain(sample: Sample, tokenizer: Any, train_on: str) -> Rendered:
    """Render a prompt/completion or text sample as plain text (loss on the completion, or all).

    The prompt's own tokenisation is diffed against the whole text's, so a token merged across the
    prompt/completion boundary counts as completion.
    """
    eos = _eos(tokenizer)
    if sample.chunked:
        full = _encode(tokenizer, sample.text, special=False)
        return Rendered(full, list(full))
    full = _encode(tokenizer, sample.prompt + sample.completion + sample.text, special=True)
    if eos is not None and (not full or full[-1] != eos):
        full.append(eos)
    if sample.kind == "text" or train_on == "all":
        return Rendered(full, list(full))
    start = lcp(_encode(tokenizer, sample.prompt, special=True), full) if sample.prompt else 0
    labels = [IGNORE_INDEX] * start + full[start:]
    return Rendered(full, labels)


def render_sample(sample: Sample, tokenizer: Any, template: str | None, train_on: str,
                  max_length: int | None = None) -> Rendered:
    """Render any sample (see :func:`render_chat` and :func:`render_plain`).

    With ``max_length`` only what that many tokens can use is tokenised (:func:`bound_sample`);
    ``clipped`` then says whether text was cut. Plain-text pieces (``chunked``) are never cut.
    """
    bounded, clipped = sample, False
    if max_length is not None and not sample.chunked:
        bounded, clipped = bound_sample(sample, max_length)
    if bounded.kind == "chat":
        rendered = render_chat(bounded, tokenizer, template, train_on, max_length)
    else:
        rendered = render_plain(bounded, tokenizer, train_on)
    if not clipped:
        return rendered
    reason = rendered.no_label_reason
    if not bounded.has_target() and sample.has_target():
        reason = ""  # its replies were cut off with the text past max_length: the caller says so
    return replace(rendered, clipped=True, no_label_reason=reason)


def truncate(rendered: Rendered, max_length: int) -> Example:
    """The first ``max_length`` tokens of a rendered sample, as an :class:`Example`."""
    return Example(tuple(rendered.input_ids[:max_length]), tuple(rendered.labels[:max_length]))


def window_stream(chunks: Iterable[tuple[int | None, list[int]]], max_length: int
                  ) -> list[tuple[int | None, Example]]:
    """Cut the concatenated ids of plain-text chunks into pieces of ``max_length`` tokens (last one shorter).

    Returns:
        ``(line, example)`` pairs, ``line`` being the start line of the chunk of the piece's first token.
    """
    out: list[tuple[int | None, Example]] = []
    buf: list[int] = []
    buf_line: int | None = None
    for line, ids in chunks:
        if not buf:
            buf_line = line
        buf.extend(ids)
        while len(buf) >= max_length:
            piece = tuple(buf[:max_length])
            out.append((buf_line, Example(piece, piece)))
            del buf[:max_length]
            buf_line = line
    if buf:
        out.append((buf_line, Example(tuple(buf), tuple(buf))))
    return out


def pack(examples: Sequence[Example], max_length: int) -> tuple[Example, ...]:
    """Concatenate whole examples, in order, into sequences of at most ``max_length`` tokens.

    Greedy: a sequence is closed when the next example does not fit. No example is split (each is
    already ≤ ``max_length``), so every label stays with its own context; attention crosses example
    boundaries inside a packed sequence (as in the usual "group texts" packing), which the
    end-of-sequence token between examples makes harmless in practice.
    """
    out: list[Example] = []
    ids: list[int] = []
    labels: list[int] = []
    for ex in examples:
        if ids and len(ids) + len(ex) > max_length:
            out.append(Example(tuple(ids), tuple(labels)))
            ids, labels = [], []
        ids.extend(ex.input_ids)
        labels.extend(ex.labels)
    if ids:
        out.append(Example(tuple(ids), tuple(labels)))
    return tuple(out)


def split_indices(n: int, n_eval: int, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split of ``range(n)`` into sorted train and eval indices (``n_eval`` of them in eval).

    The permutation is ``random.Random(seed).shuffle`` of ``range(n)``: the same ``(n, seed)`` always
    gives the same split, on every platform.
    """
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def label_text(tokenizer: Any, example: Example) -> str:
    """The text the loss is computed on: decoded labelled spans joined by `` … ``."""
    spans: list[list[int]] = []
    prev = False
    for t in example.labels:
        if t != IGNORE_INDEX:
            if not prev:
                spans.append([])
            spans[-1].append(t)
        prev = t != IGNORE_INDEX
    return " … ".join(tokenizer.decode(s, skip_special_tokens=False) for s in spans)
