"""The model catalog: HF cache revisions, damaged entries, added folders, GGUF stores, demo, fit badges."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from emloc_engine.catalog import discovery
from emloc_engine.catalog.discovery import assess_fit, find_models, hf_cache_dir, scan_models
from emloc_engine.catalog.model_folders import add_model_folder, added_model_folders, remove_model_folder
from emloc_engine.core import paths
from emloc_engine.core.errors import ModelNotFound
from emloc_engine.machine.hardware import GIB, GpuInfo, MachineInfo
from tests.tiny_models import build_tiny_model

TINY_CFG: dict[str, Any] = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8,
                            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                            "num_key_value_heads": 1, "vocab_size": 16, "tie_word_embeddings": False,
                            "torch_dtype": "bfloat16"}


def tiny_safetensors(cfg: dict[str, Any] = TINY_CFG) -> bytes:
    """A valid safetensors file of zeros with the tensor names and shapes of a Llama config."""
    h, i, v, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": [v, h], "model.norm.weight": [h], "lm_head.weight": [v, h]}
    for b in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{b}."
        shapes.update({p + "self_attn.q_proj.weight": [h, h], p + "self_attn.k_proj.weight": [kv, h],
                       p + "self_attn.v_proj.weight": [kv, h], p + "self_attn.o_proj.weight": [h, h],
                       p + "mlp.gate_proj.weight": [i, h], p + "mlp.up_proj.weight": [i, h],
                       p + "mlp.down_proj.weight": [h, i], p + "input_layernorm.weight": [h],
                       p + "post_attention_layernorm.weight": [h]})
    header: dict[str, Any] = {}
    offset = 0
    for name, shape in shapes.items():
        n = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + bytes(offset)


def cache_repo(cache: Path, repo_id: str, files: dict[str, bytes | None], rev: str | None = None,
               ref: str | None = "main", incomplete: bool = False) -> Path:
    """An HF-cache repo: blobs/<sha>, snapshots/<rev>/<file> -> ../../blobs/<sha>; ``None`` content = broken link."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    rev = rev or hashlib.sha1(repo_id.encode()).hexdigest()
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, content in files.items():
        sha = hashlib.sha256(name.encode() + (content or b"gone")).hexdigest()
        blob = repo / "blobs" / sha
        if content is not None:
            blob.write_bytes(content)
        os.symlink(os.path.relpath(blob, snap), snap / name)
    if incomplete:
        (repo / "blobs" / ("f" * 64 + ".incomplete")).write_bytes(b"partial")
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(rev)
    return snap


def _by_name(models: list[discovery.ModelInfo], name: str) -> list[discovery.ModelInfo]:
    return [m for m in models if m.name == name]


def test_cache_dir_honours_hf_home_and_hub_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "a"))
    assert hf_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "b"))
    assert hf_cache_dir() == tmp_path / "b" / "hub"


def test_real_tiny_models_in_the_cache_are_supported(tiny_cache: Path) -> None:
    models = find_models(cache_dir=tiny_cache, include_stores=False)
    assert len(models) == 5
    for m in models:
        assert m.supported and m.problem is None and m.source == "hf-cache", m
        assert m.num_parameters and m.num_parameters > 0 and m.dtype == "float32"
        assert m.refs == ("main",) and m.revision and m.size_on_disk_bytes > 0
        assert m.facts is not None and m.facts.num_parameters == m.num_parameters
    assert {m.model_type for m in models} == {"llama", "qwen2", "mistral", "gemma", "phi3"}


def test_several_revisions_are_each_listed(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    old = build_tiny_model("llama", cache, name="multi", seed=1)
    new = build_tiny_model("llama", cache, name="multi", seed=2)
    revs = _by_name(find_models(cache_dir=cache, include_stores=False), "emloc-test/multi")
    assert {m.revision for m in revs} == {old.name, new.name}
    assert {m.refs for m in revs} == {("main",), ()}  # refs/main points at the newest only
    assert all(m.supported for m in revs)


def test_damaged_cache_entries_are_listed_with_the_reason(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    st = tiny_safetensors()
    cfg = json.dumps(TINY_CFG).encode()
    index = json.dumps({"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                                       "lm_head.weight": "model-00002-of-00002.safetensors"}}).encode()
    cache_repo(cache, "org/ok", {"config.json": cfg, "model.safetensors": st})
    cache_repo(cache, "org/partial", {"config.json": cfg, "model.safetensors.index.json": index,
                                      "model-00001-of-00002.safetensors": st}, incomplete=True)
    cache_repo(cache, "org/broken", {"config.json": cfg, "model.safetensors": None})
    cache_repo(cache, "org/pickle", {"config.json": cfg, "pytorch_model.bin": b"\x80\x02pickle"})
    cache_repo(cache, "org/bert", {"config.json": json.dumps({"model_type": "bert", "hidden_size": 8}).encode(),
                                   "model.safetensors": st})
    cache_repo(cache, "org/badjson", {"config.json": b"{not json", "model.safetensors": st})
    cache_repo(cache, "org/truncated", {"config.json": cfg, "model.safetensors": st[:20]})
    scan = scan_models(cache_dir=cache, include_stores=False)
    by = {m.name: m for m in scan.models}
    assert set(by) == {"org/ok", "org/partial", "org/broken", "org/pickle", "org/bert", "org/badjson", "org/truncated"}
    assert by["org/ok"].supported and by["org/ok"].num_parameters == 2 * 16 * 8 + 8 + (2 * 64 + 2 * 32 + 3 * 128 + 2 * 8)
    assert by["org/ok"].dtype == "bfloat16"
    expected = {"org/partial": ("shard", "partial file"), "org/broken": ("broken symlink",),
                "org/pickle": ("pickle-only",), "org/bert": ("not supported",), "org/badjson": ("not valid JSON",),
                "org/truncated": ("truncated",)}
    for name, words in expected.items():
        m = by[name]
        assert not m.supported and m.problem, m
        for w in words:
            assert w in m.problem, (name, m.problem)
    assert any("broken" in w.lower() for w in scan.warnings)  # scan_cache_dir's own warning is surfaced


def test_fifty_cached_models_scan_quickly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "hub"
    st, cfg = tiny_safetensors(), json.dumps(TINY_CFG).encode()
    for i in range(50):
        cache_repo(cache, f"org/model-{i:02d}", {"config.json": cfg, "model.safetensors": st,
                                                 "tokenizer.json": b"{}"})
    t0 = time.perf_counter()
    models = find_models(cache_dir=cache, include_stores=False)
    elapsed = time.perf_counter() - t0
    assert len(models) == 50 and all(m.supported for m in models)
    with capsys.disabled():
        print(f"\n[discovery] scanned 50 cached models in {elapsed:.3f} s")


def test_added_folders_persist_and_are_scanned(tmp_path: Path) -> None:
    parent = tmp_path / "my-models"
    snap = build_tiny_model("qwen2", tmp_path / "elsewhere")
    (parent / "good").mkdir(parents=True)
    for f in snap.iterdir():
        (parent / "good" / f.name).write_bytes(f.read_bytes())
    (parent / "weird").mkdir()
    (parent / "weird" / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    add_model_folder(parent)
    assert json.loads((paths.app_data_dir() / "model_folders.json").read_text())["folders"] == [str(parent.resolve())]
    assert added_model_folders() == [parent.resolve()]
    add_model_folder(parent)  # idempotent
    assert len(added_model_folders()) == 1
    models = find_models(cache_dir=tmp_path / "nohub", include_stores=False)
    by = {m.name: m for m in models}
    assert by["my-models/good"].supported and by["my-models/good"].source == "folder"
    assert not by["my-models/weird"].supported and "hidden_size" in (by["my-models/weird"].problem or "")
    assert remove_model_folder(parent) and added_model_folders() == []
    assert not remove_model_folder(parent)
    with pytest.raises(ModelNotFound):
        add_model_folder(tmp_path / "missing")


def test_corrupt_folder_list_reads_as_empty() -> None:
    f = paths.app_data_dir() / "model_folders.json"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text("{oops")
    assert added_model_folders() == []


def _write_gguf(path: Path) -> None:
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_head_count(2)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_in_lmstudio_and_ollama_needs_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lms = tmp_path / "lmstudio"
    _write_gguf(lms / "pub" / "Tiny-GGUF" / "tiny-Q8_0.gguf")
    (lms / "pub" / "Tiny-GGUF" / "mmproj-tiny.gguf").write_bytes(b"GGUF")  # projector, skipped
    oll = tmp_path / "ollama"
    _write_gguf(oll / "blobs" / ("sha256-" + "a" * 64))
    manifest = {"layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:" + "a" * 64}]}
    (oll / "manifests" / "registry.ollama.ai" / "library" / "tiny").mkdir(parents=True)
    (oll / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "latest").write_text(json.dumps(manifest))
    gone = {"layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:" + "b" * 64}]}
    (oll / "manifests" / "registry.ollama.ai" / "library" / "gone").mkdir(parents=True)
    (oll / "manifests" / "registry.ollama.ai" / "library" / "gone" / "7b").write_text(json.dumps(gone))
    monkeypatch.setenv("LMSTUDIO_MODELS_DIR", str(lms))
    monkeypatch.setenv("OLLAMA_MODELS", str(oll))
    models = find_models(cache_dir=tmp_path / "nohub")
    by = {m.name: m for m in models}
    lm = by["pub/Tiny-GGUF/tiny-Q8_0.gguf"]
    assert lm.source == "lmstudio" and lm.needs_conversion and lm.model_type == "llama"
    assert lm.num_parameters == 16 * 8 + 8 and lm.size_on_disk_bytes > 0
    assert "pub/Tiny-GGUF/mmproj-tiny.gguf" not in by
    ol = by["tiny:latest"]
    assert ol.source == "ollama" and ol.needs_conversion and ol.model_type == "llama"
    assert not by["gone:7b"].supported and "ollama pull" in (by["gone:7b"].problem or "")


def test_demo_model_is_listed(tmp_path: Path) -> None:
    snap = build_tiny_model("llama", tmp_path / "c")
    demo = paths.demo_model_dir()
    demo.mkdir(parents=True)
    for f in snap.iterdir():
        (demo / f.name).write_bytes(f.read_bytes())
    models = find_models(cache_dir=tmp_path / "nohub", include_stores=False)
    assert [m.source for m in models] == ["demo"] and models[0].supported


def _machine(total_gib: float) -> MachineInfo:
    gpu = GpuInfo(0, "NVIDIA H200", int(total_gib * GIB), int(total_gib * GIB), 0)
    return MachineInfo((gpu,), "cuda", 16, 64 * GIB, 60 * GIB)


def test_fit_badges(tiny_llama: Path) -> None:
    model = discovery.inspect_model_dir(tiny_llama)[0]
    fit = assess_fit(model, _machine(80))
    assert fit.inference == "fits" and fit.training == "fits" and fit.ratio is not None
    assert "ρ" in fit.message
    small = assess_fit(model, _machine(0.3))  # less than the CUDA context
    assert small.inference == "exceeds" and small.training == "exceeds"
    cpu = assess_fit(model, MachineInfo((), "cpu", 2, 8 * GIB, 6 * GIB))
    assert cpu.inference == "fits" and "system RAM" in cpu.message
    unknown = assess_fit(discovery.ModelInfo("x", Path("x.gguf"), None, "ollama", None, None, None, None, 0, True,
                                             None, needs_conversion=True), _machine(80))
    assert unknown.inference == "unknown" and "convert" in unknown.message


def test_a_wrong_model_path_is_named_for_what_it_is(tmp_path: Path) -> None:
    from emloc_engine.catalog.resolve import resolve_model
    from emloc_engine.core.architectures import arch_spec
    from emloc_engine.core.errors import UnsupportedModel

    empty = tmp_path / "not-a-model"
    empty.mkdir()
    with pytest.raises(ModelNotFound) as err:
        resolve_model(empty)
    assert f"{empty} is a folder but not a model folder: it has no config.json" in str(err.value)
    assert "snapshots/REVISION" in err.value.hint
    with pytest.raises(ModelNotFound, match=r"There is no GGUF file at .*missing\.gguf"):
        resolve_model(tmp_path / "missing.gguf")
    with pytest.raises(ModelNotFound, match="No model folder or cached model named"):
        resolve_model("no-such-org/no-such-model")
    with pytest.raises(UnsupportedModel) as unsupported:
        arch_spec({"hidden_size": 8})
    assert "names no model_type" in str(unsupported.value) and "llama" in unsupported.value.hint
