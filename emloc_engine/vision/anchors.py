"""Anchored training for vision-language models: the emulator reproduces the original on the training samples.

The same device as for text (:mod:`emloc_engine.stages.training.anchoring`, "blocks"), over every block
of both towers: for sample ``i`` and block ``l`` (vision tower or language model) the offset

    c_l(i) = h_l(i) − block_l^E(h_{l−1}(i)),        h = the ORIGINAL model's block inputs and outputs,

is added to block ``l``'s output while training on sample ``i``. With a zero adapter the anchored
emulator then reproduces the original's vision features, its language model's hidden states and so
its logits on these samples, and each adapter's gradient is taken at the original's activations.

How (:func:`vlm_anchor_offsets`): one pass of the ORIGINAL over the samples records every block's input
and output (hooks; nothing else is kept), the original is freed, then one pass of the emulator in which
a pre-hook feeds each block the original's input (so ``block_l^E`` sees ``h_{l−1}``) gives the
offsets. The two models are never on the device together. The records are held in CPU memory, up to
``ram_bytes`` (``--anchor-ram-gib``); a dataset whose records do not fit is not anchored ("auto", with
a note saying so) or refused ("blocks"): unlike text, VLM anchors are not computed chunk by chunk yet.

Samples are keyed by their position in ``train + eval`` (eval samples are anchored too, so the
trainer's eval loss tracks the anchored emulator, as for text).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from emloc_engine.core.errors import ConfigError
from emloc_engine.core.progress import NULL_PROGRESS, Progress
from emloc_engine.stages.training.anchoring import _out, _replace


class AnchorsTooLarge(ConfigError):
    """The anchors of the dataset do not fit the RAM allowed for them."""


def block_modules(model: Any, config: Any) -> dict[str, torch.nn.Module]:
    """Every block of the vision tower and of the language model, by module name."""
    from emloc_engine.vision.families import vlm_spec

    spec = vlm_spec(config)
    names = [f"{tower.module_prefix}.{b}" for tower in spec.towers for b in range(tower.num_blocks)]
    return {n: model.get_submodule(n) for n in names}


def _hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(
    args: tuple[Any, ...], kwargs: dict[str, Any], new: torch.Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args:
        return (new, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": new}


def _forward(model: Any, batch: dict[str, Any]) -> None:
    batch = dict(batch)
    batch.pop("labels", None)
    with torch.no_grad():
        model(**batch, use_cache=False)


@contextlib.contextmanager
def _hooks(blocks: dict[str, torch.nn.Module], pre: Any = None, post: Any = None) -> Iterator[None]:
    # Prepended: transformers records hidden states (output_hidden_states) with hooks of its own, which must
    # see the anchored outputs (LLaVA's image features are the second-to-last vision block's).
    handles = []
    try:
        for name, m in blocks.items():
            if pre is not None:
                handles.append(m.register_forward_pre_hook(pre(name), with_kwargs=True, prepend=True))
            if post is not None:
                handles.append(m.register_forward_hook(post(name), prepend=True))
        yield
    finally:
        for h in handles:
            h.remove()


def record_original(
    model: Any,
    n: int,
    batch_of: Callable[[int], dict[str, Any]],
    ram_bytes: int,
    progress: Progress = NULL_PROGRESS,
) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Every block's (input, output) of the original ``model`` on samples ``batch_of(0..n-1)``, on the CPU.

    Raises:
        AnchorsTooLarge: the records outgrow ``ram_bytes`` (the partial records are dropped).
    """
    blocks = block_modules(model, model.config)
    records: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
    held = 0

    def post(name: str) -> Any:
        def hook(_m: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            records[-1][name] = (_hidden(args, kwargs).detach().cpu(), _out(out).detach().cpu())

        return hook

    with contextlib.ExitStack() as stack:
        for name, m in blocks.items():
            handle = m.register_forward_hook(post(name), with_kwargs=True)
            stack.callback(handle.remove)
        for i in range(n):
            progress.check_cancelled()
            records.append({})
            _forward(model, batch_of(i))
            held += sum(
                a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in records[-1].values()
            )
            if held > ram_bytes:
                records.clear()
                raise AnchorsTooLarge(
                    f"The anchors of {n} samples need more than {ram_bytes / 2**30:.2f} GiB of RAM "
                    f"({held / 2**30:.2f} GiB after {i + 1}).",
                    hint="Raise --anchor-ram-gib, use fewer samples, or train without anchors (--anchor none).",
                )
            progress.update((i + 1) / n, f"original: sample {i + 1}/{n}")
    return records


def emulator_offsets(
    model: Any,
    batch_of: Callable[[int], dict[str, Any]],
    records: list[dict[str, tuple[torch.Tensor, torch.Tensor]]],
    progress: Progress = NULL_PROGRESS,
) -> list[dict[str, torch.Tensor]]:
    """``c_l = h_l − block_l^E(h_{l−1})`` per sample and block, with each block fed the original's input.

    ``records`` is consumed (each sample's records are dropped once its offsets are made).
    """
    blocks = block_modules(model, model.config)
    offsets: list[dict[str, torch.Tensor]] = []
    current: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def pre(name: str) -> Any:
        def hook(_m: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            h = _hidden(args, kwargs)
            return _with_hidden(args, kwargs, current[name][0].to(h.device, h.dtype))

        return hook

    def post(name: str) -> Any:
        def hook(_m: torch.nn.Module, _args: Any, out: Any) -> None:
            offsets[-1][name] = current[name][1] - _out(out).detach().cpu().to(current[name][1].dtype)

        return hook

    with _hooks(blocks, pre, post):
        n = len(records)
        for i in range(n):
            progress.check_cancelled()
            current = records[i]
            offsets.append({})
            _forward(model, batch_of(i))
            records[i] = {}
            progress.update((i + 1) / n, f"emulator: sample {i + 1}/{n}")
    return offsets


@dataclass
class VlmAnchors:
    """Per-sample offsets of every block; :meth:`select` picks the sample the next forward sees."""

    offsets: list[dict[str, torch.Tensor]]
    current: int | None = None
    _blocks: dict[str, torch.nn.Module] = field(default_factory=dict, repr=False)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for o in self.offsets for t in o.values())

    def select(self, index: int | None) -> None:
        self.current = index

    @contextlib.contextmanager
    def attached(self, model: Any) -> Iterator[VlmAnchors]:
        """Forward hooks on every block that add the selected sample's offsets."""

        def post(name: str) -> Any:
            def hook(_m: torch.nn.Module, _args: Any, out: Any) -> Any:
                if self.current is None:
                    return None
                h = _out(out)
                c = self.offsets[self.current][name]
                if c.shape != h.shape:
                    raise ConfigError(
                        f"Anchor of {name} has shape {tuple(c.shape)}, the block's output {tuple(h.shape)}."
                    )
                return _replace(out, h + c.to(h.device, h.dtype))

            return hook

        with _hooks(block_modules(model, model.config), post=post):
            try:
                yield self
            finally:
                self.current = None


__all__ = ["AnchorsTooLarge", "VlmAnchors", "block_modules", "emulator_offsets", "record_original"]
