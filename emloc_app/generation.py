"""Side-by-side chat: the base model and the base model + (corrected) adapter, streamed, turn by turn.

Runs in a worker thread. One copy of the base model is loaded (cached across turns); the
adapter is attached with peft and switched off for the base answer (``disable_adapter``), so
both answers come from the same weights. Each side keeps its own conversation; every turn is
rendered with the model's chat template (system prompt first), answered greedily or by sampling
(temperature, top-p; the oldest turns are left out when the conversation outgrows the model's context),
and streamed through ``transformers.TextIteratorStreamer`` from a generation
thread; Stop is a stopping criterion that reads the worker's cancel flag.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeAlias, cast

from emloc_engine.core.errors import Cancelled, ModelNotFound
from emloc_engine.core.progress import Progress

if TYPE_CHECKING:
    import torch
    from peft import PeftModelForCausalLM
    from transformers import BatchEncoding, GenerationMixin, PreTrainedModel, PreTrainedTokenizerBase

    Pair: TypeAlias = tuple[PreTrainedModel | PeftModelForCausalLM, PreTrainedTokenizerBase]

_cache: dict[tuple[str, str, str], Pair] = {}
_lock = threading.Lock()


class TextProgress(Progress, Protocol):
    """The engine's ``Progress``, plus a stream of text (the app's ``StageWorker`` is one)."""

    def emit_text(self, chunk: str, channel: str = "") -> None:
        """Stream a piece of generated text; ``channel`` says which pane."""


@dataclass(frozen=True)
class ChatSettings:
    """How to answer: the system prompt and the sampling settings (kept per run, see :mod:`.saved_prompts`).

    ``temperature`` 0 means greedy decoding (the same answer every time); above 0 the next token is sampled
    from the ``top_p`` nucleus of the distribution divided by ``temperature``.
    """

    system_prompt: str = ""
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256


Message: TypeAlias = dict[str, str]
"""``{"role": "system" | "user" | "assistant", "content": ...}``"""


@dataclass(frozen=True)
class ChatRequest:
    """The next turn of a conversation, for each side.

    Each side keeps its own conversation: the user's turns are the same, the replies are that side's own
    (``histories[side]`` ends with the new user message). Both sides are sampled with the same ``seed``.
    """

    model_dir: Path
    adapter_dir: Path | None
    histories: dict[str, tuple[Message, ...]]
    settings: ChatSettings = field(default_factory=ChatSettings)
    device: str = "auto"
    seed: int = 0

    @property
    def sides(self) -> tuple[str, ...]:
        return tuple(self.histories)

    def messages(self, side: str) -> list[Message]:
        """What the model of ``side`` reads: the system prompt (if any), then the conversation."""
        system = self.settings.system_prompt.strip()
        return ([{"role": "system", "content": system}] if system else []) + list(self.histories[side])


def _device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_pair(model_dir: Path, adapter_dir: Path | None, device: str) -> Pair:
    """(model with the adapter attached or plain, tokenizer), cached by (model, adapter, device)."""
    key = (str(model_dir), str(adapter_dir), device)
    with _lock:
        if key in _cache:
            return _cache[key]
        _cache.clear()  # one model at a time: memory matters more than switching speed
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(model_dir) / "config.json").exists():
        raise ModelNotFound(f"No model in {model_dir}.", hint="Choose the model again on the Model page.")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(model_dir, local_files_only=True,
                                                                           trust_remote_code=False)
    base: PreTrainedModel = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True,
                                                                      trust_remote_code=False)
    base.to(device)  # type: ignore[arg-type]  # in place; transformers' @wraps(Module.to) hides self from mypy
    model: PreTrainedModel | PeftModelForCausalLM = base
    if adapter_dir is not None:
        from peft import PeftModel

        if not (Path(adapter_dir) / "adapter_config.json").exists():
            raise ModelNotFound(f"No adapter in {adapter_dir}.", hint="Finish the Run page first.")
        model = cast("PeftModelForCausalLM", PeftModel.from_pretrained(base, str(adapter_dir)))  # a causal LM's
    model.eval()
    with _lock:
        _cache[key] = (model, tokenizer)
    return model, tokenizer


def conversation_ids(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> torch.Tensor:
    """The conversation's token ids (1 × T) ending where the assistant's reply starts.

    With a chat template: the template with the generation prompt (a template that refuses the system role
    gets the system prompt in front of the first user message instead). Without one: ``User: …`` /
    ``Assistant: …`` lines, ending with ``Assistant:``.
    """
    import torch

    if tokenizer.chat_template:
        try:
            out = _templated(tokenizer, messages)
        except Exception:  # jinja's TemplateError "System role not supported" (Gemma and others)
            if not messages or messages[0]["role"] != "system":
                raise
            system, rest = messages[0]["content"], messages[1:]
            if rest and rest[0]["role"] == "user":
                rest = [{"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}, *rest[1:]]
            out = _templated(tokenizer, rest)
    else:
        names = {"system": "System", "user": "User", "assistant": "Assistant"}
        text = "".join(f"{names.get(m['role'], m['role'])}: {m['content']}\n" for m in messages) + "Assistant:"
        out = tokenizer(text, return_tensors="pt")
    ids = out["input_ids"]
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"the tokenizer returned {type(ids).__name__} for return_tensors='pt'")
    return ids


def fit_context(tokenizer: PreTrainedTokenizerBase, messages: list[Message], limit: int | None) -> torch.Tensor:
    """``conversation_ids`` of ``messages`` with the oldest turns left out until it fits ``limit`` tokens
    (the system prompt and the last message always stay; ``None``: no limit)."""
    ids = conversation_ids(tokenizer, messages)
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    while limit is not None and ids.shape[1] > limit and len(turns) > 1:
        turns = turns[2:] if len(turns) > 2 else turns[1:]  # a user message and its reply
        ids = conversation_ids(tokenizer, system + turns)
    return ids


def _templated(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> BatchEncoding:
    # return_dict=True: a BatchEncoding (the declared return type also covers the string and list forms)
    return cast("BatchEncoding", tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True))


def chat_side_by_side(req: ChatRequest, progress: TextProgress) -> dict[str, str]:
    """Answer the last user message of each side's conversation, in turn, streaming the reply as
    ``progress.emit_text(chunk, side)``.

    The base side is the same weights with the adapter switched off (``disable_adapter``). Tokens come
    from a ``TextIteratorStreamer`` filled by ``generate`` in a helper thread; Stop is a stopping
    criterion reading the worker's cancel flag, checked between tokens.

    Returns:
        ``{side: reply}``.

    Raises:
        Cancelled: the user pressed Stop.
        ModelNotFound: the model or adapter folder is missing.
    """
    import contextlib

    import torch
    from peft import PeftModel
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    device = _device(req.device)
    progress.update(0.05, "Loading the model…")
    model, tokenizer = load_pair(req.model_dir, req.adapter_dir, device)
    cancel = threading.Event()
    st = req.settings
    sampling: dict[str, object] = {"do_sample": False}
    if st.temperature > 0:
        sampling = {"do_sample": True, "temperature": st.temperature, "top_p": st.top_p}

    class Stop(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> bool:
            return cancel.is_set()

    out: dict[str, str] = {}
    for i, side in enumerate(req.sides):
        progress.update(0.1 + 0.9 * i / len(req.sides), f"Answering ({'base' if side == 'base' else 'fine-tuned'})…")
        window = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        limit = window - st.max_new_tokens if isinstance(window, int) and window > st.max_new_tokens else None
        ids = fit_context(tokenizer, req.messages(side), limit).to(device)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        # the base answer: the same weights with the adapter switched off
        adapter_off = model.disable_adapter if side == "base" and isinstance(model, PeftModel) else None
        errors: list[BaseException] = []
        torch.manual_seed(req.seed)  # both sides draw from the same random stream

        def work(adapter_off: Callable[[], AbstractContextManager[None]] | None = adapter_off,
                 streamer: TextIteratorStreamer = streamer, errors: list[BaseException] = errors,
                 ids: torch.Tensor = ids) -> None:
            ctx = adapter_off() if adapter_off is not None else contextlib.nullcontext()
            try:
                with torch.no_grad(), ctx:
                    # AutoModelForCausalLM's classes and PeftModelForCausalLM generate; PreTrainedModel alone
                    # does not declare it (GenerationMixin is mixed into the concrete classes)
                    cast("GenerationMixin", model).generate(
                        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=st.max_new_tokens,
                        streamer=streamer, stopping_criteria=StoppingCriteriaList([Stop()]),
                        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling)
            except BaseException as exc:  # re-raised on the worker thread below
                errors.append(exc)
                streamer.end()

        thread = threading.Thread(target=work, name=f"generate-{side}", daemon=True)
        thread.start()
        pieces: list[str] = []
        for chunk in streamer:
            pieces.append(chunk)
            progress.emit_text(chunk, side)
            try:
                progress.check_cancelled()
            except Cancelled:
                cancel.set()
                thread.join()
                raise
        thread.join()
        if errors:
            raise errors[0]
        out[side] = "".join(pieces)
    progress.update(1.0, "Done")
    return out
