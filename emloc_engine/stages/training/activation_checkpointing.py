"""Activation checkpointing of every block of a transformers model, for LoRA training (text and VLM alike).

``enable_activation_checkpointing(model)`` turns on transformers' non-reentrant checkpointing of every
``GradientCheckpointingLayer``: the decoder's blocks, and for a vision-language model the vision
tower's blocks too (one call on the top model reaches both). Between the forward and the backward a
checkpointed block keeps only its inputs (``tokens × hidden`` per block, ``patches × width`` for a
vision block); its activations are recomputed, one block at a time, in the backward pass.

transformers also hooks every input embedding it finds (the token embeddings, and a vision tower's
patch embedding) so that its output requires grad: that is what REENTRANT checkpointing needs to
propagate gradients. Non-reentrant checkpointing does not, and the hook costs memory: a tower that
carries no LoRA (e.g. a vision tower kept dense, so not adapted) would then build an autograd graph and
keep its activations for a backward that computes nothing useful. We remove those hooks, so a
module without trainable parameters downstream of the inputs runs without a graph.
"""

from __future__ import annotations

from typing import Any


def enable_activation_checkpointing(model: Any) -> None:
    """Non-reentrant activation checkpointing of every block of ``model`` (a transformers ``PreTrainedModel``)."""
    kwargs = {"use_reentrant": False}  # non-reentrant: no inputs that require grad; dropout RNG preserved
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers >= 5
        enable(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - older transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    disable = getattr(model, "disable_input_require_grads", None)
    if disable is not None:
        disable()


__all__ = ["enable_activation_checkpointing"]
