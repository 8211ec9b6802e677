"""The pure merge W + s·B·A (fp32, checked before commit), adapter reading, streaming shard IO."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from emloc_engine.core.errors import MergeError
from emloc_engine.stages.export.merge import (
    LoraDelta,
    ShardWriter,
    iter_shard_tensors,
    merge_state_dict,
    read_lora_deltas,
    read_shard_index,
)
from tests.engine.export_helpers import make_adapter


def _lora(out: int, inp: int, r: int, seed: int = 0) -> LoraDelta:
    g = torch.Generator().manual_seed(seed)
    return LoraDelta(torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g) * 0.1, 0.75)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_matches_fp64_reference_and_keeps_dtype(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 16, generator=g).to(dtype)
    lm = _lora(24, 16, 4)
    sd = {"m.q.weight": w, "m.norm.weight": torch.ones(16)}
    out = merge_state_dict(sd, {"m.q": lm, "absent.module": lm})
    exact = w.double() + lm.scale * lm.B.double() @ lm.A.double()
    assert out["m.q.weight"].dtype == dtype
    eps = torch.finfo(dtype).eps
    assert torch.allclose(out["m.q.weight"].double(), exact, rtol=eps, atol=eps * float(exact.abs().max()))
    assert float((out["m.q.weight"].double() - w.double()).abs().max()) > 0.01  # the delta is really there
    assert out["m.norm.weight"] is sd["m.norm.weight"]
    assert torch.equal(sd["m.q.weight"], w)  # input untouched


def test_merge_accepts_tuples_and_rejects_shape_mismatch() -> None:
    lm = _lora(8, 6, 2)
    out = merge_state_dict({"a.weight": torch.zeros(8, 6)}, {"a": (lm.A, lm.B, 2.0)})
    assert torch.allclose(out["a.weight"], 2.0 * lm.B @ lm.A, atol=1e-6)
    with pytest.raises(MergeError, match=r"(?s)a\.weight.*different model"):
        merge_state_dict({"a.weight": torch.zeros(6, 8)}, {"a": lm})


def test_nan_in_adapter_names_module_and_cause() -> None:
    lm = _lora(8, 6, 2)
    lm.B[0, 0] = float("nan")
    with pytest.raises(MergeError, match=r"(?s)layers\.3\.mlp\.up_proj\.weight.*training diverged"):
        merge_state_dict({"layers.3.mlp.up_proj.weight": torch.zeros(8, 6)}, {"layers.3.mlp.up_proj": lm})


def test_inf_in_base_weight_blames_the_shard() -> None:
    w = torch.zeros(8, 6)
    w[1, 1] = math.inf
    with pytest.raises(MergeError, match="corrupt"):
        merge_state_dict({"x.weight": w}, {"x": _lora(8, 6, 2)})


def test_fp16_overflow_on_cast_back_is_refused() -> None:
    w = torch.full((4, 4), 60000.0, dtype=torch.float16)
    lm = LoraDelta(torch.ones(1, 4), torch.ones(4, 1) * 100.0, 100.0)
    with pytest.raises(MergeError, match=r"overflows torch\.float16"):
        merge_state_dict({"x.weight": w}, {"x": lm})


def test_shard_writer_roundtrip_is_a_valid_safetensors_file(tmp_path: Path) -> None:
    tensors = {"b": torch.randn(3, 5).to(torch.bfloat16), "a": torch.arange(7, dtype=torch.int64),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "h": torch.randn(2, 2).half()}
    path = tmp_path / "x.safetensors"
    with ShardWriter(path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]) as w:
        for k, v in tensors.items():
            w.write(k, v)
    back = load_file(str(path))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(back[k], v), k
    streamed = dict(iter_shard_tensors(path))
    assert all(torch.equal(streamed[k], v) for k, v in tensors.items())


def test_truncated_shard_names_the_tensor(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"first": torch.zeros(10), "model.layers.1.mlp.down_proj.weight": torch.ones(64, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(MergeError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*truncated"):
        read_shard_index(path)


def test_garbage_header_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "model-00002-of-00003.safetensors"
    path.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!}" + b"\0" * 50)
    with pytest.raises(MergeError, match=r"model-00002-of-00003\.safetensors"):
        read_shard_index(path)


def test_inconsistent_entry_size_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 64)
    with pytest.raises(MergeError, match=r"'w'.*corrupt"):
        read_shard_index(path)


@pytest.mark.parametrize("rslora", [False, True])
def test_read_lora_deltas_scale(tiny_llama: Path, tmp_path: Path, rslora: bool) -> None:
    adapter = make_adapter(tiny_llama, tmp_path / "a", rank=4, alpha=6.0, use_rslora=rslora)
    _, deltas = read_lora_deltas(adapter)
    assert len(deltas) == 2 * 7
    d = deltas["model.layers.1.self_attn.k_proj"]
    assert d.A.shape == (4, 32) and d.B.shape == (16, 4)  # GQA: 2 kv heads × 8
    assert d.scale == pytest.approx(6.0 / 2.0 if rslora else 6.0 / 4.0)
    assert float(d.B.abs().max()) > 0


def test_modules_to_save_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    adapter = make_adapter(tiny_llama, tmp_path / "a")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["modules_to_save"] = ["lm_head"]
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MergeError, match="modules_to_save"):
        read_lora_deltas(adapter)
