"""The planner's arithmetic for an original that does not fit: streamed passes, anchors in chunks, RAM and disk.

**When the original is streamed.** Anchors, the λ search and the export verification use the
original model. Resident, one such use takes ``P·b + activations + adapter`` (:func:`resident_original_peak`,
the correction's λ evaluation). When that exceeds the budget the plan sets ``stream_original``: every
use runs the original block by block from its shards (:mod:`emloc_engine.weights.streamed`). Every term
of a streamed stage's GPU peak is what the code holds there (derived term by term against the H100
measurement of Llama-3-8B shapes in 8 GiB, benchmarks/RESULTS.md):

* λ search and export verification (:func:`streamed_pass_peak`): two blocks (running + prefetched), the
  embeddings and head, the hidden states of every held-out sequence × variant (on the GPU up to 1 GiB:
  the worst case when the data's eval count is unknown; in RAM when only that fits the budget,
  :func:`keep_or_offload`), one batch's activations with the adapter hook's
  fp32 copies, one block's adapter (the candidates wait on the CPU); or, at the head, the last block and
  one loss chunk's logits;
* anchored training's pass (:func:`streamed_anchor_peak`): the emulator (whose embedding the original
  shares), the adapter and its AdamW states (later chunks run mid-training), two blocks, the chunk's
  hidden states and one 4096-token group's activations.

Each also counts cuBLAS's 32 MiB workspace, which ``max_memory_allocated`` sees.

**Time of a streamed pass** is bound by moving the weights: ``max(W / rate, compute) × overhead``
where ``W`` is the stored weights and ``rate`` is, as the code moves them:

* pinned RAM → GPU (55 GB/s, measured on an H200 host, PCIe Gen5; ~25 GB/s for PCIe 4.0 cards such
  as the RTX 4090: :data:`~emloc_engine.run.planning.GPU_H2D_BYTES_PER_S`) for the anchor chunks after
  the first when the original is held in pinned RAM (its weights take at most a quarter of the RAM,
  :class:`~emloc_engine.weights.streamed.PinnedBlocks`; the train stage's RAM then includes ``W``);
* the page cache (5 GB/s, unmeasured: one reader thread copying mapped shards into pinned buffers)
  when ``W`` fits in 80 % of the RAM left over by the process and the anchors;
* else the disk (1 GB/s, deliberately conservative: a mid-range NVMe reads 2–3 GB/s, a SATA SSD
  0.5; :class:`~emloc_engine.run.planning.PlannerConstants`).
``overhead`` = 1.3 (the aim for streamed passes vs the transfer floor).

**Anchors** (:func:`anchor_schedule`): every visited example's offsets take ``L·T·h·2`` bytes
(``width`` = every linear's output with ``--anchor linears``). They are held a chunk at a time under
``anchor_ram_bytes`` (``--anchor-ram-gib``, default 4 GiB): RAM = ``min(cap, need)``, chunks =
``⌈need / cap⌉``. Each chunk costs one pass of the original (streamed: its transfer) and one of the
emulator; auto stays on whatever the dataset size, and is off only when one step's offsets exceed the cap.

**RAM of a stage**: the process (3 GiB), plus what the stage holds: the calibration hidden states
(emulator), the emulator's weights on their way to the GPU and the anchors (train), two pinned blocks
when streamed, the merge's largest tensor in fp32 three times and a CPU verification's model (export).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from emloc_engine.core.memory import ANCHOR_GROUP_TOKENS, HIDDEN_OFFLOAD
from emloc_engine.run.planning import (
    EVAL_CHUNK_TOKENS,
    GIB,
    GPU_H2D_BYTES_PER_S,
    PlanConfig,
    Shortfall,
    StagePeak,
    _forward_flops,
    _layer_act,
    _stage,
    _targets,
    compute_bytes,
    emulator_parameters,
    flops_per_second,
    lora_parameters,
)

if TYPE_CHECKING:
    from emloc_engine.catalog.model_facts import ModelFacts

EXPORT_PROMPT_LENGTH = (
    64  # the verification truncates every prompt to this (stages.export.exporter._prompt_ids)
)
EXPORT_PROMPTS = 4  # the default prompts and the chat-templated first one, one batch each
EXPORT_PROMPT_TOKENS = EXPORT_PROMPTS * EXPORT_PROMPT_LENGTH
EXPORT_VARIANTS = 4  # original + adapter, without it, peft's merge, rounded merge (one pass carries them all)


def stored_weights_bytes(facts: ModelFacts) -> int:
    """The original's weights as stored on disk (what a streamed pass reads)."""
    return facts.num_parameters * facts.dtype_bytes


def weights_pinned(facts: ModelFacts, cfg: PlanConfig) -> bool:
    """Whether the anchor passes keep the original in pinned RAM (:class:`~emloc_engine.weights.streamed.PinnedBlocks`:
    its weights take at most a quarter of the RAM, :func:`~emloc_engine.weights.streamed.cache_fits`).
    RAM unknown: assume yes."""
    return cfg.ram_bytes is None or stored_weights_bytes(facts) <= 0.25 * cfg.ram_bytes


def weights_cached(facts: ModelFacts, cfg: PlanConfig) -> bool:
    """Whether the stored weights stay in the page cache between passes (RAM unknown: assume yes)."""
    if cfg.ram_bytes is None:
        return True
    return stored_weights_bytes(facts) <= 0.8 * max(
        0, cfg.ram_bytes - cfg.constants.process_ram_bytes - cfg.anchor_ram_bytes
    )


def h2d_rate(cfg: PlanConfig) -> float:
    """Pinned RAM → GPU bytes per second of the planned GPU (:data:`~emloc_engine.run.planning.GPU_H2D_BYTES_PER_S`)."""
    name = (cfg.gpu_name or "").upper()
    for frag, rate in GPU_H2D_BYTES_PER_S:
        if frag.upper() in name:
            return rate
    return cfg.constants.h2d_bytes_per_s


def stream_rate(facts: ModelFacts, cfg: PlanConfig, pinned: bool = False) -> float:
    """Bytes per second of a streamed pass's weights: pinned RAM → GPU when they are held in pinned RAM
    (``pinned``: the anchor chunks after the first), else from the page cache when they fit it, else the disk."""
    c = cfg.constants
    if pinned and weights_pinned(facts, cfg):
        return h2d_rate(cfg)
    if weights_cached(facts, cfg):
        return min(h2d_rate(cfg), c.page_cache_bytes_per_s)
    return c.stream_disk_bytes_per_s


def pass_seconds(facts: ModelFacts, cfg: PlanConfig, tokens: int) -> float:
    """One streamed pass of the original over ``tokens``: ``max(W / rate, compute) × overhead``."""
    c = cfg.constants
    transfer = stored_weights_bytes(facts) / stream_rate(facts, cfg)
    compute = _forward_flops(facts, facts.num_parameters, tokens, cfg.context_length) / (
        flops_per_second(cfg) * c.infer_mfu
    )
    return max(transfer, compute) * c.stream_overhead


def _outside_bytes(facts: ModelFacts, cfg: PlanConfig, head: bool) -> int:
    b = compute_bytes(facts, cfg)
    return (facts.embedding_parameters + (facts.lm_head_parameters if head else 0)) * b


def cublas_workspace(cfg: PlanConfig) -> int:
    """cuBLAS's workspace on a GPU (:attr:`~emloc_engine.run.planning.PlannerConstants.cublas_workspace_bytes`), 0 elsewhere."""
    return cfg.constants.cublas_workspace_bytes if cfg.device in ("cuda", "rocm") else 0


def hidden_on_device(total_bytes: int, batch_bytes: int, keep_bytes: int = HIDDEN_OFFLOAD) -> int:
    """Bytes of a streamed pass's hidden states on the GPU, as the code places them.

    At most ``keep_bytes`` (the stage's ``hidden_on_gpu_bytes``; by default
    :data:`~emloc_engine.core.memory.HIDDEN_OFFLOAD`, 1 GiB) they all stay on the GPU between
    blocks (:func:`~emloc_engine.stages.correction.evaluation.streamed_losses`,
    :func:`~emloc_engine.stages.training.anchor_chunks.streamed_offsets`); past it they wait in CPU RAM and
    one batch visits the GPU (its copy in, and the block's output, ``2 × batch_bytes``).
    """
    return total_bytes if total_bytes <= keep_bytes else 2 * batch_bytes


def worst_hidden_on_device(max_total_bytes: int, batch_bytes: int, keep_bytes: int = HIDDEN_OFFLOAD) -> int:
    """:func:`hidden_on_device` for the worst number of sequences up to the maximum: when the maximum
    would be offloaded, a smaller set just under the threshold stays on the GPU whole."""
    return max(hidden_on_device(max_total_bytes, batch_bytes, keep_bytes), min(max_total_bytes, keep_bytes))


def leanest_fit(limit: int | None, plans: list[Callable[[], StagePeak]]) -> StagePeak:
    """The first of ``plans`` (fastest first, each leaner than the one before) whose peak fits ``limit``; when
    none fits, the one with the lowest peak (the plan then says by how much it misses)."""
    best = plans[0]()
    if limit is None or best.peak_bytes <= limit:
        return best
    for plan in plans[1:]:
        stage = plan()
        if stage.peak_bytes <= limit:
            return stage
        if stage.peak_bytes < best.peak_bytes:
            best = stage
    return best


def keep_or_offload(limit: int | None, plan: Callable[[int], StagePeak]) -> StagePeak:
    """A streamed stage planned with its hidden states kept on the GPU (up to the default threshold) and,
    when that exceeds ``limit``, with every one offloaded to CPU RAM (threshold 0), whichever fits.

    ``plan(keep_bytes)`` predicts the stage for a threshold. Keeping is preferred (no copies over PCIe);
    offloading is chosen only when it is what makes the stage fit, or lowers a peak that fits neither
    way. The chosen threshold is the stage's ``hidden_on_gpu_bytes``, which :func:`~emloc_engine.run.plan.plan_run`
    passes to the stage that runs it."""
    return leanest_fit(limit, [lambda: plan(HIDDEN_OFFLOAD), lambda: plan(0)])


def layer_args_bytes(facts: ModelFacts, cfg: PlanConfig, batches: int, tokens: int | None = None) -> int:
    """The keyword arguments every batch's layers get, kept on the GPU for the whole pass
    (:func:`~emloc_engine.stages.emulator.calibration.capture_block_inputs`): the rotary ``cos`` and ``sin``
    (``T × head_dim`` each, in the compute dtype) and the positions (int64), shared by every layer."""
    t, b = tokens or cfg.context_length, compute_bytes(facts, cfg)
    return batches * t * (2 * facts.head_dim * b + 16)


def lora_hook_bytes(facts: ModelFacts, cfg: PlanConfig, tokens: int) -> int:
    """Extra bytes of an unmerged adapter's forward hook (:meth:`StreamedModel._lora_hook`) on ``tokens``.

    ``(out.to(fp32) + (x.to(fp32) @ Aᵀ @ Bᵀ) · s).to(out.dtype)``: the fp32 output copy, the fp32 LoRA
    product and its scaled copy live together, 12 bytes per output element of the widest target beyond
    the module's own output (which the activation term counts).
    """
    widest = max((o for o, _ in _targets(facts, cfg)), default=0)
    return 12 * tokens * widest


def streamed_pass_peak(
    facts: ModelFacts,
    cfg: PlanConfig,
    name: str,
    *,
    sequences: int,
    variants: int,
    batch: int,
    head_logits: int,
    extra: list[tuple[str, int]],
    seconds: float,
    ram_bytes: int,
    adapter: bool = False,
    merged_variants: bool = False,
    known_sequences: bool = False,
    seq_tokens: int | None = None,
    keep_bytes: int = HIDDEN_OFFLOAD,
) -> StagePeak:
    """GPU peak of a pass of the original streamed with the head (the λ search, the export verification).

    What :meth:`~emloc_engine.weights.streamed.StreamedModel.run` holds, at the larger of its two phases:

    * **blocks**: the block running and the next one prefetched (two blocks), the embeddings and head,
      the hidden states of every sequence × variant (:func:`hidden_on_device`; the worst case up to
      ``sequences`` unless ``known_sequences``), one batch of ``batch`` sequences' layer activations
      plus, for an unmerged adapter, its hook's fp32 copies (:func:`lora_hook_bytes`) and that block's
      adapter in fp32 (the candidates wait on the CPU; one block's ``A, B`` are on the GPU at a time);
      a merged variant (``merged_variants``) holds a merged copy of the block and, for the largest module,
      ``B·A`` and ``s·B·A`` in fp32;
    * **head**: the last block (the caller's loop still holds its tensors), the embeddings and head, the
      hidden states, and ``head_logits`` (one chunk's logits and their fp32 copies).

    ``seq_tokens``: tokens per sequence (default: the context length). ``keep_bytes``: the hidden states'
    threshold (:func:`hidden_on_device`), recorded on the result as ``hidden_on_gpu_bytes``.
    """
    c, b = cfg.constants, compute_bytes(facts, cfg)
    t = seq_tokens or cfg.context_length
    block = facts.block_parameters * b
    per_seq = t * facts.hidden_size * b
    total = variants * sequences * per_seq
    offloaded = total > keep_bytes
    on_gpu = (
        hidden_on_device(total, batch * per_seq, keep_bytes)
        if known_sequences
        else worst_hidden_on_device(total, batch * per_seq, keep_bytes)
    )
    on_gpu += layer_args_bytes(facts, cfg, math.ceil(sequences / batch), t)
    tokens = batch * t
    act = _layer_act(facts, tokens, b, c.infer_act_h, c.infer_act_i, c.infer_act_qkv)
    block_parts: list[tuple[str, int]] = [("two blocks (running + prefetched)", 2 * block)]
    if adapter:
        act += lora_hook_bytes(facts, cfg, tokens)
        block_parts.append(
            (
                "adapter of one block (fp32)",
                lora_parameters(facts, cfg) * c.lora_param_bytes // facts.num_layers,
            )
        )
    if merged_variants:
        largest = max(m.numel for m in facts.modules)
        # changed[w] = w + ((B @ A) * s).to(w.dtype) for every LoRA module: a merged copy of the block, and
        # the fp32 product with its scaled copy of the largest module in flight
        block_parts.append(("merged copy of the block + s·B·A (fp32, twice)", block + 2 * largest * 4))
    outside = ("embeddings & head", _outside_bytes(facts, cfg, True))
    hidden = ("hidden states of the pass (+ layer arguments)", on_gpu)
    block_phase = [block_parts[0], outside, hidden, ("one batch's activations", act), *block_parts[1:]]
    head_phase = [
        ("last block (still referenced)", block),
        outside,
        hidden,
        ("logits of one chunk", head_logits),
    ]
    parts = block_phase if sum(p[1] for p in block_phase) >= sum(p[1] for p in head_phase) else head_phase
    stage = _stage(name, [*parts, *extra, ("cuBLAS workspace", cublas_workspace(cfg))], cfg, seconds)
    return dataclasses.replace(stage, ram_bytes=ram_bytes + (total if offloaded else 0), streamed=True,
                               hidden_on_gpu_bytes=keep_bytes)


def resident_original_peak(facts: ModelFacts, cfg: PlanConfig) -> int:
    """GPU peak of the original resident with the adapter, evaluating one sequence (the λ search's)."""
    c, b = cfg.constants, compute_bytes(facts, cfg)
    t = cfg.context_length
    act = _layer_act(facts, t, b, c.infer_act_h, c.infer_act_i, c.infer_act_qkv)
    logits = int(min(t, EVAL_CHUNK_TOKENS) * facts.vocab_size * c.eval_logits_bytes)
    parts = [
        ("weights", facts.num_parameters * b),
        ("adapter", lora_parameters(facts, cfg) * c.lora_param_bytes),
        ("activations & loss", max(act, logits)),
    ]
    return _stage("original", parts, cfg, 0.0).peak_bytes


def decide_streaming(facts: ModelFacts, cfg: PlanConfig, budget: int) -> bool:
    """``cfg.stream_original`` when set, else whether the resident original exceeds the budget."""
    if cfg.stream_original is not None:
        return cfg.stream_original
    return resident_original_peak(facts, cfg) > budget


def anchor_width(facts: ModelFacts, cfg: PlanConfig) -> int:
    return sum(m.out_features for m in facts.modules) if cfg.anchor_linears else facts.hidden_size


def anchor_schedule(facts: ModelFacts, cfg: PlanConfig) -> tuple[bool, int, int, int]:
    """``(anchored, ram_bytes, chunks, need_bytes)`` of the anchors (see the module docstring).

    ``anchored`` is False when anchoring is off, or when one step's offsets exceed the cap.
    """
    if not cfg.anchored:
        return False, 0, 0, 0
    per_example = facts.num_layers * cfg.context_length * anchor_width(facts, cfg) * 2
    if cfg.batch_size * per_example > cfg.anchor_ram_bytes:
        return False, 0, 0, cfg.batch_size * per_example
    need = cfg.train_steps * cfg.batch_size * per_example
    return True, min(cfg.anchor_ram_bytes, need), max(1, math.ceil(need / cfg.anchor_ram_bytes)), need


def anchor_seconds(facts: ModelFacts, cfg: PlanConfig, ratio: float, streamed: bool, chunks: int) -> float:
    """Computing every visited example's offsets: one pass of each model per chunk.

    Compute: a forward of the original and of the emulator over the visited tokens. Streamed, each
    chunk also moves the original's weights once (:func:`pass_seconds`); resident, they are read once.
    On a GPU the offsets also cross PCIe twice (``offsets_to_ram_bytes_per_s``, ``offsets_to_gpu_bytes_per_s``):
    at 8B shapes that, not the passes, was most of the anchors' time (measured 2026-12-06).
    """
    c = cfg.constants
    visited = cfg.train_steps * cfg.batch_size * cfg.context_length
    rate = flops_per_second(cfg) * c.infer_mfu
    emu = _forward_flops(
        facts, emulator_parameters(facts, ratio, cfg.dense_modules), visited, cfg.context_length
    )
    orig = _forward_flops(facts, facts.num_parameters, visited, cfg.context_length)
    # every visited example's offsets go to RAM once (its chunk) and back once (its micro-batch)
    offsets = facts.num_layers * visited * anchor_width(facts, cfg) * 2
    moves = 0.0 if cfg.device == "cpu" else (
        offsets / c.offsets_to_ram_bytes_per_s + offsets / c.offsets_to_gpu_bytes_per_s)
    if not streamed:
        return (orig + emu) / rate + stored_weights_bytes(facts) / c.disk_bytes_per_s + moves
    w = stored_weights_bytes(facts)
    # The first chunk reads the shards; later ones copy the pinned RAM copy when there is one.
    transfer = w / stream_rate(facts, cfg) + (chunks - 1) * w / stream_rate(facts, cfg, pinned=True)
    return max(transfer, orig / rate) * c.stream_overhead + emu / rate + moves


def anchor_group_tokens(facts: ModelFacts, cfg: PlanConfig, examples: int, max_tokens: int = ANCHOR_GROUP_TOKENS) -> int:
    """Padded tokens the anchor pass runs together (:func:`~emloc_engine.stages.training.anchoring.length_groups`
    with ``max_tokens``, by default :data:`~emloc_engine.core.memory.ANCHOR_GROUP_TOKENS`): as many ``T``-token
    examples as fit, at least one."""
    t = cfg.context_length
    return t * max(1, min(examples, max_tokens // t))


def anchor_chunk_examples(facts: ModelFacts, cfg: PlanConfig) -> int:
    """Most examples one anchor chunk holds: the visited training examples or the training stage's eval
    examples (``train_eval_batches × B``), whichever are more, as many as the cap's offsets allow, at
    least one step's."""
    per_example = facts.num_layers * cfg.context_length * anchor_width(facts, cfg) * 2
    wanted = max(cfg.train_steps, cfg.train_eval_batches) * cfg.batch_size
    return max(cfg.batch_size, min(wanted, cfg.anchor_ram_bytes // per_example))


def streamed_anchor_peak(
    facts: ModelFacts, cfg: PlanConfig, ratio: float, seconds: float, ram: int, keep_bytes: int = HIDDEN_OFFLOAD,
    group_tokens: int = ANCHOR_GROUP_TOKENS,
) -> StagePeak:
    """The anchor pass with the original streamed, as
    :func:`~emloc_engine.stages.training.anchor_chunks.streamed_offsets` holds it.

    * the emulator's weights (its input embedding is the one the streamed original uses:
      ``embed_weight=``, not loaded twice; ``with_head=False``: no head);
    * the adapter and its AdamW states: a chunk after the first is computed mid-run, with the optimizer's
      states on the GPU (the gradients are freed by ``zero_grad(set_to_none=True)`` before it);
    * two blocks of the original (running + prefetched);
    * the hidden states of the whole chunk (every example the cap allows) between blocks, on the GPU up
      to ``keep_bytes`` (1 GiB unless the plan offloads them to fit), else one group's copy (and the chunk's
      hidden states in RAM);
    * one group (up to ``group_tokens`` padded tokens, :data:`~emloc_engine.core.memory.ANCHOR_GROUP_TOKENS`
      unless the plan needs one example at a time): a block's
      activations, with the original block's output held while the emulator's block runs (with
      ``--anchor linears`` every linear's original output too).
    """
    c, b = cfg.constants, compute_bytes(facts, cfg)
    emu = emulator_parameters(facts, ratio, cfg.dense_modules) * b
    n_lora = lora_parameters(facts, cfg)
    t = cfg.context_length
    examples = anchor_chunk_examples(facts, cfg)
    group = anchor_group_tokens(facts, cfg, examples, group_tokens)
    per_token = facts.hidden_size * b
    total = examples * t * per_token
    hidden = hidden_on_device(total, group * per_token // 2, keep_bytes)
    hidden += layer_args_bytes(facts, cfg, math.ceil(examples * t / group))
    act = _layer_act(facts, group, b, c.infer_act_h, c.infer_act_i, c.infer_act_qkv) + group * per_token
    if cfg.anchor_linears:
        act += group * anchor_width(facts, cfg) * b
    parts = [
        (f"emulator weights (ρ={ratio:.2f})", emu),
        ("LoRA weights + AdamW states (fp32)", n_lora * (c.lora_param_bytes + c.adam_state_bytes)),
        ("two blocks (running + prefetched)", 2 * facts.block_parameters * b),
        ("hidden states of the chunk (+ layer arguments)", hidden),
        (f"one group's activations ({group} tokens)", act),
        ("cuBLAS workspace", cublas_workspace(cfg)),
    ]
    stage = _stage("train", parts, cfg, seconds)
    return dataclasses.replace(stage, ram_bytes=ram + (total if total > keep_bytes else 0), streamed=True,
                               hidden_on_gpu_bytes=keep_bytes, anchor_group_tokens=group_tokens)


def stage_ram(
    facts: ModelFacts,
    cfg: PlanConfig,
    name: str,
    *,
    ratio: float,
    streamed: bool,
    anchor_ram: int = 0,
    hidden_offloaded: int = 0,
    cpu_verify_bytes: int = 0,
) -> int:
    """RAM one stage needs (see the module docstring)."""
    c, b = cfg.constants, compute_bytes(facts, cfg)
    pinned = 2 * facts.block_parameters * facts.dtype_bytes
    if name == "emulator":
        return c.process_ram_bytes + hidden_offloaded + pinned
    if name == "train":
        emu = emulator_parameters(facts, ratio, cfg.dense_modules) * b
        held = stored_weights_bytes(facts) if streamed and anchor_ram and weights_pinned(facts, cfg) else 0
        return c.process_ram_bytes + anchor_ram + held + max(emu if not streamed else 0, pinned)
    if name == "correct":
        largest = max(m.numel for m in facts.modules)
        return c.process_ram_bytes + max(3 * largest * 4, pinned)
    # The merge streams tensor by tensor: a merged module three times in fp32, or the embedding as stored.
    merge = max(3 * max(m.numel for m in facts.modules) * 4, facts.embedding_parameters * facts.dtype_bytes)
    gguf = facts.num_parameters * b if streamed and "gguf" in cfg.export_formats else 0
    return c.process_ram_bytes + max(merge, pinned) + cpu_verify_bytes + gguf


def disk_need_bytes(facts: ModelFacts, cfg: PlanConfig, ratio: float) -> int:
    """What the run folder takes: emulator, checkpoints, adapters, and the exports asked for."""
    c, b = cfg.constants, compute_bytes(facts, cfg)
    n_lora = lora_parameters(facts, cfg)
    total = emulator_parameters(facts, ratio, cfg.dense_modules) * b
    total += 2 * n_lora * (c.lora_param_bytes + c.adam_state_bytes) + 2 * n_lora * c.lora_param_bytes
    if "merged" in cfg.export_formats:
        total += stored_weights_bytes(facts)
    if "gguf" in cfg.export_formats:
        total += facts.num_parameters * 2
    return total


def shortfalls(
    facts: ModelFacts, cfg: PlanConfig, stages: tuple[StagePeak, ...], ratio: float
) -> list[Shortfall]:
    """RAM and disk the run cannot do without, when the machine has less."""
    out = []
    ram = max((s.ram_bytes for s in stages), default=0)
    if cfg.ram_bytes is not None and ram > cfg.ram_bytes:
        worst = max(stages, key=lambda s: s.ram_bytes)
        out.append(Shortfall("RAM", ram, cfg.ram_bytes, f"the {worst.name} stage"))
    if cfg.disk_free_bytes is not None:
        need = disk_need_bytes(facts, cfg, ratio)
        if need > cfg.disk_free_bytes:
            out.append(
                Shortfall(
                    "disk", need, cfg.disk_free_bytes, "the run folder (emulator, checkpoints, exports)"
                )
            )
    return out


def gpu_floor_shortfall(facts: ModelFacts, cfg: PlanConfig, budget: int) -> Shortfall | None:
    """The budget is below what the embeddings and head alone take on the GPU (no ρ can help)."""
    b = compute_bytes(facts, cfg)
    need = _stage(
        "floor",
        [("embeddings & head", (facts.embedding_parameters + facts.lm_head_parameters) * b)],
        cfg,
        0.0,
    ).peak_bytes
    if need <= budget:
        return None
    return Shortfall("GPU budget", need, budget, "the embeddings and head alone")


__all__ = [
    "GIB",
    "anchor_schedule",
    "anchor_seconds",
    "decide_streaming",
    "disk_need_bytes",
    "gpu_floor_shortfall",
    "pass_seconds",
    "resident_original_peak",
    "shortfalls",
    "stage_ram",
    "streamed_anchor_peak",
    "streamed_pass_peak",
    "weights_cached",
]
