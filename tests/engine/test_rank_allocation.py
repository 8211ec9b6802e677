"""Spectral rank allocation: the greedy allocator, the streamed spectra pass, and the opt-in build mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from emloc_engine.core.architectures import arch_spec
from emloc_engine.core.errors import Cancelled, ConfigError
from emloc_engine.core.progress import RecordingProgress
from emloc_engine.core.ranks import rank_for_ratio
from emloc_engine.stages.emulator.builder import build_emulator, measure_spectra
from emloc_engine.stages.emulator.rank_allocation import (
    allocate_ranks,
    dense_threshold,
    kept_parameters,
    uniform_budget,
)
from emloc_engine.stages.emulator.spectral import ALLOCATION_FILE
from emloc_engine.stages.emulator.writer import BLOCK_FILE
from emloc_engine.weights.checkpoint import Checkpoint
from emloc_engine.weights.lowrank import read_emulator_meta
from tests.engine.test_emulator import _config, _reference_activations, _tensors


# -- (a) the allocator -------------------------------------------------------------------------------
def test_hand_made_case_gives_the_known_answer() -> None:
    """One module with all its energy in the first direction, one with a flat spectrum: every rank
    beyond 1 is worth nothing on the first and the same on the second, so the second gets it all."""
    shapes = {"peaked": (32, 32), "flat": (32, 32)}
    spectra = {"peaked": [1.0] + [0.0] * 31, "flat": [1.0] * 32}
    overrides, dense = allocate_ranks(spectra, shapes, 0.5)
    budget = uniform_budget(shapes, 0.5)
    assert budget == 2 * 8 * 64  # k = floor(0.5·32·32/64) = 8 each
    # Both start at rank 1 (128 parameters); the other 896 buy 14 units of 64 for the flat one.
    assert dense_threshold(32, 32) == 16
    assert overrides == (("peaked", 1), ("flat", 15)) and dense == ()
    assert kept_parameters(shapes, overrides, dense) == budget
    # With a larger budget the flat module reaches k_max and is kept dense (at its true cost, 1024).
    overrides, dense = allocate_ranks(spectra, shapes, 0.5, budget=64 + 1024)
    assert dense == ("flat",) and overrides == (("peaked", 1),)
    assert kept_parameters(shapes, overrides, dense) == 64 + 1024


def test_allocator_invariants_on_random_spectra() -> None:
    g = torch.Generator().manual_seed(0)
    shapes = {f"m{i}": (int(o), int(n)) for i, (o, n) in
              enumerate(torch.randint(8, 96, (12, 2), generator=g).tolist())}
    spectra = {}
    for name, (o, n) in shapes.items():
        decay = float(torch.rand(1, generator=g)) * 0.5
        spectra[name] = (torch.rand(min(o, n), generator=g) * torch.exp(-decay * torch.arange(min(o, n)))
                         ).sort(descending=True).values.tolist()
    for ratio in (0.1, 0.25, 0.5, 0.8, 0.95):
        overrides, dense = allocate_ranks(spectra, shapes, ratio)
        ranks = dict(overrides)
        assert set(ranks) | set(dense) == set(shapes) and not set(ranks) & set(dense)
        assert all(k >= 1 for k in ranks.values())
        assert all(k < dense_threshold(*shapes[n]) for n, k in ranks.items())  # dense exactly at the threshold
        assert kept_parameters(shapes, overrides, dense) <= uniform_budget(shapes, ratio)
        # Greedy used the budget: no single rank unit of any compressed module still fits.
        left = uniform_budget(shapes, ratio) - kept_parameters(shapes, overrides, dense)
        assert not ranks or left < min(2 * sum(shapes[n]) for n in ranks)
    with pytest.raises(ValueError, match="shape"):
        allocate_ranks({"x": [1.0]}, {}, 0.5)
    with pytest.raises(ValueError, match="negative"):
        allocate_ranks({"x": [1.0, -1.0]}, {"x": (4, 4)}, 0.5)


# -- (b) streamed spectra equal an in-memory fp64 reference -------------------------------------------
def _reference_spectra(model_dir: Path) -> dict[str, list[float]]:
    """The full model in fp64, one sample at a time (test_emulator's reference activations): C = XᵀX per
    module, then eigvalsh of W C Wᵀ."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    out = {}
    for name, x in _reference_activations(model_dir).items():
        w = model.get_submodule(name).weight.detach()
        out[name] = torch.linalg.eigvalsh(w @ (x.T @ x) @ w.T).flip(0).clamp_min(0)[: min(w.shape)].tolist()
    return out


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_streamed_spectra_equal_in_memory_reference(tiny_cache: Path, tmp_path: Path, arch: str) -> None:
    from tests.conftest import _snapshot

    model_dir = _snapshot(tiny_cache, arch)
    ours = measure_spectra(_config(model_dir, tmp_path / "e"))
    ref = _reference_spectra(model_dir)
    assert ours.keys() == ref.keys()
    for name in ref:
        a, b = torch.tensor(ours[name]), torch.tensor(ref[name])
        assert a.shape == b.shape, name
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9 * float(b[0])), name
    assert not (tmp_path / "e").exists()  # the pass writes nothing


# -- (c) the build mode ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "phi3", "qwen2"])
def test_spectral_build_uses_the_allocation_within_the_uniform_budget(tiny_cache: Path, tmp_path: Path,
                                                                     arch: str) -> None:
    from tests.conftest import _snapshot

    model_dir = _snapshot(tiny_cache, arch)
    ratio = 0.5
    rec = RecordingProgress()
    spectral = build_emulator(_config(model_dir, tmp_path / "spectral", ratio=ratio, allocation="spectral"), rec)
    uniform = build_emulator(_config(model_dir, tmp_path / "uniform", ratio=ratio))
    ref = _reference_spectra(model_dir)
    ckpt = Checkpoint(model_dir)
    shapes = {n: (int(ckpt.info(f"{n}.weight").shape[0]), int(ckpt.info(f"{n}.weight").shape[1])) for n in ref}
    overrides, dense = allocate_ranks(ref, shapes, ratio)
    assert {n: m["rank"] for n, m in spectral.modules.items()} == dict(overrides)
    meta = read_emulator_meta(spectral.emulator_dir)
    assert meta["allocation"] == "spectral" and sorted(meta["dense_modules"]) == sorted(dense)
    assert meta["spectral_allocation"]["params_spent"] <= meta["spectral_allocation"]["budget"]
    assert meta["spectral_allocation"]["budget"] == uniform_budget(shapes, ratio)
    assert read_emulator_meta(uniform.emulator_dir)["allocation"] == "uniform"
    assert spectral.params_kept <= uniform.params_kept
    assert spectral.params_kept == sum(t.numel() for t in _tensors(spectral.emulator_dir).values())
    assert {n: m["rank"] for n, m in spectral.modules.items()} != {n: m["rank"] for n, m in uniform.modules.items()}
    fractions = [f for f, _ in rec.updates]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(m.startswith("rank allocation") for _, m in rec.updates)


def test_user_overrides_combine_with_the_allocation(tiny_llama: Path, tmp_path: Path) -> None:
    cfg = _config(tiny_llama, tmp_path / "e", ratio=0.4, allocation="spectral",
                  dense_patterns=("*.1.mlp.down_proj",), rank_overrides=(("*.0.self_attn.q_proj", 3),),
                  ratio_overrides=(("*.1.self_attn.o_proj", 1.0),))
    result = build_emulator(cfg)
    meta = read_emulator_meta(result.emulator_dir)
    assert "model.layers.1.mlp.down_proj" in meta["dense_modules"]
    assert "model.layers.1.self_attn.o_proj" in meta["dense_modules"]
    assert result.modules["model.layers.0.self_attn.q_proj"]["rank"] == 3
    # The budget covers only the free modules, at the uniform rank.
    ckpt = Checkpoint(tiny_llama)
    spec = arch_spec(json.loads((tiny_llama / "config.json").read_text()))
    free = [spec.module_name(b, m) for b in range(2) for m in spec.linear_modules]
    for fixed in ("1.mlp.down_proj", "1.self_attn.o_proj", "0.self_attn.q_proj"):
        free.remove(f"model.layers.{fixed}")
    shapes = [tuple(ckpt.info(f"{n}.weight").shape) for n in free]
    assert meta["spectral_allocation"]["budget"] == sum(rank_for_ratio(0.4, o, i) * (o + i) for o, i in shapes)
    assert meta["spectral_allocation"]["params_spent"] <= meta["spectral_allocation"]["budget"]
    with pytest.raises(ConfigError, match="allocation"):
        _config(tiny_llama, tmp_path / "x", allocation="greedy")


# -- (d) resume ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lose_cache", [False, True])
def test_spectral_resume_gives_identical_factors(tiny_llama: Path, tmp_path: Path, lose_cache: bool) -> None:
    full = build_emulator(_config(tiny_llama, tmp_path / "full", allocation="spectral"))
    out = tmp_path / "resumed"
    # updates: spectra pass (start, capture, block 1, block 2, allocation), build (start, capture, block 1)
    with pytest.raises(Cancelled):
        build_emulator(_config(tiny_llama, out, allocation="spectral"), RecordingProgress(cancel_after_updates=8))
    assert (out / BLOCK_FILE.format(0)).exists() and (out / ALLOCATION_FILE).exists()
    assert not (out / BLOCK_FILE.format(1)).exists() and not (out / "emloc.json").exists()
    stored = json.loads((out / ALLOCATION_FILE).read_text())
    if lose_cache:  # the pass is deterministic: recomputing it gives the same plan, block 0 is reused
        (out / ALLOCATION_FILE).unlink()
    rec = RecordingProgress()
    resumed = build_emulator(_config(tiny_llama, out, allocation="spectral"), rec)
    assert resumed.resumed_blocks == (0,)
    assert any(m.startswith("rank allocation") for _, m in rec.updates) == lose_cache
    assert json.loads((out / ALLOCATION_FILE).read_text())["rank_overrides"] == stored["rank_overrides"]
    a, b = _tensors(full.emulator_dir), _tensors(resumed.emulator_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    again = build_emulator(_config(tiny_llama, out, allocation="spectral"))
    assert again.resumed_blocks == (0, 1)
    # The allocation mode is part of the build id: a uniform build there needs overwrite.
    with pytest.raises(ConfigError, match="overwrite"):
        build_emulator(_config(tiny_llama, out))


def test_spectral_with_factor_devices_equals_one_device(tiny_llama: Path, tmp_path: Path) -> None:
    """`--allocation spectral` with `--gpus N` (factorisation on other devices): the same allocation and the
    same factors, bit for bit, as on one device (here the 'other device' is a CPU worker)."""
    one = build_emulator(_config(tiny_llama, tmp_path / "one", allocation="spectral"))
    two = build_emulator(_config(tiny_llama, tmp_path / "two", allocation="spectral", factor_devices=("cpu",)))
    assert one.params_kept == two.params_kept
    a, b = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_cancel_during_the_spectra_pass_writes_nothing(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "e"
    with pytest.raises(Cancelled):
        build_emulator(_config(tiny_llama, out, allocation="spectral"), RecordingProgress(cancel_after_updates=3))
    assert not out.exists() or not any(out.iterdir())


# -- CLI / run settings ----------------------------------------------------------------------------------
def test_run_option_and_toml_key(tmp_path: Path) -> None:
    from emloc_engine.cli.main import build_parser
    from emloc_engine.run.options import build_config, toml_values, typed_values
    from emloc_engine.stages.emulator.options import EmulatorOptions

    def allocation(argv: list[str]) -> str:
        values = typed_values(build_parser().parse_args(argv))
        return str(build_config(None, values, model_dir=Path("m"), data_path=Path("d"), run_dir=Path("r"))
                   .emulator.allocation)

    assert allocation(["run", "m", "d", "--out", "o"]) == "uniform"
    assert allocation(["run", "m", "d", "--out", "o", "--allocation", "spectral"]) == "spectral"
    toml = tmp_path / "run.toml"
    toml.write_text('model = "m"\ndata = "d.jsonl"\nout = "runs/x"\nallocation = "spectral"\n')
    assert toml_values(toml)["emulator.allocation"] == "spectral"
    with pytest.raises(ConfigError, match="allocation"):
        EmulatorOptions(allocation="greedy")
