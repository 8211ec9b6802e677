"""The llama.cpp LoRA adapter GGUF: metadata and names as convert_lora_to_gguf.py writes them, the q/k
permutation consistent with the base GGUF's tensors, and logits of base + adapter (applied as llama.cpp
does, alpha/r·B·A) equal to original + adapter through peft."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from emloc_engine.core.errors import MergeError
from emloc_engine.stages.export.adapter_gguf import AdapterGgufConfig, apply_adapter_gguf, export_adapter_gguf
from emloc_engine.weights.headers import load_config
from tests.engine.export_helpers import logits, make_adapter, max_diff, peft_logits


def _snap(cache: Path, arch: str) -> Path:
    return next((cache / f"models--emloc-test--tiny-{arch}" / "snapshots").iterdir())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma", "phi3"])
def test_adapter_gguf_reproduces_peft(tiny_cache: Path, tmp_path: Path, arch: str) -> None:
    import gguf
    from transformers import AutoModelForCausalLM

    snap = _snap(tiny_cache, arch)
    adapter = make_adapter(snap, tmp_path / "adapter", rank=4, alpha=8.0)
    res = export_adapter_gguf(AdapterGgufConfig(adapter, snap, tmp_path / "adapter.gguf"))
    reader = gguf.GGUFReader(str(res.path))
    f = reader.fields
    assert f["general.type"].contents() == "adapter" and f["adapter.type"].contents() == "lora"
    assert f["adapter.lora.alpha"].contents() == pytest.approx(8.0)
    assert f["general.architecture"].contents() == {"mistral": "llama"}.get(arch, arch)
    names = {t.name for t in reader.tensors}
    assert "blk.0.ffn_down.weight.lora_a" in names and "blk.1.ffn_down.weight.lora_b" in names
    a = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight.lora_a")
    assert a.tensor_type == gguf.GGMLQuantizationType.F32 and int(a.shape[1]) == 4  # ggml ne = (in, r)
    model = AutoModelForCausalLM.from_pretrained(str(snap), dtype=torch.float32).eval()
    assert apply_adapter_gguf(model, res.path, load_config(snap)) == res.n_modules
    ref = peft_logits(snap, adapter)
    assert max_diff(ref, logits(model)) < 1e-4 * max(float(r.abs().max()) for r in ref)


def test_rank_pattern_and_rslora_are_folded_into_b(tiny_llama: Path, tmp_path: Path) -> None:
    """One file-wide alpha: each B carries s·r/alpha so per-module scales survive."""
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(tiny_llama, tmp_path / "a", rank=4, alpha=8.0, use_rslora=True)
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "alpha_pattern": {"v_proj": 3.0}}))
    res = export_adapter_gguf(AdapterGgufConfig(adapter, tiny_llama, tmp_path / "a.gguf"))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    apply_adapter_gguf(model, res.path, load_config(tiny_llama))
    ref = peft_logits(tiny_llama, adapter)
    assert max_diff(ref, logits(model)) < 1e-4 * max(float(r.abs().max()) for r in ref)


def test_q_k_rows_are_permuted_like_the_base_gguf(tiny_llama: Path, tmp_path: Path) -> None:
    """In GGUF space: base tensor + alpha/r·B'·A equals the merged model's tensor (both permuted)."""
    import gguf
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from emloc_engine.stages.export.gguf_export import GgufConfig, export_gguf

    adapter = make_adapter(tiny_llama, tmp_path / "a", rank=4, alpha=8.0)
    export_adapter_gguf(AdapterGgufConfig(adapter, tiny_llama, tmp_path / "a.gguf"))
    export_gguf(GgufConfig(tiny_llama, tmp_path / "base.gguf", "f32"))
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(adapter))
    merged.merge_and_unload().save_pretrained(str(tmp_path / "merged"))
    for p in tiny_llama.iterdir():
        if p.name.startswith("tokenizer") or p.name == "special_tokens_map.json":
            (tmp_path / "merged" / p.name).write_bytes(p.read_bytes())
    export_gguf(GgufConfig(tmp_path / "merged", tmp_path / "merged.gguf", "f32"))

    def tensors(path: Path) -> dict[str, np.ndarray]:
        return {t.name: np.asarray(t.data, dtype=np.float32) for t in gguf.GGUFReader(str(path)).tensors}

    base, ad, want = tensors(tmp_path / "base.gguf"), tensors(tmp_path / "a.gguf"), tensors(tmp_path / "merged.gguf")
    for name in ("blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.0.attn_v.weight"):
        A, B = ad[f"{name}.lora_a"], ad[f"{name}.lora_b"]
        got = base[name] + (8.0 / A.shape[0]) * (B @ A)
        assert np.allclose(got, want[name], atol=1e-5), name


def test_refuses_existing_file_and_foreign_files(tiny_llama: Path, tmp_path: Path) -> None:
    adapter = make_adapter(tiny_llama, tmp_path / "a")
    out = tmp_path / "a.gguf"
    out.write_bytes(b"old")
    with pytest.raises(MergeError, match="already exists"):
        export_adapter_gguf(AdapterGgufConfig(adapter, tiny_llama, out))
    assert out.read_bytes() == b"old"
    from emloc_engine.stages.export.gguf_export import GgufConfig, export_gguf

    export_gguf(GgufConfig(tiny_llama, tmp_path / "base.gguf", "f32"))
    from transformers import AutoModelForCausalLM

    with pytest.raises(MergeError, match="not a LoRA adapter"):
        apply_adapter_gguf(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), tmp_path / "base.gguf",
                           load_config(tiny_llama))
