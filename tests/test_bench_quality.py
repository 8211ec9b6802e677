"""The quality benchmark end to end on a tiny model (CPU, seconds): JSON and table structure, arithmetic."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import bench_quality as bq
from benchmarks.tasks import format_examples, formats_task, shakespeare_task
from tests.tiny_models import build_tiny_model


def _text_files(tmp: Path) -> tuple[Path, Path]:
    lines = ["To be, or not to be, that is the question.", "Now is the winter of our discontent.",
             "All the world's a stage, and all the men and women merely players.",
             "Friends, Romans, countrymen, lend me your ears.", "What light through yonder window breaks?"]
    train = [{"text": " ".join(lines[(i + j) % len(lines)] for j in range(3))} for i in range(40)]
    test = [{"text": lines[i % len(lines)] + " " + lines[(i + 2) % len(lines)]} for i in range(6)]
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    return tmp / "train.jsonl", tmp / "test.jsonl"


def test_format_task_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    a, b = format_examples(30, seed=0), format_examples(30, seed=0)
    assert a == b
    assert bq_date_example() == ("Write the date 2031-04-07 in words.", "April 7, 2031")
    task = formats_task(tmp_path, n_train=60, n_test=12, seed=3)
    train = {json.loads(x)["messages"][0]["content"] for x in task.data.path.read_text().splitlines()}
    test = [json.loads(x)["messages"] for x in task.test_path.read_text().splitlines()]
    assert len(test) == 12 and not train & {m[0]["content"] for m in test}
    sort_rows = [m for m in test if m[0]["content"].startswith("Sort")]
    for m in sort_rows:
        nums = [int(x) for x in m[0]["content"].split(": ")[1].split(", ")]
        assert m[1]["content"] == ", ".join(map(str, sorted(nums)))


def bq_date_example() -> tuple[str, str]:
    """The date generator's mapping on one known value (April = month 4, no leading zero on the day)."""
    import random

    from benchmarks import tasks

    class Fixed(random.Random):
        def randint(self, a: int, b: int) -> int:
            return {(1900, 2099): 2031, (1, 12): 4, (1, 28): 7}[(a, b)]

    return tasks._date(Fixed())


def test_units_parse_in_order() -> None:
    assert bq._units("plain-svd:0.4,0.8;activation-aware:P") == (
        ("plain-svd", 0.4), ("plain-svd", 0.8), ("activation-aware", None))
    with pytest.raises(SystemExit):
        bq._units("nope:0.4")


def test_recovered_arithmetic() -> None:
    rec = {"metric": "loss", "higher_is_better": False, "zero_shot": {"loss": 4.0}, "full_lora": {"loss": 3.0}}
    assert bq.recovered(rec, {"loss": 3.25}) == pytest.approx(0.75)
    assert bq.recovered(rec, {"loss": 4.5}) == pytest.approx(-0.5)
    em = {"metric": "exact_match", "higher_is_better": True, "zero_shot": {"exact_match": 0.1, "loss": 1.0},
          "full_lora": {"exact_match": 0.9, "loss": 0.5}}
    assert bq.recovered(em, {"exact_match": 0.5, "loss": 0.7}) == pytest.approx(0.5)
    flat = {**em, "full_lora": {"exact_match": 0.1, "loss": 0.5}}
    assert math.isnan(bq.recovered(flat, {"exact_match": 0.5, "loss": 0.7}))


@pytest.mark.slow
def test_benchmark_end_to_end_on_tiny_model(tmp_path: Path) -> None:
    model_dir = build_tiny_model("llama", tmp_path / "hub")
    train, test = _text_files(tmp_path)
    tasks = [shakespeare_task(train, test, max_length=32),
             formats_task(tmp_path / "fmt", n_train=40, n_test=6, max_length=160)]
    units = (("activation-aware", 0.5), ("plain-svd", 0.5), ("aa-calib256-alloc", 0.5))
    settings = bq.BenchSettings(ratios=(0.5,), units=units, calib_samples=4, more_calib_samples=6, max_length=32, steps=2,
                                batch_size=2, warmup_steps=0, device="cpu", eval_batch_size=4)
    out = tmp_path / "quality.json"
    data = bq.run_benchmark(settings, model_dir, tasks, tmp_path / "work", out, "python bench", log=lambda _: None)
    saved = json.loads(out.read_text())
    assert saved["tasks"].keys() == {"shakespeare", "formats"}
    assert saved["versions"]["torch"] and saved["device_type"] == "cpu" and saved["settings"]["seed"] == 0
    for name, rec in saved["tasks"].items():
        assert [(u["variant"], u["ratio"]) for u in rec["units"]] == [
            ("activation-aware", 0.5), ("plain-svd", 0.5), ("aa-calib256-alloc", 0.5)]
        for u in rec["units"]:
            assert set(u["lambda"]) == {"0", "1", "3", "inf"}
            assert u["auto"]["lambda"] in {"0", "0.5", "1", "3", "inf"}
            assert 0.0 < u["build"]["linear_params_kept"] <= 0.55
            assert math.isfinite(u["on_emulator"]["loss"])
            # λ = 0 is "no correction": the trained adapter as it is, on the original model.
            assert u["lambda"]["0"]["loss"] == pytest.approx(u["auto"]["loss"]) or u["auto"]["lambda"] != "0"
        if name == "formats":
            assert all(0.0 <= u["lambda"]["inf"]["exact_match"] <= 1.0 for u in rec["units"])
            assert rec["n_test"] == 6
        assert rec["full_lora"]["loss"] < rec["zero_shot"]["loss"]  # two steps of LoRA do something
    text = bq.render_section(data)
    assert "#### shakespeare" in text and "#### formats" in text
    rec = saved["tasks"]["shakespeare"]
    unit = rec["units"][0]
    expected = (unit["lambda"]["0"]["loss"] - rec["zero_shot"]["loss"]) / (
        rec["full_lora"]["loss"] - rec["zero_shot"]["loss"])
    assert f"{unit['lambda']['0']['loss']:.3f} ({100 * expected:.0f}%)" in text
    assert "Activation-aware better than plain SVD" in text
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\n## Scale (8B)\n\nlead's table\n")
    bq.write_results_md(md, [text])
    bq.write_results_md(md, [text])  # idempotent: the section is replaced, the lead's section kept
    body = md.read_text()
    assert body.count(bq.SECTION) == 1 and "lead's table" in body and body.index("## Scale") < body.index(bq.SECTION)
    assert bq.main(["--render", str(out), "--results-md", str(md)]) == 0
    assert md.read_text().count("#### formats") == 1


def test_sequential_emulator_at_full_rank_is_the_original(tmp_path: Path) -> None:
    """The builder of aa-seq256 / aa-gptq256: at full rank the emulator equals the original."""
    from transformers import AutoModelForCausalLM

    from benchmarks.probe_emulators import write_sequential_emulator
    from emloc_engine.weights.lowrank import load_emulator, read_emulator_meta

    model_dir = build_tiny_model("llama", tmp_path / "hub")
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(3, 100, (12, 16), generator=gen).tolist()
    full = {n: min(o, i) for n, (o, i) in
            {n: tuple(bq.Checkpoint(model_dir).info(f"{n}.weight").shape) for n in bq._block_modules(model_dir)}.items()}
    ids = torch.randint(3, 100, (2, 16), generator=gen)
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = original(input_ids=ids).logits
    for cross in (False, True):
        out = write_sequential_emulator(model_dir, tmp_path / f"emu-{cross}", calib, 0.5, cross=cross,
                                        rank_overrides=full, chunk=5)
        assert read_emulator_meta(out)["modules"].keys() == full.keys()
        with torch.no_grad():
            got = load_emulator(out).eval()(input_ids=ids).logits
        assert torch.allclose(got, ref, atol=1e-3, rtol=1e-3)
    low = write_sequential_emulator(model_dir, tmp_path / "emu-low", calib, 0.5, cross=False)
    meta = read_emulator_meta(low)["modules"]
    assert all(m["rank"] == bq.rank_for_ratio(0.5, m["out_features"], m["in_features"]) for m in meta.values())
    assert bq._units("aa-seq256:0.4,0.8;aa-gptq256:0.4") == (
        ("aa-seq256", 0.4), ("aa-seq256", 0.8), ("aa-gptq256", 0.4))
    settings = bq.BenchSettings()
    assert settings.variant_calib("aa-seq256") == settings.variant_calib("aa-calib256-alloc") == 256
    assert settings.variant_calib("activation-aware") == 32


def test_a_gguf_view_is_written_out_once_as_a_plain_folder_for_the_baselines(tmp_path: Path) -> None:
    """The demo model is a GGUF view (weights only in the .gguf): the baselines load the original with
    transformers alone, so the benchmark writes the dequantized weights out once and runs every arm on them."""
    from transformers import AutoModelForCausalLM

    from emloc_engine.catalog.gguf_import import make_gguf_view
    from emloc_engine.weights.loading import load_causal_lm
    from tests.gguf_files import write_gguf

    snap = build_tiny_model("llama", tmp_path / "hub", name="tiny-view")
    (tmp_path / "store").mkdir()
    view = make_gguf_view(write_gguf(snap, tmp_path / "store" / "m.gguf", "Q8_0"), tmp_path / "view")
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(view)  # what the benchmark hit on 2026-12-06
    plain = bq.plain_model_dir(view, tmp_path / "work")
    assert plain != view and any(plain.glob("*.safetensors")) and (plain / "tokenizer.json").is_file()
    want = load_causal_lm(view, device=torch.device("cpu"), dtype=torch.bfloat16).state_dict()  # the view's dtype
    got = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.bfloat16).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    mtime = (plain / "model.safetensors").stat().st_mtime_ns
    assert bq.plain_model_dir(view, tmp_path / "work") == plain  # written once
    assert (plain / "model.safetensors").stat().st_mtime_ns == mtime
    assert bq.plain_model_dir(snap, tmp_path / "work") == snap  # a plain folder is used as it is
