"""GGUF export: round trip through transformers' GGUF reader (weights, q/k permutation, tokenizer, chat
template) for Llama, Qwen2 and Mistral; refusals; Llama-3 rope factors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from emloc_engine.core.errors import ConfigError, MergeError, UnsupportedModel
from emloc_engine.stages.export.gguf_export import GgufConfig, export_gguf, llama3_rope_factors, permute_qk
from tests.engine.export_helpers import hf_logits, max_diff
from tests.tiny_models import CHAT_TEMPLATE

# Allowed max |Δlogit| / max |logit|: f32 is exact, f16 rounds weights to 11 bits, Q8_0 to 8 bits per
# block of 32 (on these 32-wide models every row is a single block, the worst case).
REL_TOL = {"f32": 1e-5, "f16": 5e-3, "q8_0": 8e-2}


def _snap(cache: Path, arch: str) -> Path:
    return next((cache / f"models--emloc-test--tiny-{arch}" / "snapshots").iterdir())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "phi3"])
@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_gguf_round_trip_logits(tiny_cache: Path, tmp_path: Path, arch: str, gguf_type: str) -> None:
    snap = _snap(tiny_cache, arch)
    out = tmp_path / "model.gguf"
    res = export_gguf(GgufConfig(snap, out, gguf_type))
    assert res.path == out and out.stat().st_size == res.file_bytes and not (tmp_path / "model.gguf.partial").exists()
    assert res.arch == {"mistral": "llama"}.get(arch, arch) and res.tokenizer_model == "gpt2"
    ref = hf_logits(snap)
    got = hf_logits(tmp_path, gguf_file=out.name)
    scale = max(float(r.abs().max()) for r in ref)
    diff = max_diff(ref, got)
    assert 0 < diff < REL_TOL[gguf_type] * scale, (diff, scale)


def _rounded_like_gguf(snap: Path, gguf_type: str) -> list[torch.Tensor]:
    """Logits of the HF model with every 2-D weight quantized and dequantized by gguf.quants (the file's rounding)."""
    import gguf
    from transformers import AutoModelForCausalLM

    from tests.engine.export_helpers import logits

    qt = gguf.GGMLQuantizationType[gguf_type.upper()]
    model = AutoModelForCausalLM.from_pretrained(str(snap), dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and p.shape[-1] % 32:  # not whole blocks: the file keeps F16
                p.copy_(p.half().float())
            elif p.dim() == 2:
                arr = p.numpy()
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(arr, qt), qt).reshape(arr.shape)))
    return logits(model)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
@pytest.mark.parametrize("gguf_type", ["q4_0", "q4_1", "q5_0", "q5_1"])
def test_4_and_5_bit_files_hold_exactly_the_quantized_weights(tiny_cache: Path, tmp_path: Path, arch: str,
                                                               gguf_type: str) -> None:
    """The 4/5-bit files, read by transformers' GGUF loader, give the logits of the model with its weights
    rounded by gguf.quants (f32 arithmetic): the layout is right and the rounding is the type's."""
    import gguf

    snap = _snap(tiny_cache, arch)
    export_gguf(GgufConfig(snap, tmp_path / "m.gguf", gguf_type))
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert types["blk.0.ffn_down.weight"] == gguf_type.upper() and types["blk.0.attn_output.weight"] in (
        gguf_type.upper(), "F16") and types["output_norm.weight"] == "F32"
    got = hf_logits(tmp_path, gguf_file="m.gguf")
    rounded = _rounded_like_gguf(snap, gguf_type)
    assert max_diff(rounded, got) < 1e-4 * max(float(r.abs().max()) for r in rounded)
    assert max_diff(hf_logits(snap), got) > 1e-3  # it did round


def test_f32_gguf_is_exact_so_the_qk_permutation_is_right(tiny_llama: Path, tmp_path: Path) -> None:
    export_gguf(GgufConfig(tiny_llama, tmp_path / "m.gguf", "f32"))
    assert max_diff(hf_logits(tiny_llama), hf_logits(tmp_path, gguf_file="m.gguf")) < 1e-5


def test_tensor_names_types_and_metadata(tiny_llama: Path, tmp_path: Path) -> None:
    import gguf

    export_gguf(GgufConfig(tiny_llama, tmp_path / "m.gguf", "q8_0", name="tiny-test"))
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.1.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.1.ffn_down.weight"} <= set(types)
    fields = reader.fields

    def value(key: str) -> object:
        f = fields[key]
        return f.contents()

    assert value("general.architecture") == "llama" and value("general.name") == "tiny-test"
    assert value("llama.block_count") == 2 and value("llama.attention.head_count_kv") == 2
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    assert value("tokenizer.ggml.eos_token_id") == 3 and value("tokenizer.ggml.padding_token_id") == 0
    assert value("tokenizer.chat_template") == CHAT_TEMPLATE
    tokens = value("tokenizer.ggml.tokens")
    assert isinstance(tokens, list) and len(tokens) == 320 and tokens[3] == "<|im_end|>" and tokens[300] == "[PAD300]"
    assert value("tokenizer.ggml.merges") == []  # present (llama.cpp needs it) though this vocab has none


def test_tokenizer_round_trip(tiny_cache: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    snap = _snap(tiny_cache, "qwen2")
    export_gguf(GgufConfig(snap, tmp_path / "m.gguf", "f16"))
    ref = AutoTokenizer.from_pretrained(str(snap))
    tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    chat = ref.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False,
                                   add_generation_prompt=True)
    for text in ("Hello, world!  123 ünïcode ✓", chat, "<|im_start|>user\nx<|im_end|>"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == ref(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert tok.chat_template == CHAT_TEMPLATE and tok.eos_token == "<|im_end|>"


def test_permute_is_inverted_by_transformers(tiny_llama: Path) -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    proc = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    w = torch.randn(16, 32)  # k_proj under GQA: 2 heads × 8
    back = proc.process(permute_qk(w, 4, 2).numpy(), "blk.0.attn_k.weight").weights
    assert np.array_equal(back, w.numpy())
    assert not torch.equal(permute_qk(w, 4, 2), w)


def test_llama3_rope_factors_match_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = {"hidden_size": 256, "num_attention_heads": 2, "rope_parameters": rope}
    factors = llama3_rope_factors(cfg)
    assert factors is not None and factors.shape == (64,)
    hf = LlamaConfig(hidden_size=256, num_attention_heads=2, rope_parameters=rope, max_position_embeddings=131072)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    base = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    assert torch.allclose(base / factors, scaled.float(), rtol=1e-5)
    assert llama3_rope_factors({"hidden_size": 8, "num_attention_heads": 2}) is None


@pytest.mark.parametrize("gguf_type", ["f32", "q8_0"])
def test_gemma_is_written_with_its_norms_as_one_plus_w(tiny_cache: Path, tmp_path: Path, gguf_type: str) -> None:
    """Gemma (which transformers' GGUF loader does not read): read back through gguf_readback, exact in f32."""
    import gguf

    from emloc_engine.stages.export.gguf_readback import load_gguf_as_hf
    from tests.engine.export_helpers import logits

    snap = _snap(tiny_cache, "gemma")
    res = export_gguf(GgufConfig(snap, tmp_path / "g.gguf", gguf_type))
    reader = gguf.GGUFReader(str(tmp_path / "g.gguf"))
    assert res.arch == "gemma" and reader.fields["general.architecture"].contents() == "gemma"
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied to token_embd
    norm = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")
    from safetensors import safe_open

    with safe_open(str(next(snap.glob("*.safetensors"))), "pt") as fh:
        hf_norm = fh.get_tensor("model.layers.0.input_layernorm.weight").float().numpy()
    assert np.allclose(np.asarray(norm.data), hf_norm + 1)
    ref = hf_logits(snap) if gguf_type == "f32" else _rounded_like_gguf(snap, gguf_type)
    assert max_diff(ref, logits(load_gguf_as_hf(tmp_path / "g.gguf", snap))) < 1e-4 * max(float(r.abs().max()) for r in ref)


def test_refusals(tiny_cache: Path, tmp_path: Path) -> None:
    gemma3 = tmp_path / "gemma3"
    shutil.copytree(_snap(tiny_cache, "gemma"), gemma3)
    cfg = json.loads((gemma3 / "config.json").read_text())
    (gemma3 / "config.json").write_text(json.dumps({**cfg, "model_type": "gemma3_text", "layer_types": ["full_attention"] * 2}))
    with pytest.raises(UnsupportedModel, match="sliding-window"):
        export_gguf(GgufConfig(gemma3, tmp_path / "g.gguf"))
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    with pytest.raises(MergeError, match="already exists"):
        export_gguf(GgufConfig(_snap(tiny_cache, "llama"), out))
    assert out.read_bytes() == b"old"
    with pytest.raises(ConfigError):
        GgufConfig(tmp_path, out, "q7_0")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy2(_snap(tiny_cache, "llama") / "config.json", bare / "config.json")
    with pytest.raises(UnsupportedModel, match="tokenizer"):
        export_gguf(GgufConfig(bare, tmp_path / "b.gguf"))
    assert not (tmp_path / "b.gguf").exists()


@pytest.mark.parametrize(("arch", "extra"), [
    ("qwen3", {"head_dim": 128}),  # transformers reads Qwen3 GGUFs with its default head_dim only
    ("granite", {"attention_multiplier": 0.2, "embedding_multiplier": 3.0, "residual_multiplier": 0.5,
                 "logits_scaling": 2.0}),
    ("olmo2", {}),
    ("gemma2", {"head_dim": 8, "query_pre_attn_scalar": 8, "tie_word_embeddings": True}),
    ("gemma3_text", {"head_dim": 8, "query_pre_attn_scalar": 8, "tie_word_embeddings": True}),
])
def test_more_families_round_trip_exactly_in_f32(tmp_path: Path, arch: str, extra: dict[str, float]) -> None:
    """Qwen3 (through transformers' GGUF loader), Granite, OLMo2, Gemma 2 (read back by gguf_readback): f32 is exact,
    so names, the q/k permutation (Granite) and q/k norms (Qwen3, OLMo2) are right; Granite's multipliers
    are written under llama.cpp's keys."""
    import gguf

    from emloc_engine.stages.export.gguf_readback import load_gguf_as_hf
    from tests.engine.export_helpers import logits
    from tests.tiny_models import build_tiny_model

    snap = build_tiny_model(arch, tmp_path / "cache", **extra)
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    res = export_gguf(GgufConfig(snap, out, "f32"))
    assert res.arch == arch.removesuffix("_text")
    ref = hf_logits(snap)
    got = hf_logits(out.parent, gguf_file=out.name) if arch == "qwen3" else logits(load_gguf_as_hf(out, snap))
    assert max_diff(ref, got) < 1e-4
    fields = gguf.GGUFReader(str(out)).fields
    if arch == "granite":
        assert fields["granite.attention.scale"].contents() == pytest.approx(0.2)
        assert fields["granite.logit_scale"].contents() == pytest.approx(2.0)
    if arch == "gemma3_text":
        assert fields["gemma3.rope.freq_base"].contents() == pytest.approx(1e6)
        assert fields["gemma3.attention.sliding_window"].contents() == 4096
    if arch == "gemma2":
        assert fields["gemma2.attn_logit_softcapping"].contents() == pytest.approx(50.0)
        assert fields["gemma2.attention.key_length"].contents() == 8
    if arch == "olmo2":
        assert {"blk.0.post_attention_norm.weight", "blk.0.attn_q_norm.weight"} <= {
            t.name for t in gguf.GGUFReader(str(out)).tensors}
