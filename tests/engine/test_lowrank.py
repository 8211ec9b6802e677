"""The emulator folder format loads as a model with the original module names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from emloc_engine.core.architectures import arch_spec
from emloc_engine.core.errors import ModelNotFound
from emloc_engine.core.ranks import rank_for_ratio
from emloc_engine.weights.headers import load_config
from emloc_engine.weights.lowrank import LowRankLinear, load_emulator
from tests.emulator_factory import write_svd_emulator


def test_rank_formula_matches_method() -> None:
    assert rank_for_ratio(0.4, 4096, 4096) == int(0.4 * 4096 * 4096 // 8192) == 819
    assert rank_for_ratio(0.5, 64, 32) == 10
    assert rank_for_ratio(1e-6, 8, 8) == 1


def test_full_rank_emulator_reproduces_logits(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = load_config(tiny_model_dir)
    spec = arch_spec(config)
    full = {f"{spec.module_name(b, m)}": 10_000 for b in range(2) for m in spec.linear_modules}
    emu_dir = write_svd_emulator(tiny_model_dir, tmp_path / "emu", ratio=0.5, rank_override=full)
    emu = load_emulator(emu_dir, dtype=torch.float64)
    orig = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    lowrank = [n for n, m in emu.named_modules() if isinstance(m, LowRankLinear)]
    assert len(lowrank) == 2 * len(spec.linear_modules)
    ids = torch.arange(5, 45).unsqueeze(0)
    with torch.no_grad():
        a, b = emu(ids).logits, orig(ids).logits
    assert torch.allclose(a, b, atol=1e-5)  # factors stored in fp32, float((a - b).abs().max())


def test_truncated_emulator_differs_and_is_smaller(tiny_llama: Path, tmp_path: Path) -> None:
    emu = load_emulator(write_svd_emulator(tiny_llama, tmp_path / "emu", ratio=0.3))
    orig = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    n_emu = sum(p.numel() for p in emu.parameters())
    n_orig = sum(p.numel() for p in orig.parameters())
    assert n_emu < n_orig
    ids = torch.arange(5, 45).unsqueeze(0)
    with torch.no_grad():
        assert not torch.allclose(emu(ids).logits, orig(ids).logits, atol=1e-3)


def test_missing_meta_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="emloc build"):
        load_emulator(tmp_path)


def test_rank_padding_keeps_the_function(tiny_llama: Path, tmp_path: Path) -> None:
    from emloc_engine.weights.lowrank import pad_rank

    emu_dir = write_svd_emulator(tiny_llama, tmp_path / "emu", ratio=0.37)
    exact = load_emulator(emu_dir, dtype=torch.float64)
    padded = load_emulator(emu_dir, dtype=torch.float64, rank_multiple=8)
    ranks = [m.rank for m in padded.modules() if isinstance(m, LowRankLinear)]
    assert ranks and all(r % 8 == 0 for r in ranks)
    assert any(m.rank % 8 for m in exact.modules() if isinstance(m, LowRankLinear))  # there was work to do
    assert pad_rank(padded, 8) == 0  # idempotent
    ids = torch.arange(5, 45).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(exact(ids).logits, padded(ids).logits, atol=1e-12)
