"""Side-by-side generation: the base model and the base model + (corrected) adapter, streamed.

Runs in a worker thread. One copy of the base model is loaded (cached across prompts); the
adapter is attached with peft and switched off for the base answer (``disable_adapter``), so
both answers come from the same weights. Tokens stream through
``transformers.TextIteratorStreamer`` from a generation thread; cancel is a stopping criterion
that reads the worker's cancel flag.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emloc_engine.core.errors import Cancelled, ModelNotFound

_cache: dict[tuple[str, str, str], tuple[Any, Any]] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class GenerateRequest:
    """One prompt for both models."""

    model_dir: Path
    adapter_dir: Path | None
    prompt: str
    max_new_tokens: int = 128
    device: str = "auto"
    sides: tuple[str, ...] = ("base", "tuned")


def _device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_pair(model_dir: Path, adapter_dir: Path | None, device: str) -> tuple[Any, Any]:
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
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True,
                                                     trust_remote_code=False)
    model = model.to(device)
    if adapter_dir is not None:
        from peft import PeftModel

        if not (Path(adapter_dir) / "adapter_config.json").exists():
            raise ModelNotFound(f"No adapter in {adapter_dir}.", hint="Finish the Run page first.")
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    with _lock:
        _cache[key] = (model, tokenizer)
    return model, tokenizer


def _prompt_ids(tokenizer: Any, prompt: str) -> Any:
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        return out["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def generate_side_by_side(req: GenerateRequest, progress: Any) -> dict[str, str]:
    """Answer ``req.prompt`` with each side in turn, streaming text as ``progress.emit_text(chunk, side)``.

    Returns:
        ``{side: full text}``.

    Raises:
        Cancelled: the user pressed Stop (checked between tokens).
        ModelNotFound: the model or adapter folder is missing.
    """
    import contextlib

    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    device = _device(req.device)
    progress.update(0.05, "Loading the model…")
    model, tokenizer = load_pair(req.model_dir, req.adapter_dir, device)
    ids = _prompt_ids(tokenizer, req.prompt).to(device)
    cancel = threading.Event()

    class Stop(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
            return cancel.is_set()

    out: dict[str, str] = {}
    for i, side in enumerate(req.sides):
        progress.update(0.1 + 0.9 * i / len(req.sides), f"Generating ({side})…")
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        use_base = side == "base" and hasattr(model, "disable_adapter")
        errors: list[BaseException] = []

        def work(use_base: bool = use_base, streamer: Any = streamer, errors: list[BaseException] = errors) -> None:
            ctx = model.disable_adapter() if use_base else contextlib.nullcontext()
            try:
                with torch.no_grad(), ctx:
                    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=req.max_new_tokens,
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
