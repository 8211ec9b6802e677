"""A model folder as a transformers model for inference, optionally with a peft adapter attached.

"Original + adapter" is what the λ search evaluates, what the export verification compares every
export with, and what the app's side-by-side answers come from; all of them load it with
:func:`load_causal_lm`, so they run the same model. The adapter is attached unmerged as peft's
``"default"`` adapter, frozen, so ``model.disable_adapter()`` gives the original model from the
same weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from emloc_engine.core.errors import ModelNotFound

ADAPTER_NAME = "default"


def load_causal_lm(model_dir: Path, *, device: torch.device, dtype: torch.dtype,
                   adapter_dir: Path | None = None, input_embeddings_on_cpu: bool = False) -> Any:
    """Load a causal LM from a local folder, on ``device`` in ``dtype``, in eval mode.

    The weights go straight to a GPU (a ``device_map``), never as a whole copy in CPU memory first.

    Args:
        model_dir: a Hugging Face model folder (config + safetensors).
        device: where the model runs (:func:`emloc_engine.machine.devices.resolve_device`).
        dtype: dtype of the model's weights (peft keeps LoRA factors in fp32).
        adapter_dir: a peft adapter whose modules name this model's modules; attached as
            :data:`ADAPTER_NAME`, not trainable.
        input_embeddings_on_cpu: after loading, move an untied input-embedding table back to the CPU
            (:mod:`emloc_engine.weights.cpu_embeddings`); for evaluations without gradients.

    Returns:
        A ``transformers`` model, or a ``peft.PeftModel`` when ``adapter_dir`` is given.

    Raises:
        ModelNotFound: the model or the adapter cannot be loaded (the message names both).
    """
    from transformers import AutoModelForCausalLM

    from emloc_engine.weights.gguf_source import is_gguf_view

    placement: dict[str, Any] = {} if device.type == "cpu" else {"device_map": {"": str(device)}}
    try:
        model: Any
        if is_gguf_view(Path(model_dir)):
            model = _load_from_gguf(Path(model_dir), device, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(Path(model_dir), dtype=dtype, local_files_only=True,
                                                         trust_remote_code=False, **placement)
        if input_embeddings_on_cpu:
            from emloc_engine.weights.cpu_embeddings import keep_input_embeddings_on_cpu

            keep_input_embeddings_on_cpu(model, device)
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=ADAPTER_NAME, is_trainable=False)
    except (OSError, ValueError, KeyError) as exc:
        with_adapter = f" with the adapter {adapter_dir}" if adapter_dir is not None else ""
        raise ModelNotFound(f"Cannot load {model_dir}{with_adapter}: {exc}") from exc
    model.eval()
    return model


def _load_from_gguf(model_dir: Path, device: torch.device, dtype: torch.dtype) -> Any:
    """A model view's model: built on the meta device, each weight dequantized from the GGUF straight
    into ``dtype`` and moved to ``device`` before the next is read (CPU memory holds one tensor)."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from emloc_engine.weights.checkpoint import Checkpoint
    from emloc_engine.weights.gguf_source import tied_parameters

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    with init_empty_weights(include_buffers=False):
        model: Any = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    tied = tied_parameters(model)
    ckpt = Checkpoint(model_dir)
    try:
        missing = [n for n, _ in model.named_parameters() if n not in ckpt and n not in tied]
        if missing:
            raise ModelNotFound(f"The GGUF of {model_dir} has no weights for {missing[:5]}.")
        for name in [n for n, _ in model.named_parameters() if n not in tied]:
            set_module_tensor_to_device(model, name, device, value=ckpt.get(name, dtype=dtype), dtype=dtype)
    finally:
        ckpt.close()
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise ModelNotFound(f"The GGUF of {model_dir} left {still_meta[:5]} without weights.")
    model.to(device)
    if (model_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    return model


__all__ = ["ADAPTER_NAME", "load_causal_lm"]
