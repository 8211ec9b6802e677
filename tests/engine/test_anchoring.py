"""Anchored training (emloc_engine.stages.training.anchoring): the anchored emulator is the original on its examples."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from emloc_engine.core.errors import ConfigError
from emloc_engine.stages.training.anchoring import Anchors, anchors_for_training
from emloc_engine.stages.training.batches import collate, micro_batch_indices, visited_examples
from emloc_engine.stages.training.trainer import train_on_examples
from emloc_engine.weights.lowrank import load_emulator
from tests.emulator_factory import write_svd_emulator
from tests.engine.test_training import cfg_for, examples


@pytest.fixture(scope="module")
def pair(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    emu = write_svd_emulator(tiny_llama, tmp_path_factory.mktemp("anchor") / "emulator", ratio=0.3)
    return tiny_llama, emu


def _models(pair: tuple[Path, Path]) -> tuple[torch.nn.Module, torch.nn.Module]:
    model_dir, emu = pair
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    return original, load_emulator(emu, dtype=torch.float64).eval()


def _anchors(pair: tuple[Path, Path], data: list, indices: list[int], where: str = "blocks",
             dtype: torch.dtype = torch.float64, max_tokens: int | None = None) -> Anchors:
    return anchors_for_training(pair[0], pair[1], data, indices, where=where, device=torch.device("cpu"),
                                dtype=dtype, max_tokens=max_tokens)


@pytest.mark.parametrize("where", ["blocks", "output", "linears"])
def test_anchored_emulator_reproduces_the_original_on_a_padded_batch(pair: tuple[Path, Path], where: str) -> None:
    original, emulator = _models(pair)
    data = examples(pair[0])
    anchors = _anchors(pair, data, [1, 3, 4], where)
    batch = collate([data[i] for i in (3, 1, 4)], pad_id=0)
    with torch.no_grad():
        want = original(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=True)
        plain = emulator(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with anchors.attached(emulator):
            anchors.select([3, 1, 4], batch["input_ids"].shape[1])
            got = emulator(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           output_hidden_states=True)
    mask = batch["attention_mask"].bool()
    assert (got.logits - want.logits)[mask].abs().max() < 1e-9
    assert (plain - want.logits)[mask].abs().max() > 1e-2  # the emulator alone is far from it
    if where != "output":  # every block's output, not only the last
        for h_got, h_want in zip(got.hidden_states[1:-1], want.hidden_states[1:-1], strict=True):
            assert (h_got - h_want)[mask].abs().max() < 1e-9
    want_points = {"blocks": 2, "output": 1, "linears": 2 * 7}[where]
    assert len(anchors.points) == want_points and anchors.where == where
    assert anchors.dense(1).shape == (len(data[1].input_ids), sum(anchors.widths))
    assert anchors.offsets[1].shape == (len(data[1].input_ids) * sum(anchors.widths),)


def test_each_points_offsets_are_one_contiguous_block_and_select_pads_them_per_point() -> None:
    """The point-major layout: a point's ``(T, w)`` block is contiguous in the example's buffer (one device
    copy lands it in place), the dense view interleaves the points, and ``select`` zero-pads per point."""
    widths = (3, 5, 2)
    dense = {0: torch.randn(4, 10, dtype=torch.float64), 1: torch.randn(2, 10, dtype=torch.float64)}
    starts = (0, 3, 8)
    flat = {i: torch.cat([d[:, a:a + w].reshape(-1) for a, w in zip(starts, widths, strict=True)])
            for i, d in dense.items()}
    anchors = Anchors(("p0", "p1", "p2"), widths, flat)
    for i, d in dense.items():
        assert torch.equal(anchors.dense(i), d)
        for k, (a, w) in enumerate(zip(starts, widths, strict=True)):
            view = anchors.point(i, k)
            assert view.is_contiguous() and view.data_ptr() >= flat[i].data_ptr()
            assert torch.equal(view, d[:, a:a + w])
    anchors.select([1, 0], 6)
    for p, a, w in zip(anchors.points, starts, widths, strict=True):
        batch = anchors._current[p]
        assert batch.shape == (2, 6, w)
        assert torch.equal(batch[0, :2], dense[1][:, a:a + w]) and not batch[0, 2:].any()
        assert torch.equal(batch[1, :4], dense[0][:, a:a + w]) and not batch[1, 4:].any()
    with pytest.raises(ValueError, match="not a multiple"):
        Anchors(("p0",), (3,), {0: torch.zeros(7)}).point(0, 0)


def test_hooks_are_removed_and_missing_examples_are_named(pair: tuple[Path, Path]) -> None:
    _, emulator = _models(pair)
    data = examples(pair[0])
    anchors = _anchors(pair, data, [0])
    ids = collate([data[0]], 0)["input_ids"]
    with torch.no_grad():
        before = emulator(input_ids=ids).logits
        with anchors.attached(emulator), pytest.raises(ConfigError, match=r"examples \[2\]"):
            anchors.select([0, 2], ids.shape[1])
        after = emulator(input_ids=ids).logits
    assert torch.equal(before, after)


def test_visited_examples_are_those_of_the_training_order() -> None:
    got = visited_examples(10, 3, seed=5, micro_batches=5)
    want = sorted({i for m in range(5) for i in micro_batch_indices(10, 3, 5, m)})
    assert got == want and len(got) == 10  # 5 batches of 3 cover two epochs of 10


def test_anchored_training_starts_at_the_original_loss(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """First step's loss on the anchored emulator = the original's loss on that micro-batch."""
    model_dir, emu = pair
    data = examples(model_dir)
    cfg = cfg_for(tmp_path / "run", emu, steps=2, grad_accum=1, batch_size=2, dropout=0.0, eval_every=0,
                  save_every=0, warmup_steps=0)
    original32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    emulator32 = load_emulator(emu, dtype=torch.float32).eval()
    idx = visited_examples(len(data), cfg.batch_size, cfg.seed, cfg.steps)
    anchors = _anchors(pair, data, idx, dtype=torch.float32)
    first = micro_batch_indices(len(data), cfg.batch_size, cfg.seed, 0)
    batch = collate([data[i] for i in first], 0)
    with torch.no_grad():
        ref = original32(**batch).loss.item()
        emu_loss = emulator32(**batch).loss.item()
    res = train_on_examples(cfg, data, data[:2], pad_id=0, anchors=anchors)
    assert res.loss_history[0][1] == pytest.approx(ref, abs=1e-4)
    assert abs(emu_loss - ref) > 1e-2
    assert isinstance(anchors, Anchors) and anchors.nbytes() > 0


def test_batched_anchors_equal_one_example_at_a_time(pair: tuple[Path, Path]) -> None:
    """Right-padded groups (the default) give the offsets of one example per forward."""
    data = examples(pair[0])
    ref = _anchors(pair, data, [0, 2, 5], max_tokens=1)
    got = _anchors(pair, data, [0, 2, 5])
    assert got.points == ref.points and got.widths == ref.widths and sorted(got.offsets) == [0, 2, 5]
    for i in (0, 2, 5):
        assert (got.offsets[i] - ref.offsets[i]).abs().max() < 1e-12


def test_mode_resolution_names_the_reason() -> None:
    from emloc_engine.stages.training.anchoring import resolve_mode

    gib = 2**30
    step = {"linears": 9 * gib, "blocks": gib}
    assert resolve_mode("auto", step, 400 * gib, can_anchor=True)[0] == "blocks"  # auto never takes linears
    mode, note = resolve_mode("auto", step, 8 * gib, can_anchor=True, total_bytes={"blocks": gib, "linears": 0})
    assert mode == "blocks" and "every block" in note and "1.00 GiB" in note and "chunks" not in note
    # any dataset size: offsets beyond the cap are computed in chunks, not switched off
    mode, note = resolve_mode("auto", step, 4 * gib, can_anchor=True, total_bytes={"blocks": 125 * gib, "linears": 0})
    assert mode == "blocks" and "125.00 GiB" in note and "chunks of at most 4.00 GiB" in note
    assert resolve_mode("linears", step, 10 * gib, can_anchor=True)[0] == "linears"
    mode, note = resolve_mode("auto", {"linears": 27 * gib, "blocks": 3 * gib}, 2 * gib, can_anchor=True)
    assert mode == "none" and "3.00 GiB" in note and "one step" in note
    with pytest.raises(ConfigError, match=r"9\.00 GiB of RAM") as err:
        resolve_mode("linears", step, 8 * gib, can_anchor=True)
    assert "--anchor-ram-gib" in err.value.hint
    assert resolve_mode("auto", step, gib, can_anchor=False, why_not="no source")[1] == "anchoring off: no source"
    with pytest.raises(ConfigError, match="no source"):
        resolve_mode("blocks", step, gib, can_anchor=False, why_not="no source")
    assert resolve_mode("none", step, gib, can_anchor=True)[0] == "none"


def test_train_lora_anchors_by_default_and_refuses_without_the_source(pair: tuple[Path, Path],
                                                                      tmp_path: Path) -> None:
    import json
    import shutil

    from emloc_engine.data import DataConfig
    from emloc_engine.stages.training.trainer import train_lora

    _, emu = pair
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                            ("the cat sat on the mat.", "a bird in the hand.", "to be or not to be.",
                             "all that glitters.", "the quick brown fox.", "jumps over the dog.") * 3))
    base = cfg_for(tmp_path / "run", emu, steps=2, eval_every=0, save_every=0, warmup_steps=0)
    cfg = type(base)(**{**base.__dict__, "data": DataConfig(path=data, max_length=32)})
    res = train_lora(cfg)
    assert res.anchor == "blocks" and "anchored at every block" in res.anchor_note and res.anchor_s > 0
    off = train_lora(type(cfg)(**{**cfg.__dict__, "anchor": "none", "run_dir": tmp_path / "run2"}))
    assert off.anchor == "none" and off.loss_history[0][1] != res.loss_history[0][1]
    # an emulator whose source folder is gone: auto trains without anchors, blocks says why not
    orphan = tmp_path / "orphan"
    shutil.copytree(emu, orphan)
    meta = json.loads((orphan / "emloc.json").read_text())
    meta["source_model"]["path"] = str(tmp_path / "moved-away")
    (orphan / "emloc.json").write_text(json.dumps(meta))
    auto = train_lora(type(cfg)(**{**cfg.__dict__, "emulator_dir": orphan, "run_dir": tmp_path / "run3"}))
    assert auto.anchor == "none" and "moved-away" in auto.anchor_note
    with pytest.raises(ConfigError, match="moved-away"):
        train_lora(type(cfg)(**{**cfg.__dict__, "emulator_dir": orphan, "run_dir": tmp_path / "run4",
                                "anchor": "blocks"}))


def test_groups_sort_by_length_and_respect_the_token_cap() -> None:
    from types import SimpleNamespace

    from emloc_engine.stages.training.anchoring import length_groups as _groups

    ex = [SimpleNamespace(input_ids=[0] * n) for n in (5, 3, 8, 2, 12)]
    assert _groups(ex, [0, 1, 2, 3, 4], 10) == [[4], [2], [0, 1], [3]]  # 12 alone (over the cap, still one)
    assert _groups(ex, [1, 3], 100) == [[1, 3]]


def test_linear_anchors_make_every_adapter_input_the_originals(pair: tuple[Path, Path]) -> None:
    """Block anchors leave o_proj/down_proj inputs inexact (they come from compressed q/k/v, gate/up);
    linear anchors make them exact, and two-phase batching gives the same offsets as one at a time."""
    from emloc_engine.stages.training.anchoring import anchor_width

    original, emulator = _models(pair)
    data = examples(pair[0])
    batch = collate([data[i] for i in (0, 2)], pad_id=0)
    seen: dict[str, list[torch.Tensor]] = {}

    def grab(model: torch.nn.Module, key: str) -> list:
        return [model.get_submodule(f"model.layers.{b}.{m}").register_forward_pre_hook(
            lambda _m, a, k=f"{key}{b}{m}": seen.setdefault(k, []).append(a[0]))
            for b in range(2) for m in ("self_attn.o_proj", "mlp.down_proj")]

    for where in ("blocks", "linears"):
        anchors = _anchors(pair, data, [0, 2], where)
        handles = grab(original, "o") + grab(emulator, where)
        with torch.no_grad(), anchors.attached(emulator):
            anchors.select([0, 2], batch["input_ids"].shape[1])
            original(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            emulator(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for h in handles:
            h.remove()
    mask = batch["attention_mask"].bool()
    for b in range(2):
        for m in ("self_attn.o_proj", "mlp.down_proj"):
            ref = seen[f"o{b}{m}"][0]
            assert (seen[f"linears{b}{m}"][0] - ref)[mask].abs().max() < 1e-9
            assert (seen[f"blocks{b}{m}"][0] - ref)[mask].abs().max() > 1e-4
    two = _anchors(pair, data, [0, 2, 5], "linears")
    one = _anchors(pair, data, [0, 2, 5], "linears", max_tokens=1)
    assert all((two.offsets[i] - one.offsets[i]).abs().max() < 1e-12 for i in (0, 2, 5))
    assert sum(two.widths) == anchor_width(original.config, "linears")


def test_eval_loss_is_the_anchored_emulators(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """With a zero adapter the trainer's eval loss equals the ORIGINAL's loss on the eval examples
    (the bare emulator's is far off); the eval offsets come from the same two-phase pass."""
    import json

    from emloc_engine.data import DataConfig, load_tokenizer, prepare_dataset
    from emloc_engine.stages.training.batches import label_tokens
    from emloc_engine.stages.training.trainer import lm_loss_sum, train_lora

    model_dir, emu = pair
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"sample {i}: to be or not to be, that is {i}."}) + "\n"
                            for i in range(30)))
    base = cfg_for(tmp_path / "run", emu, steps=1, eval_every=0, save_every=0, warmup_steps=0, lr=1e-12)
    cfg = type(base)(**{**base.__dict__, "data": DataConfig(path=data, max_length=32, eval_fraction=0.2)})
    res = train_lora(cfg)
    lin = train_lora(type(cfg)(**{**cfg.__dict__, "anchor": "linears", "run_dir": tmp_path / "run-lin"}))
    assert lin.anchor == "linears" and lin.final_eval_loss == pytest.approx(res.final_eval_loss, abs=1e-4)
    split = prepare_dataset(cfg.data, load_tokenizer(emu)).eval
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    emulator = load_emulator(emu, dtype=torch.float32).eval()
    losses, count = [0.0, 0.0], 0
    with torch.no_grad():
        for start in range(0, len(split), cfg.batch_size):
            batch = collate(split[start:start + cfg.batch_size], 0)
            count += label_tokens(batch)
            for k, model in enumerate((original, emulator)):
                losses[k] += float(lm_loss_sum(model, batch))
    want, bare = losses[0] / count, losses[1] / count
    assert res.anchor == "blocks" and res.final_eval_loss == pytest.approx(want, abs=1e-4)
    assert abs(bare - want) > 1e-2
