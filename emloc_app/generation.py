"""Side-by-side generation: the base model and the base model + (corrected) adapter, streamed.

Runs in a worker thread. One copy of the base model is loaded (cached across prompts); the
adapter is attached with peft and switched off for the base answer (``disable_adapter``), so
both answers come from the same weights. Tokens stream through
``transformers.TextIteratorStreamer`` from a generation thread; cancel is a stopping criterion
that reads the worker's cancel flag.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, cast

from emloc_engine.core.errors import Cancelled, ModelNotFound
from emloc_engine.core.progress import Progress

if TYPE_CHECKING:
    import torch
    from peft import PeftModelForCausalLM
    from transformers import BatchEncoding, GenerationMixin, PreTrainedModel, PreTrainedTokenizerBase

    Pair: TypeAlias = tuple[PreTrainedModel | PeftModelForCausalLM, PreTrainedTokenizerBase]

_cache: dict[tuple[str, str, str], Pair] = {}
_processors: dict[tuple[str, str, str], object] = {}  # vision-language models: their processor
_lock = threading.Lock()


class TextProgress(Progress, Protocol):
    """The engine's ``Progress``, plus a stream of text (the app's ``StageWorker`` is one)."""

    def emit_text(self, chunk: str, channel: str = "") -> None:
        """Stream a piece of generated text; ``channel`` says which pane."""


@dataclass(frozen=True)
class GenerateRequest:
    """One prompt for both models."""

    model_dir: Path
    adapter_dir: Path | None
    prompt: str
    max_new_tokens: int = 128
    device: str = "auto"
    sides: tuple[str, ...] = ("base", "tuned")
    image: Path | None = None  # a vision-language model answers about this image


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
        _processors.clear()
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    if not (Path(model_dir) / "config.json").exists():
        raise ModelNotFound(f"No model in {model_dir}.", hint="Choose the model again on the Model page.")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    base: PreTrainedModel
    if is_vision_language_folder(Path(model_dir)):
        from emloc_engine.vision.processor import load_processor

        processor = load_processor(Path(model_dir))
        tokenizer: PreTrainedTokenizerBase = processor.tokenizer
        base = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype, local_files_only=True,
                                                           trust_remote_code=False)
        with _lock:
            _processors[key] = processor
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True,
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


def is_vision_language_folder(model_dir: Path) -> bool:
    """Whether a model folder holds a vision-language model (its config has a vision tower)."""
    import json

    try:
        return "vision_config" in json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def _image_inputs(processor: object, prompt: str, image: Path, device: str) -> dict[str, torch.Tensor]:
    """The processor's inputs for one question about one image, through the model's chat template."""
    from emloc_engine.data.images import processor_inputs

    p = cast("Any", processor)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = p.tokenizer.apply_chat_template(msgs, chat_template=p.chat_template, tokenize=False,
                                           add_generation_prompt=True)
    inputs = processor_inputs(processor, [str(text)], [[Path(image)]])
    return {k: v.to(device) for k, v in inputs.items() if hasattr(v, "to")}


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> torch.Tensor:
    """The prompt's token ids (1 × T), through the chat template when the tokenizer has one."""
    import torch

    if tokenizer.chat_template:
        # return_dict=True: a BatchEncoding (the declared return type also covers the string and list forms)
        out = cast("BatchEncoding", tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True))
    else:
        out = tokenizer(prompt, return_tensors="pt")
    ids = out["input_ids"]
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"the tokenizer returned {type(ids).__name__} for return_tensors='pt'")
    return ids


def generate_side_by_side(req: GenerateRequest, progress: TextProgress) -> dict[str, str]:
    """Answer ``req.prompt`` with each side in turn, streaming text as ``progress.emit_text(chunk, side)``.

    Returns:
        ``{side: full text}``.

    Raises:
        Cancelled: the user pressed Stop (checked between tokens).
        ModelNotFound: the model or adapter folder is missing.
    """
    import contextlib

    import torch
    from peft import PeftModel
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    device = _device(req.device)
    progress.update(0.05, "Loading the model…")
    model, tokenizer = load_pair(req.model_dir, req.adapter_dir, device)
    processor = _processors.get((str(req.model_dir), str(req.adapter_dir), device))
    if processor is not None and req.image is not None:
        extra = _image_inputs(processor, req.prompt, req.image, device)
        ids = extra.pop("input_ids")
        if "pixel_values" in extra and extra["pixel_values"].is_floating_point():
            extra["pixel_values"] = extra["pixel_values"].to(next(model.parameters()).dtype)
    else:
        extra = {}
        ids = _prompt_ids(tokenizer, req.prompt).to(device)
    cancel = threading.Event()

    class Stop(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> bool:
            return cancel.is_set()

    out: dict[str, str] = {}
    for i, side in enumerate(req.sides):
        progress.update(0.1 + 0.9 * i / len(req.sides), f"Generating ({side})…")
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        # the base answer: the same weights with the adapter switched off
        adapter_off = model.disable_adapter if side == "base" and isinstance(model, PeftModel) else None
        errors: list[BaseException] = []

        def work(adapter_off: Callable[[], AbstractContextManager[None]] | None = adapter_off,
                 streamer: TextIteratorStreamer = streamer, errors: list[BaseException] = errors) -> None:
            ctx = adapter_off() if adapter_off is not None else contextlib.nullcontext()
            try:
                with torch.no_grad(), ctx:
                    # AutoModelForCausalLM's classes and PeftModelForCausalLM generate; PreTrainedModel alone
                    # does not declare it (GenerationMixin is mixed into the concrete classes)
                    cast("GenerationMixin", model).generate(
                        input_ids=ids, **{"attention_mask": torch.ones_like(ids), **extra},
                        max_new_tokens=req.max_new_tokens,
                        do_sample=False, streamer=streamer, stopping_criteria=StoppingCriteriaList([Stop()]),
                        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
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
