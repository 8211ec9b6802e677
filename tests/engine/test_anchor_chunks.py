"""Anchors a chunk at a time (emloc_engine.stages.training.anchor_chunks): any dataset size, RAM under the cap."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig

from emloc_engine.data.render import Example
from emloc_engine.stages.training.anchor_chunks import AnchorFeed
from emloc_engine.stages.training.anchoring import anchor_width
from emloc_engine.stages.training.trainer import prepare_anchors, train_on_examples
from emloc_engine.weights.lowrank import read_emulator_meta
from tests.emulator_factory import write_svd_emulator
from tests.engine.test_training import cfg_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_EXAMPLES = 10_000


@pytest.fixture(scope="module")
def pair(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    emu = write_svd_emulator(tiny_llama, tmp_path_factory.mktemp("chunks") / "emulator", ratio=0.3)
    return tiny_llama, emu


def short_examples(n: int, seed: int = 0) -> list[Example]:
    """``n`` short examples (5–9 tokens, loss after the first two)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = tuple(rng.randrange(4, 260) for _ in range(rng.randrange(5, 10)))
        out.append(Example(ids, (-100, -100, *ids[2:])))
    return out


def _train(pair: tuple[Path, Path], run: Path, data: list[Example], eval_: list[Example], **kw: Any) -> Any:
    from emloc_engine.stages.training.trainer import anchor_record

    settings: dict[str, Any] = dict(steps=6, batch_size=2, grad_accum=2, dropout=0.0, eval_every=3, save_every=0,
                                    warmup_steps=1, max_eval_batches=2, anchor="blocks")
    cfg = cfg_for(run, pair[1], **{**settings, **kw})
    anchors, note, seconds = prepare_anchors(cfg, read_emulator_meta(pair[1]), data, eval_=eval_)
    result = train_on_examples(cfg, data, eval_, pad_id=0, anchors=anchors)
    return anchors, {**anchor_record(anchors, note, seconds), "result": result}


def test_ten_thousand_examples_stay_anchored_under_the_cap(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """A cap of ~6 examples' offsets: the run is anchored in chunks, the store never exceeds the cap,
    and the losses equal those of the run whose offsets were all computed at once (resident original)."""
    data, eval_ = short_examples(N_EXAMPLES), short_examples(4, seed=1)
    per_token = anchor_width(AutoConfig.from_pretrained(pair[1]), "blocks") * 4
    cap_bytes = 6 * 9 * per_token  # six of the longest examples
    small, chunked = _train(pair, tmp_path / "chunked", data, eval_, anchor_ram_gib=cap_bytes / 2**30)
    assert small.feed is not None and isinstance(small.feed, AnchorFeed)
    assert chunked["anchor"] == "blocks" and "chunks of at most" in chunked["anchor_note"]
    assert 0 < chunked["anchor_peak_bytes"] <= cap_bytes
    assert chunked["anchor_chunks"] >= 3  # 6 steps × 4 examples + eval: several chunks
    assert small.nbytes() <= cap_bytes
    whole, ref = _train(pair, tmp_path / "whole", data, eval_)  # default cap: all at once, resident
    assert whole.feed is None and ref["anchor_chunks"] == 1
    got, want = chunked["result"], ref["result"]
    assert [v for _, v in got.loss_history] == pytest.approx([v for _, v in want.loss_history], rel=1e-5)
    assert [v for _, v in got.eval_history] == pytest.approx([v for _, v in want.eval_history], rel=1e-5)


def test_eval_offsets_are_kept_only_when_the_run_evaluates_before_its_end(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """Kept (sticky) eval offsets take part of every chunk; a run that evaluates only after its last step
    computes them once at the end instead, so its training chunks hold only training examples."""
    data, eval_ = short_examples(48), short_examples(4, seed=1)
    per_token = anchor_width(AutoConfig.from_pretrained(pair[1]), "blocks") * 4
    cap = 8 * 9 * per_token  # eight of the longest examples; the 4 eval examples fit half of it
    kept, mid = _train(pair, tmp_path / "mid", data, eval_, anchor_ram_gib=cap / 2**30)
    once, end = _train(pair, tmp_path / "end", data, eval_, anchor_ram_gib=cap / 2**30, eval_every=0)
    assert kept.feed.sticky and not once.feed.sticky
    # 6 steps x 4 examples: with eval rows held, each chunk has room for at most one step's 4 new examples
    assert mid["anchor_chunks"] >= 6
    assert end["anchor_chunks"] < mid["anchor_chunks"]
    assert end["anchor_chunks"] <= 24 // 4 // 2 + 1 + 1  # chunks of two steps, plus the final eval's
    assert [v for _, v in end["result"].loss_history] == pytest.approx(
        [v for _, v in mid["result"].loss_history], rel=1e-5)
    assert end["result"].final_eval_loss == pytest.approx(mid["result"].final_eval_loss, rel=1e-5)


def test_the_originals_blocks_held_in_ram_are_given_back_when_training_ends(
    pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunked anchors keep the original's blocks in (pinned) RAM between chunks; once training is over the
    feed drops them and empties the host allocator's cache, so correction and export do not carry them."""
    from emloc_engine.stages.training import anchor_chunks

    released: list[int] = []
    monkeypatch.setattr(anchor_chunks, "release_pinned_host_cache", lambda: released.append(1) or True)
    kept: list[Any] = []
    real = anchor_chunks.AnchorFeed._block_cache

    def spy(self: Any) -> Any:
        cache = real(self)
        kept.append(cache)
        return cache

    monkeypatch.setattr(anchor_chunks.AnchorFeed, "_block_cache", spy)
    data, eval_ = short_examples(24), short_examples(4, seed=1)
    per_token = anchor_width(AutoConfig.from_pretrained(pair[1]), "blocks") * 4
    anchors, record = _train(pair, tmp_path / "run", data, eval_, anchor_ram_gib=6 * 9 * per_token / 2**30)
    assert record["anchor_chunks"] >= 2 and kept[0] is not None and kept[0].nbytes() > 0  # blocks were held
    assert anchors.feed.cache is None and released == [1]
    anchors.feed.close()  # a second close has nothing to give back
    assert released == [1]


def test_a_chunk_is_the_next_examples_of_the_order_that_fit(pair: tuple[Path, Path]) -> None:
    ex = [Example((5,) * n, (5,) * n) for n in (4, 4, 8, 4, 4)]

    def feed(**kw: Any) -> AnchorFeed:  # 12 tokens of 3 fp32 values
        return AnchorFeed(
            pair[0],
            ex,
            where="blocks",
            device=torch.device("cpu"),
            dtype=torch.float32,
            cap_bytes=12 * 12,
            width=3,
            **kw,
        )

    plain = feed()
    assert plain.example_bytes(2) == 96
    assert plain.plan_chunk([0], [[1, 0], [2], [3]]) == [0, 1]  # 2 (8 tokens) would pass the cap: stop there
    assert plain.plan_chunk([3, 4], [[0]]) == [3, 4, 0]
    from emloc_engine.core.errors import ConfigError

    with pytest.raises(ConfigError, match="one training step"):
        plain.plan_chunk([2, 3, 4], [])
    # eval examples (sticky) come with the first chunk and stay, when they take at most half the cap
    evals = feed(sticky=[4])
    assert evals.sticky == [4] and evals.plan_chunk([0], [[1], [2]]) == [0, 4, 1]
    too_big = feed(sticky=[2])
    assert too_big.sticky == []  # 8 of 12 tokens: more than half the cap


def test_later_chunks_read_the_original_from_the_ram_cache(
    pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from emloc_engine.stages.training.anchor_chunks import streamed_offsets
    from emloc_engine.weights.checkpoint import Checkpoint
    from emloc_engine.weights.lowrank import load_emulator
    from emloc_engine.weights.streamed import PinnedBlocks

    reads: list[str] = []
    real = Checkpoint.read_prefix
    monkeypatch.setattr(
        Checkpoint, "read_prefix", lambda self, prefix: reads.append(prefix) or real(self, prefix)
    )
    data = short_examples(6)
    emulator = load_emulator(pair[1], dtype=torch.float32).eval()
    cache = PinnedBlocks()
    kw: dict[str, Any] = dict(where="blocks", device=torch.device("cpu"), dtype=torch.float32, cache=cache)
    first = streamed_offsets(pair[0], emulator, data, [0, 1, 2], **kw)
    assert reads == ["model.layers.0.", "model.layers.1."] and cache.nbytes() > 0
    again = streamed_offsets(pair[0], emulator, data, [0, 1, 2], **kw)
    assert len(reads) == 2  # the second pass read no shard
    for i in (0, 1, 2):
        assert torch.equal(first.offsets[i], again.offsets[i])


def test_the_plans_hidden_state_threshold_reaches_every_anchor_pass(
    pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TrainConfig.hidden_on_gpu_bytes (0 when the planner found the chunk's hidden states would not fit on the
    GPU) and anchor_group_tokens (one example's length when larger groups would not) are what each chunk's
    streamed pass runs by."""
    from emloc_engine.stages.training import anchor_chunks

    seen: list[tuple[int, int]] = []
    real = anchor_chunks.streamed_offsets

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append((kwargs["hidden_on_gpu_bytes"], kwargs["max_tokens"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(anchor_chunks, "streamed_offsets", spy)
    data, eval_ = short_examples(40), short_examples(4, seed=1)
    per_token = anchor_width(AutoConfig.from_pretrained(pair[1]), "blocks") * 4
    _, record = _train(pair, tmp_path / "run", data, eval_, anchor_ram_gib=6 * 9 * per_token / 2**30,
                       hidden_on_gpu_bytes=0, anchor_group_tokens=9)
    assert record["anchor_chunks"] >= 2 and seen == [(0, 9)] * record["anchor_chunks"]
