"""What a vision-language model adds to the memory plan: image tokens and the vision tower's activations.

Kept apart from :mod:`emloc_engine.run.planning` (one call in :func:`~emloc_engine.run.planning.plan_memory`),
which plans a decoder over ``context_length`` tokens. For a VLM we plan the same decoder over the
tokens it really sees, and charge the vision tower's activations in decoder-token equivalents:

* each image puts ``tokens_per_image`` tokens into the context (at the processor's default
  resolution, :mod:`emloc_engine.vision.facts`); they usually dominate the context;
* the vision tower runs over ``patches_per_image`` patches of width ``h_v``; per block its
  activations scale like the decoder's per token and width, so they count as
  ``patches · h_v / h`` extra context tokens (the vision blocks run one at a time, like the decoder's).

Training checkpoints every block of both towers (as for text), so it keeps each block's input: for the
decoder ``L·T·h`` with T the text and image tokens, for the vision tower ``L_v·patches·h_v``, which the
patch equivalents above count (to within ``L_v / L``; the planned block recompute, over all ``T``
tokens at once, is larger than either tower's real one). Correction and inference evaluate the head on
label positions in chunks, so their logits do not grow with the image tokens.

The vision tower's weights are already in ``num_parameters`` (read from the headers) and are
counted as dense: the plan is conservative by the part of the vision linears the emulator removes
(a few percent of a 7–8 B model). Decision: one image per sample unless told otherwise (the usual
VQA / caption / document sample).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

IMAGES_PER_SAMPLE = 1


def vision_context_tokens(facts: Any, images_per_sample: int = IMAGES_PER_SAMPLE) -> int:
    """Extra context tokens a VLM sample costs: its image tokens plus the vision tower's patches in
    decoder-token equivalents (0 for a text model)."""
    vision = getattr(facts, "vision", None)
    if vision is None or images_per_sample <= 0:
        return 0
    patches_equiv = math.ceil(vision.patches_per_image * vision.hidden_size / max(1, facts.hidden_size))
    return images_per_sample * (vision.tokens_per_image + patches_equiv)


def vlm_plan_config(facts: Any, cfg: Any, images_per_sample: int = IMAGES_PER_SAMPLE) -> Any:
    """``cfg`` with ``context_length`` grown by :func:`vision_context_tokens`, and the original resident
    (``stream_original=False``) for a VLM; unchanged for text models.

    The VLM stages (:mod:`emloc_engine.vision.finetune`) never stream the original: the λ search and the
    anchors' recording pass load it whole, like inference. Planning them as streamed (one block at a time)
    predicted 5.8 GiB for a correction that took the whole model (17.3 GiB on Qwen2.5-VL-7B shapes).
    """
    extra = vision_context_tokens(facts, images_per_sample)
    if getattr(facts, "vision", None) is None:
        return cfg
    return replace(cfg, context_length=cfg.context_length + extra, stream_original=False)


__all__ = ["IMAGES_PER_SAMPLE", "vision_context_tokens", "vlm_plan_config"]
