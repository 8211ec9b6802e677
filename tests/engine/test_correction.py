"""Stage 3: the correction identities of METHOD.md, the corrected adapter on disk, and λ selection."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from emloc_engine.core.errors import Cancelled, ConfigError, RunStateError, UnsupportedModel
from emloc_engine.core.progress import RecordingProgress
from emloc_engine.stages.correction.corrector import (
    CorrectionConfig,
    apply_lambda,
    choose_lambda,
    correct_lora,
    correct_module,
    prepare_module,
)
from emloc_engine.weights.adapters import CORRECTION_META, fingerprint_adapter, lora_scale, read_adapter
from emloc_engine.weights.checkpoint import Checkpoint
from emloc_engine.weights.headers import load_config
from emloc_engine.weights.lowrank import read_emulator_meta
from tests.emulator_factory import write_svd_emulator
from tests.lora_factory import write_random_adapter

F64 = torch.float64


@dataclass(frozen=True)
class Ex:
    """Stands in for emloc_engine.data.Example (same fields)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


def _problem(out_f: int = 24, in_f: int = 20, k: int = 6, r: int = 4, seed: int = 0
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=F64)
    u_, s, vh = torch.linalg.svd(w + 0.3 * torch.randn(out_f, in_f, generator=g, dtype=F64), full_matrices=False)
    u, v = u_[:, :k] * s[:k].sqrt(), s[:k].sqrt()[:, None] * vh[:k]
    a = torch.randn(r, in_f, generator=g, dtype=F64) / in_f ** 0.5
    b = torch.randn(out_f, r, generator=g, dtype=F64) * 0.1
    return w, (u, v), a, b


def _span_inputs(a: torch.Tensor, n: int = 7, seed: int = 1) -> torch.Tensor:
    """Random inputs x in span(Aᵀ): x = g A."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, a.shape[0], generator=g, dtype=F64) @ a.double()


# ---------------------------------------------------------------------------------------------
# Pure maths
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("alpha", "r", "rslora"), [(16.0, 4, False), (4.0, 4, False), (1.0, 8, False),
                                                     (32.0, 4, True), (3.0, 8, True)])
def test_exact_identity_on_span_of_A(alpha: float, r: int, rslora: bool) -> None:
    w, (u, v), a, b = _problem(r=r)
    s = alpha / math.sqrt(r) if rslora else alpha / r
    x = _span_inputs(a)
    want = x @ (u @ v + s * b @ a).T  # emulator + trained adapter
    before = x @ (w + s * b @ a).T  # original + trained adapter: differs
    assert (before - want).abs().max() > 1e-2
    for w_e in ((u, v), u @ v):
        c = correct_module(w, w_e, a, b, s, math.inf)
        got = x @ (w + s * c.lora_B @ c.lora_A).T
        assert (got - want).abs().max() < 1e-10
        assert not any(c.damped)


def test_reference_bug_is_not_copied() -> None:
    """Subtracting Δ without dividing by s (the reference code) breaks the identity unless alpha = r."""
    w, (u, v), a, b = _problem()
    s = 4.0
    c = correct_module(w, (u, v), a, b, s, math.inf)
    undivided = c.lora_B - c.correction * (s - 1.0)  # B' − Δ instead of B' − Δ/s
    x = _span_inputs(a)
    want = x @ (u @ v + s * b @ a).T
    assert (x @ (w + s * undivided @ c.lora_A).T - want).abs().max() > 1e-3


def test_reparametrisation_keeps_the_product() -> None:
    w, (u, v), a, b = _problem()
    p = prepare_module(w, (u, v), a, b, 2.0)
    assert p.A_prime is not None and p.B_prime is not None
    assert torch.allclose(p.B_prime @ p.A_prime, b @ a, atol=1e-13)
    assert torch.allclose(p.A_prime @ p.A_prime.T, torch.eye(a.shape[0], dtype=F64), atol=1e-13)


@pytest.mark.parametrize("case", ["duplicate_rows", "zero_A", "r_above_in", "zero_B"])
def test_rank_deficient_A_gives_no_nan(case: str) -> None:
    w, (u, v), a, b = _problem(r=4, in_f=20)
    if case == "duplicate_rows":
        a = torch.cat([a[:2], a[:2]])
    elif case == "zero_A":
        a = torch.zeros_like(a)
    elif case == "r_above_in":
        w, (u, v), a, b = _problem(r=12, in_f=8, out_f=10, k=3)
    elif case == "zero_B":
        b = torch.zeros_like(b)
    s = 2.0
    for lam in (0.0, 1.0, 3.0, math.inf):
        c = correct_module(w, (u, v), a, b, s, lam)
        assert c.lora_A.shape == a.shape and c.lora_B.shape == b.shape
        assert torch.isfinite(c.lora_A).all() and torch.isfinite(c.lora_B).all()
        assert math.isfinite(c.correction_norm)
    c = correct_module(w, (u, v), a, b, s, math.inf)
    x = _span_inputs(a)
    got, want = x @ (w + s * c.lora_B @ c.lora_A).T, x @ (u @ v + s * b @ a).T
    assert (got - want).abs().max() < 1e-10
    if case == "zero_A":  # no direction is read: nothing to correct
        assert c.correction_norm == 0.0
    if case == "r_above_in":  # span(Aᵀ) is everything: original + Λᶜ equals emulator + Λ
        assert torch.allclose(w + s * c.lora_B @ c.lora_A, u @ v + s * b @ a, atol=1e-10)


@pytest.mark.parametrize("lam", [0.1, 0.5, 1.0, 3.0])
def test_finite_lambda_respects_the_bound(lam: float) -> None:
    w, (u, v), _, b = _problem(r=8, seed=3)
    # A with orthogonal rows of distinct lengths: then B' = B P R is B's columns (permuted, rescaled),
    # so B's large columns give undamped directions and its small ones damped directions.
    q0, _ = torch.linalg.qr(torch.randn(20, 8, dtype=F64, generator=torch.Generator().manual_seed(5)))
    a = torch.linspace(0.5, 1.5, 8, dtype=F64)[:, None] * q0.T
    b[:, :4] *= 1000.0
    b[:, 4:] *= 0.001
    s = 2.0
    p = prepare_module(w, (u, v), a, b, s)
    assert p.gap is not None and p.B_prime is not None
    c = apply_lambda(p, lam)
    mean_c = c.correction.abs().mean(0)
    bound = lam * p.B_prime.abs().mean(0)
    assert torch.all(mean_c <= bound * (1 + 1e-12))
    damped = torch.tensor(c.damped)
    assert damped.any() and (~damped).any()
    assert torch.allclose(mean_c[damped], bound[damped], rtol=1e-12)  # scaled to exactly the bound
    assert torch.equal(c.correction[:, ~damped], p.gap[:, ~damped])  # the rest exact
    assert torch.allclose(c.lora_B, p.B_prime - c.correction)


def test_lambda_zero_returns_the_adapter_bit_for_bit() -> None:
    w, (u, v), a, b = _problem()
    a32, b32 = a.float(), b.float()
    c = correct_module(w, (u, v), a32, b32, 2.0, 0.0)
    assert c.lora_A is a32 and c.lora_B is b32
    assert c.correction_norm == 0.0


def test_uncompressed_module_is_left_alone() -> None:
    w, _, a, b = _problem()
    for lam in (0.0, 3.0, math.inf):
        c = correct_module(w, None, a, b, 2.0, lam)
        assert c.lora_A is a and c.lora_B is b and not any(c.damped)


def test_choose_lambda_lowest_loss_ties_to_smaller() -> None:
    assert choose_lambda([(0.0, 2.0), (1.0, 1.5), (math.inf, 1.7)]) == 1.0
    assert choose_lambda([(0.0, 1.5), (1.0, 1.5), (3.0, 1.6)]) == 0.0
    assert choose_lambda([(3.0, 1.2), (math.inf, 1.2)]) == 3.0
    assert choose_lambda([(0.0, math.nan), (1.0, 5.0)]) == 1.0
    assert choose_lambda([(0.5, math.nan), (1.0, math.inf)]) == 0.5


# ---------------------------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------------------------
def test_scale_matches_peft_with_patterns_and_rslora(tiny_llama: Path) -> None:
    from peft.tuners.lora import LoraLayer

    for kw in ({"rank_pattern": {"o_proj": 2, "layers.1.mlp.up_proj": 6}, "alpha_pattern": {"down_proj": 3.0}},
               {"use_rslora": True}):
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"], **kw)  # type: ignore[arg-type]
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), cfg)
        config_dict = json.loads(json.dumps(cfg.to_dict(), default=str))
        seen = 0
        for name, mod in peft_model.base_model.model.named_modules():
            if isinstance(mod, LoraLayer):
                r, _, s = lora_scale(config_dict, name)
                assert r == mod.r["default"] and s == pytest.approx(mod.scaling["default"])
                seen += 1
        assert seen == 14


def test_dora_adapter_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    write_random_adapter(tiny_llama, tmp_path / "ad", use_dora=True)
    with pytest.raises(UnsupportedModel, match="DoRA"):
        read_adapter(tmp_path / "ad")


# ---------------------------------------------------------------------------------------------
# The stage, on every tiny architecture
# ---------------------------------------------------------------------------------------------
def _run(tmp_path: Path, model_dir: Path, ratio: float = 0.5, **adapter_kw: object) -> Path:
    run = tmp_path / "run"
    write_svd_emulator(model_dir, run / "emulator", ratio=ratio)
    write_random_adapter(model_dir, run / "adapter", **adapter_kw)  # type: ignore[arg-type]
    return run


def test_exact_correction_per_module_all_architectures(tiny_model_dir: Path, tmp_path: Path) -> None:
    run = _run(tmp_path, tiny_model_dir, r=4, alpha=16.0, dtype=F64,
               rank_pattern={"o_proj": 2}, alpha_pattern={"down_proj": 3.0})
    before = fingerprint_adapter(run / "adapter")
    res = correct_lora(CorrectionConfig(run_dir=run, lambda_=math.inf, device="cpu"))
    assert res.adapter_dir == run / "adapter-corrected" and res.lambda_mode == "fixed"
    assert fingerprint_adapter(run / "adapter") == before  # the trained adapter is never modified
    src, out = read_adapter(run / "adapter"), read_adapter(res.adapter_dir)
    assert set(out.modules) == set(src.modules) and out.dtype == F64
    ckpt, emu = Checkpoint(tiny_model_dir), Checkpoint(run / "emulator")
    compressed = read_emulator_meta(run / "emulator")["modules"]
    assert set(compressed) == set(src.modules)
    for name, mod in src.modules.items():
        w = ckpt.get(f"{name}.weight", dtype=F64)
        w_e = emu.get(f"{name}.u.weight", dtype=F64) @ emu.get(f"{name}.v.weight", dtype=F64)
        x = _span_inputs(src.A(name))
        want = x @ (w_e + mod.scale * src.B(name) @ src.A(name)).T
        got = x @ (w + mod.scale * out.B(name) @ out.A(name)).T
        assert (got - want).abs().max() < 1e-10, name
    meta = json.loads((res.adapter_dir / CORRECTION_META).read_text())
    assert meta["lambda"] == "inf" and meta["source_adapter"]["fingerprint"] == before
    assert meta["source_adapter"]["path"] == str(run / "adapter")
    report = meta["modules"]["model.layers.0.self_attn.o_proj"]
    assert report["rank"] == 2 and report["correction_norm"] > 0 and report["damped"] is False
    cfg = json.loads((res.adapter_dir / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model_dir) and cfg["rank_pattern"] == {"o_proj": 2}


def _emulator_as_dense(model_dir: Path, emulator_dir: Path) -> torch.nn.Module:
    """The original architecture with every compressed W replaced by u v (= the emulator), fp64."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=F64).eval()
    emu = Checkpoint(emulator_dir)
    with torch.no_grad():
        for name in read_emulator_meta(emulator_dir)["modules"]:
            model.get_submodule(name).weight.copy_(emu.get(f"{name}.u.weight", dtype=F64)
                                                   @ emu.get(f"{name}.v.weight", dtype=F64))
    return model


@pytest.mark.slow
def test_full_span_logits_original_plus_corrected_equal_emulator_plus_adapter(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    """With r ≥ in for every module, span(Aᵀ) is the whole input space, so the identity holds for
    the whole network: logits(original + Λᶜ) = logits(emulator + Λ). The adapter loads with peft
    onto the original model with no missing or unexpected keys."""
    config = load_config(tiny_model_dir)
    r = int(config["intermediate_size"])
    run = _run(tmp_path, tiny_model_dir, ratio=0.3, r=r, alpha=2.0 * r, dtype=F64, b_std=0.02)
    res = correct_lora(CorrectionConfig(run_dir=run, lambda_=math.inf, device="cpu"))
    ids = torch.arange(4, 36).unsqueeze(0)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=F64).eval()
    corrected = PeftModel.from_pretrained(original, str(res.adapter_dir)).eval()
    check = corrected.load_adapter(str(res.adapter_dir), adapter_name="check")
    assert [k for k in check.missing_keys if "lora_" in k and ".check." in k] == []
    assert check.unexpected_keys == []
    corrected.set_adapter("default")
    reference = PeftModel.from_pretrained(_emulator_as_dense(tiny_model_dir, run / "emulator"),
                                          str(run / "adapter")).eval()
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=F64).eval(),
                                      str(run / "adapter")).eval()
    with torch.no_grad():
        got, want, uncorrected = corrected(ids).logits, reference(ids).logits, plain(ids).logits
    assert (uncorrected - want).abs().max() > 1e-3  # the emulator really differs
    assert (got - want).abs().max() < 1e-8


def test_lambda_zero_writes_the_trained_tensors_unchanged(tiny_llama: Path, tmp_path: Path) -> None:
    run = _run(tmp_path, tiny_llama)
    res = correct_lora(CorrectionConfig(run_dir=run, lambda_=0.0, device="cpu"))
    a, b = load_file(str(run / "adapter" / "adapter_model.safetensors")), \
        load_file(str(res.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert all(m.correction_norm == 0 for m in res.modules)


def test_finite_lambda_stage_reports_damping(tiny_llama: Path, tmp_path: Path) -> None:
    run = _run(tmp_path, tiny_llama, ratio=0.2)
    res = correct_lora(CorrectionConfig(run_dir=run, lambda_=0.5, device="cpu"))
    assert any(m.damped for m in res.modules)
    meta = json.loads((res.adapter_dir / CORRECTION_META).read_text())
    assert meta["lambda"] == 0.5
    assert sum(m["damped"] for m in meta["modules"].values()) == sum(m.damped for m in res.modules)
    for m in res.modules:  # the bound, seen from the report: the relative size stays finite
        assert math.isfinite(m.relative_size) and m.correction_norm >= 0


def test_correcting_twice_and_overwriting_are_refused(tiny_llama: Path, tmp_path: Path) -> None:
    run = _run(tmp_path, tiny_llama)
    res = correct_lora(CorrectionConfig(run_dir=run, lambda_=3.0, device="cpu"))
    with pytest.raises(RunStateError, match="already corrected"):
        correct_lora(CorrectionConfig(run_dir=run, adapter_dir=res.adapter_dir, out_dir=tmp_path / "again",
                                      lambda_=3.0, device="cpu"))
    with pytest.raises(RunStateError, match="--overwrite"):
        correct_lora(CorrectionConfig(run_dir=run, lambda_=3.0, device="cpu"))
    with pytest.raises(RunStateError, match="trained adapter itself"):
        correct_lora(CorrectionConfig(run_dir=run, out_dir=run / "adapter", lambda_=3.0, device="cpu"))
    again = correct_lora(CorrectionConfig(run_dir=run, lambda_=math.inf, device="cpu", overwrite=True))
    assert json.loads((again.adapter_dir / CORRECTION_META).read_text())["lambda"] == "inf"
    assert not any(p.name.endswith(".partial") for p in run.iterdir())


def test_cancel_leaves_no_output(tiny_llama: Path, tmp_path: Path) -> None:
    run = _run(tmp_path, tiny_llama)
    with pytest.raises(Cancelled):
        correct_lora(CorrectionConfig(run_dir=run, lambda_=3.0, device="cpu"),
                     RecordingProgress(cancel_after_updates=3))
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "emulator"]


def test_adapter_for_another_model_is_refused(tiny_cache: Path, tmp_path: Path) -> None:
    llama = next((tiny_cache / "models--emloc-test--tiny-llama" / "snapshots").iterdir())
    phi3 = next((tiny_cache / "models--emloc-test--tiny-phi3" / "snapshots").iterdir())
    run = tmp_path / "run"
    write_svd_emulator(llama, run / "emulator")
    write_random_adapter(phi3, run / "adapter")
    with pytest.raises(UnsupportedModel, match="does not fit"):
        correct_lora(CorrectionConfig(run_dir=run, lambda_=3.0, device="cpu"))


def test_auto_lambda_without_data_says_what_to_do(tiny_llama: Path, tmp_path: Path) -> None:
    run = _run(tmp_path, tiny_llama)
    with pytest.raises(ConfigError, match="--lambda"):
        correct_lora(CorrectionConfig(run_dir=run, device="cpu"))


def _examples(n: int = 6, seed: int = 0) -> tuple[Ex, ...]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 10 + 3 * i
        ids = tuple(int(t) for t in torch.randint(4, 260, (length,), generator=g))
        labels = tuple(-100 if j < 4 else t for j, t in enumerate(ids))  # prompt masked, answer scored
        out.append(Ex(ids, labels))
    return tuple(out)


def _independent_loss(model_dir: Path, adapter_dir: Path, examples: tuple[Ex, ...]) -> float:
    """Token-weighted loss via transformers' own loss, one example at a time."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(adapter_dir)).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            n = sum(1 for t in e.labels[1:] if t != -100)
            loss = model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss
            total, count = total + float(loss) * n, count + n
    return total / count


@pytest.mark.slow
def test_auto_lambda_picks_the_lowest_measured_loss(tiny_llama: Path, tmp_path: Path) -> None:
    run = _run(tmp_path, tiny_llama, ratio=0.3, b_std=0.2)
    examples = _examples()
    grid = (0.0, 0.3, math.inf)  # at b_std=0.2 most directions are damped at 0.3, none at inf
    progress = RecordingProgress()
    res = correct_lora(CorrectionConfig(run_dir=run, device="cpu", lambda_grid=grid, eval_examples=examples,
                                        eval_batch_size=4), progress)
    assert res.lambda_mode == "auto" and [lam for lam, _ in res.lambda_table] == list(grid)
    losses = dict(res.lambda_table)
    assert len(set(losses.values())) == 3  # the candidates really differ
    assert res.lambda_ == min(grid, key=lambda lam: (losses[lam], lam))
    assert progress.values("correct/eval_loss") == [losses[lam] for lam in grid]
    # the table's numbers are the held-out losses of the adapters as written
    assert losses[0.0] == pytest.approx(_independent_loss(tiny_llama, run / "adapter", examples), rel=1e-5)
    assert losses[res.lambda_] == pytest.approx(_independent_loss(tiny_llama, res.adapter_dir, examples), rel=1e-5)
    meta = json.loads((res.adapter_dir / CORRECTION_META).read_text())
    assert meta["lambda_mode"] == "auto"
    assert [row["lambda"] for row in meta["lambda_table"]] == [0.0, 0.3, "inf"]
    assert [row["eval_loss"] for row in meta["lambda_table"]] == [losses[lam] for lam in grid]
    assert res.to_dict()["lambda_table"][2]["lambda"] == "inf"


def test_config_validation() -> None:
    with pytest.raises(ConfigError):
        CorrectionConfig(run_dir=Path("x"), lambda_=-1.0)
    with pytest.raises(ConfigError):
        CorrectionConfig(run_dir=Path("x"), lambda_grid=())
    with pytest.raises(ConfigError):
        CorrectionConfig(run_dir=Path("x"), lambda_grid=(0.0, math.nan))
    with pytest.raises(ConfigError):
        CorrectionConfig(run_dir=Path("x"), device="tpu")


@pytest.mark.integration
@pytest.mark.slow
def test_corrects_the_adapter_that_training_writes(tiny_llama: Path, tmp_path: Path) -> None:
    """The trained adapter of emloc_engine.stages.training.trainer (with its extra files) is corrected and still loads."""
    from emloc_engine.data import DataConfig
    from emloc_engine.stages.training.trainer import TrainConfig, train_lora

    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(24)]
    data_path = tmp_path / "chat.jsonl"
    data_path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    run = tmp_path / "run"
    write_svd_emulator(tiny_llama, run / "emulator", ratio=0.3)
    data = DataConfig(path=data_path, max_length=64)
    train_lora(TrainConfig(run_dir=run, data=data, steps=2, rank=4, alpha=8.0, device="cpu", warmup_steps=0))
    res = correct_lora(CorrectionConfig(run_dir=run, data=data, device="cpu"))
    assert len(res.lambda_table) == 5 and res.lambda_ in dict(res.lambda_table)
    assert len(res.modules) == 14 and all(m.compressed for m in res.modules)
    assert json.loads((res.adapter_dir / CORRECTION_META).read_text())["model"]["path"] == str(tiny_llama)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(res.adapter_dir))
    check = model.load_adapter(str(res.adapter_dir), adapter_name="check")
    assert check.unexpected_keys == [] and not [k for k in check.missing_keys if ".check." in k]
