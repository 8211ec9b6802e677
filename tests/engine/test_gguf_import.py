"""GGUF in, streamed: a model view (metadata only) whose weights every stage reads from the GGUF itself.

Tiny models of every family the gguf/transformers mapping covers are written as quantized GGUF files
(:mod:`tests.gguf_files`); the tensors the stages see must equal ``gguf.quants.dequantize`` of the file
(computed independently in :func:`tests.gguf_files.expected_weights`), every stage must run from the
file, and the streamed emulator build must hold a few blocks of dequantized weights, not the model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from emloc_engine.catalog.gguf_import import inspect_gguf, make_gguf_view
from emloc_engine.core.errors import Cancelled, ConfigError, ModelNotFound, UnsupportedModel
from emloc_engine.core.progress import RecordingProgress
from emloc_engine.weights import gguf_source
from emloc_engine.weights.checkpoint import Checkpoint, fingerprint_model
from emloc_engine.weights.gguf_source import MATERIALISED, GgufTensors
from emloc_engine.weights.loading import load_causal_lm
from tests.gguf_files import expected_weights, write_gguf
from tests.tiny_models import build_tiny_model

CPU = torch.device("cpu")
IDS = torch.tensor([[5, 70, 71, 72, 100, 200, 3, 9]])
VIEW_FILES = {"chat_template.jinja", "config.json", "emloc_gguf.json", "generation_config.json", "tokenizer.json",
              "tokenizer_config.json"}
# Gemma-2/3: tensors and logits only (a real Gemma GGUF carries a SentencePiece vocabulary; this writer's
# byte-level one is not what transformers expects of a Gemma file, so no training run from it)
_GEMMA = {"head_dim": 8, "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh"}
# (family, storage type, model overrides); K-quants need rows of 256
CASES = [("llama", "Q4_0", {}), ("mistral", "Q8_0", {}), ("qwen2", "Q4_1", {}), ("qwen3", "Q5_0", {}),
         ("phi3", "Q8_0", {}), ("llama", "Q5_1", {}), ("qwen2", "F16", {}), ("llama", "BF16", {}),
         ("mistral", "F32", {"tie_word_embeddings": True}),
         ("llama", "Q4_K", {"hidden_size": 256, "intermediate_size": 512}),
         ("qwen2", "Q6_K", {"hidden_size": 256, "intermediate_size": 256}),
         ("llama", "Q5_K", {"hidden_size": 256, "intermediate_size": 512}),
         ("llama", "Q3_K", {"hidden_size": 256, "intermediate_size": 512}),
         ("llama", "Q2_K", {"hidden_size": 256, "intermediate_size": 512}),
         ("gemma2", "Q8_0", _GEMMA), ("gemma3_text", "Q4_0", _GEMMA)]


def _case_id(case: tuple[str, str, dict[str, Any]]) -> str:
    return f"{case[0]}-{case[1]}" + ("-tied" if case[2].get("tie_word_embeddings") else "")


def _gguf(root: Path, arch: str, qtype: str, **overrides: Any) -> tuple[Path, Path]:
    """(HF snapshot, GGUF file in its own folder standing for an LM Studio folder)."""
    name = f"tiny-{arch}-{qtype}-{len(overrides)}"
    snap = build_tiny_model(arch, root / "hub", name=name, **overrides)
    folder = root / "store" / name
    folder.mkdir(parents=True)
    return snap, write_gguf(snap, folder / f"{name}.gguf", qtype)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("gguf_src")
    return {_case_id(c): _gguf(root, c[0], c[1], **c[2]) for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_view_is_metadata_only_and_reads_exactly_the_dequantized_file(
        files: dict[str, tuple[Path, Path]], case: tuple[str, str, dict[str, Any]], tmp_path: Path) -> None:
    snap, path = files[_case_id(case)]
    qtype = case[1]
    view = make_gguf_view(path, tmp_path / "view")
    assert {p.name for p in view.iterdir()} == VIEW_FILES  # no weights, no converted copy
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # nothing beside the GGUF
    config = json.loads((view / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 2
    expected = expected_weights(path, config)
    ckpt = Checkpoint(view)
    assert set(ckpt.names()) == set(expected)
    quantized = qtype not in ("F32", "F16", "BF16")
    for name, want in expected.items():
        assert torch.equal(ckpt.get(name, dtype=torch.float32), want), name  # exact: never through bf16
        got = ckpt.get(name)
        stored = {"F16": torch.float16, "BF16": torch.bfloat16}.get(qtype, torch.float32)
        if want.dim() == 1:
            assert got.dtype == torch.float32  # norms are F32 in the file
        elif quantized and got.dtype != torch.float16:  # rows that do not split into blocks stay F16
            assert got.dtype == torch.bfloat16  # the view's dtype
        elif not quantized:
            assert got.dtype == stored
        assert torch.equal(got, want.to(got.dtype)), name
    ckpt.close()
    if qtype in ("F32", "F16", "BF16", "Q8_0"):  # quantized from the model itself: the same model (Gemma: norms -1)
        model = load_causal_lm(view, device=CPU, dtype=torch.float32)
        ref = load_causal_lm(snap, device=CPU, dtype=torch.float32)
        with torch.no_grad():
            diff = float((model(IDS).logits - ref(IDS).logits).abs().max())
        assert diff < {"F32": 1e-4, "F16": 0.02, "BF16": 0.1, "Q8_0": 0.3}[qtype]


def test_tokenizer_and_chat_template_come_from_the_metadata(files: dict[str, tuple[Path, Path]],
                                                            tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    snap, path = files["llama-Q4_0"]
    view = make_gguf_view(path, tmp_path / "view")
    tok, ref = AutoTokenizer.from_pretrained(view), AutoTokenizer.from_pretrained(snap)
    msgs = [{"role": "user", "content": "Good morrow, sweet prince!"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == ref.apply_chat_template(msgs, tokenize=False)
    assert tok("Good morrow").input_ids == ref("Good morrow").input_ids
    assert tok.eos_token == "<|im_end|>"
    assert json.loads((view / "generation_config.json").read_text())["eos_token_id"] == 3
    marker = json.loads((view / "emloc_gguf.json").read_text())
    assert marker["view_dtype"] == "bfloat16" and marker["architecture"] == "llama"
    assert marker["source"] == str(path.resolve()) and "Q4_0" in marker["tensor_types"]


def test_a_changed_gguf_is_noticed(files: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    _, path = files["llama-Q8_0"] if "llama-Q8_0" in files else files["mistral-Q8_0"]
    copy = tmp_path / "src" / "m.gguf"
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    view = make_gguf_view(copy, tmp_path / "view")
    fp = fingerprint_model(view)
    data = bytearray(copy.read_bytes())
    data[-1] ^= 0xFF
    copy.write_bytes(bytes(data) + b"\0")
    with pytest.raises(ModelNotFound, match="changed"):
        Checkpoint(view)
    copy.unlink()
    with pytest.raises(ModelNotFound, match="gone"):
        Checkpoint(view)
    assert fp


def test_unsupported_and_bad_inputs_are_refused_before_any_work(files: dict[str, tuple[Path, Path]],
                                                                tmp_path: Path) -> None:
    snap, path = files["llama-Q4_0"]
    odd = tmp_path / "odd" / "odd.gguf"
    odd.parent.mkdir()
    write_gguf(snap, odd, "Q8_0", arch="rwkv7")
    assert not inspect_gguf(odd).supported
    with pytest.raises(UnsupportedModel, match="rwkv7"):
        make_gguf_view(odd, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ModelNotFound):
        make_gguf_view(tmp_path / "nowhere" / "missing.gguf", tmp_path / "out")
    junk = tmp_path / "junk" / "junk.gguf"
    junk.parent.mkdir()
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(UnsupportedModel, match="not a readable GGUF"):
        make_gguf_view(junk, tmp_path / "out")
    with pytest.raises(ConfigError, match="own folder"):
        make_gguf_view(path, path.parent / "view")
    with pytest.raises(ConfigError, match="dtype"):
        make_gguf_view(path, tmp_path / "out", dtype="int8")
    with pytest.raises(Cancelled):
        make_gguf_view(path, tmp_path / "out", progress=RecordingProgress(cancel_after_updates=2))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("*.partial"))


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, torch.dtype, torch.Tensor]]]:
    """Every tensor the GGUF source hands to a stage: ``(hf_name, dtype, tensor)``."""
    calls: list[tuple[str, torch.dtype, torch.Tensor]] = []
    real = GgufTensors.get

    def get(self: GgufTensors, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = real(self, name, dtype)
        calls.append((name, t.dtype, t.clone()))
        return t

    monkeypatch.setattr(GgufTensors, "get", get)
    yield calls


def _data(path: Path, n: int = 16) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"Double {i}?"},
                                              {"role": "assistant", "content": f"{2 * i}."}]}) + "\n")
    return path


@pytest.mark.integration
@pytest.mark.parametrize("key", ["llama-Q4_0", "mistral-Q8_0", "qwen2-Q4_1", "phi3-Q8_0", "llama-Q4_K"])
def test_every_stage_runs_from_the_gguf_and_sees_its_dequantized_weights(
        files: dict[str, tuple[Path, Path]], key: str, tmp_path: Path,
        seen: list[tuple[str, torch.dtype, torch.Tensor]]) -> None:
    """emulator build, training, correction (λ search) and the merged export, all from the GGUF."""
    from emloc_engine.catalog.resolve import resolve_model
    from emloc_engine.data.config import DataConfig
    from emloc_engine.run.config import RunConfig
    from emloc_engine.run.orchestrator import run_stages
    from emloc_engine.run.plan import plan_run
    from emloc_engine.stages.correction.options import CorrectionOptions
    from emloc_engine.stages.export.options import ExportOptions
    from emloc_engine.stages.training.options import TrainOptions
    from emloc_engine.weights.adapters import read_adapter

    _, path = files[key]
    view = resolve_model(path)  # what `emloc run FILE.gguf` does
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    config = json.loads((view / "config.json").read_text())
    expected = expected_weights(path, config)
    run = tmp_path / "run"
    cfg = RunConfig(model_dir=view, data=DataConfig(path=_data(tmp_path / "d.jsonl"), max_length=48), run_dir=run,
                    ratio=0.5, calib=6, device="cpu", train=TrainOptions(rank=4, alpha=8.0, steps=3, batch_size=2),
                    correct=CorrectionOptions(lambda_=None),
                    export=ExportOptions(formats=("merged", "adapter", "gguf") if key == "llama-Q4_0" else ("merged",)))
    plan = plan_run(cfg)
    if key == "qwen2-Q4_1":  # the original streamed block by block from the GGUF: anchors, λ search, verification
        import dataclasses

        assert plan.export is not None
        plan = dataclasses.replace(plan, train=dataclasses.replace(plan.train, stream_original=True),
                                   correct=dataclasses.replace(plan.correct, stream_original=True),
                                   export=dataclasses.replace(plan.export, stream_original=True))
    result = run_stages(plan, RecordingProgress())
    assert result.stages_run == ("emulator", "train", "correct", "export")
    # Every tensor any stage got equals gguf.quants.dequantize of the file (in the dtype asked for).
    assert {n for n, _, _ in seen} == set(expected)
    for name, dtype, t in seen:
        assert torch.equal(t, expected[name].to(dtype)), name
    adapter = read_adapter(run / "adapter-corrected")
    exact = {n for n, d, _ in seen if d == torch.float32}
    assert {f"{m}.weight" for m in adapter.modules} <= exact  # the correction read the exact weights
    # The merged folder: W + s·B·A from the exact weights, then the storage dtype; the rest copied.
    from safetensors import safe_open

    merged: dict[str, torch.Tensor] = {}
    for f in (run / "merged").glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            merged.update({k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118
    assert set(merged) == set(expected)
    assert not (run / "merged" / "emloc_gguf.json").exists() and not (run / "emulator" / "emloc_gguf.json").exists()
    for name, w in expected.items():
        module = name.removesuffix(".weight")
        if module in adapter.modules:
            mod = adapter.modules[module]
            w = w + mod.scale * adapter.B(module).float() @ adapter.A(module).float()
        assert torch.allclose(merged[name].float(), w.to(merged[name].dtype).float(), atol=1e-6), name


def test_streamed_build_holds_a_few_blocks_not_the_model(tmp_path: Path) -> None:
    """The emulator build of a 12-block model never holds more of the GGUF's dequantized weights than the
    input embedding in the compute dtype (the capture of block 0's input), one non-block tensor being
    written and two blocks (block b computing, b+1 prefetched): 37 % of this tiny model at most, a few percent
    of an 8B one. How much of that bound a run reaches depends on how the reader, writer and main threads
    interleave (measured: 60 kB of 265 kB alone, 97 kB in the whole suite on a busy 2-core machine), so the
    test holds the bound, not a typical value."""
    from emloc_engine.stages.emulator.builder import EmulatorConfig, build_emulator

    _, path = _gguf(tmp_path, "llama", "Q4_0", num_hidden_layers=12)
    view = make_gguf_view(path, tmp_path / "view")
    infos = list(Checkpoint(view).infos())
    model_bytes = sum(i.nbytes for i in infos)
    block = sum(i.nbytes for i in infos if i.name.startswith("model.layers.0."))
    largest_rest = max(i.nbytes for i in infos if not i.name.startswith("model.layers."))
    embed_fp32 = next(i for i in infos if i.name == "model.embed_tokens.weight").numel * 4
    g = torch.Generator().manual_seed(0)
    calib = tuple(tuple(torch.randint(4, 260, (40,), generator=g).tolist()) for _ in range(4))
    MATERIALISED.reset()
    before = MATERIALISED.live
    build_emulator(EmulatorConfig(model_dir=view, out_dir=tmp_path / "emu", calibration_ids=calib, ratio=0.5,
                                  device="cpu", compute_dtype="float32"))
    peak = MATERIALISED.peak - before
    assert MATERIALISED.total >= model_bytes  # every tensor was read once
    assert peak <= embed_fp32 + largest_rest + 2 * block, (peak, largest_rest, block)
    assert peak < 0.5 * model_bytes, (peak, model_bytes)  # what the bound means here: never the model


def test_a_gguf_becomes_a_catalog_model_once(files: dict[str, tuple[Path, Path]], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """`emloc models --convert` and `resolve_model(path.gguf)` make a view in the app's data folder, once,
    never beside the GGUF; the view is listed and usable like any model."""
    from emloc_engine.catalog.discovery import find_models
    from emloc_engine.catalog.gguf_import import gguf_view_dir_for
    from emloc_engine.catalog.model_folders import added_model_folders
    from emloc_engine.catalog.resolve import resolve_model
    from emloc_engine.cli.main import main
    from emloc_engine.core.paths import app_data_dir

    _, gguf = files["llama-Q4_0"]
    store = tmp_path / "lmstudio"
    store.mkdir()
    local = store / "tiny.gguf"
    local.write_bytes(gguf.read_bytes())
    assert main(["models", "--convert", str(local), "--no-stores"]) == 0
    out = gguf_view_dir_for(local)
    assert out.is_relative_to(app_data_dir()) and (out / "config.json").exists()
    assert sorted(p.name for p in store.iterdir()) == ["tiny.gguf"]  # nothing written beside the source
    assert out.resolve() in [p.resolve() for p in added_model_folders()]
    listed = [m for m in find_models(include_stores=False) if Path(m.path).resolve() == out.resolve()]
    assert listed and listed[0].supported and not listed[0].needs_conversion, listed
    assert listed[0].size_on_disk_bytes == local.stat().st_size and listed[0].num_parameters
    stamp = (out / "emloc_gguf.json").stat().st_mtime_ns
    assert resolve_model(local) == out  # reused, not made again
    assert (out / "emloc_gguf.json").stat().st_mtime_ns == stamp


def test_nothing_is_written_beside_the_gguf(files: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    """A run or export folder inside the GGUF's folder (an LM Studio folder, Ollama's blobs) is refused."""
    from emloc_engine.catalog.locations import protected_place

    _, path = files["llama-Q4_0"]
    view = make_gguf_view(path, tmp_path / "view")
    assert "source model folder" in str(protected_place(path.parent / "run", view))
    assert protected_place(tmp_path / "run", view) is None


@pytest.mark.parametrize("key", ["llama-Q4_K", "llama-Q4_0", "qwen2-F16"])
def test_tensors_dequantized_in_pieces_on_threads_equal_the_whole(files: dict[str, tuple[Path, Path]], key: str,
                                                                  tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Large tensors are dequantized a few rows at a time on several threads, straight into the output."""
    _, path = files[key]
    view = make_gguf_view(path, tmp_path / "view")
    expected = expected_weights(path, json.loads((view / "config.json").read_text()))
    monkeypatch.setattr(gguf_source, "_PIECE_ELEMENTS", 300)  # a few rows per piece
    ckpt = Checkpoint(view)
    for name, want in expected.items():
        assert torch.equal(ckpt.get(name, dtype=torch.float32), want), name
        got = ckpt.get(name)
        assert torch.equal(got, want.to(got.dtype)), name


def test_merged_shards_from_a_view_split_and_index(files: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    """The merge from a view writes HF-named shards of bounded size with an index that loads with transformers."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from emloc_engine.stages.export.exporter import _copy_side_files, write_merged_shards
    from emloc_engine.stages.export.merge_stream import write_merged_from_checkpoint

    _, path = files["qwen2-Q4_1"]
    view = make_gguf_view(path, tmp_path / "view")
    out = tmp_path / "merged"
    out.mkdir()
    assert write_merged_from_checkpoint(view, {}, out, shard_bytes=30_000) == 0
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    _copy_side_files(view, out)
    assert not (out / "emloc_gguf.json").exists()
    AutoModelForCausalLM.from_pretrained(out)  # the index and the shards load with plain transformers
    merged = {}
    for f in shards:
        with safe_open(str(f), "pt") as fh:
            merged.update({k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118
    ckpt = Checkpoint(view)
    for name in ckpt.names():  # each tensor in its storage dtype: Q4_1 weights as bf16, norms and biases F32
        assert torch.equal(merged[name], ckpt.get(name)), name
    one = tmp_path / "one"
    one.mkdir()
    assert write_merged_shards(view, {}, one) == 0 and [p.name for p in one.glob("*.safetensors")] == [
        "model.safetensors"]


def test_reads_without_positional_reads_too(files: dict[str, tuple[Path, Path]], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows has no ``os.preadv``: the source seeks and reads instead, with the same values."""
    import os

    _, path = files["llama-Q4_0"]
    view = make_gguf_view(path, tmp_path / "view")
    expected = expected_weights(path, json.loads((view / "config.json").read_text()))
    monkeypatch.delattr(os, "preadv")
    ckpt = Checkpoint(view)
    for name in reversed(list(expected)):  # out of file order
        assert torch.equal(ckpt.get(name, dtype=torch.float32), expected[name]), name
