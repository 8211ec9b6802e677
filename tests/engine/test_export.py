"""merge_and_export: merged logits = original + adapter (peft) on every family, streaming shard layout,
refusals (overwrite, source folder, HF cache, tied lm_head), corrupt shards, full disk, cancel, card."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from emloc_engine.core.errors import Cancelled, ConfigError, DiskFull, MergeError
from emloc_engine.core.layout import RunLayout
from emloc_engine.core.progress import RecordingProgress
from emloc_engine.stages.export import exporter as export_mod
from emloc_engine.stages.export import merge as merge_mod
from emloc_engine.stages.export.exporter import ExportConfig, merge_and_export
from tests.engine.export_helpers import copy_model, hf_logits, make_adapter, max_diff, peft_logits
from tests.tiny_models import ARCHS, build_tiny_model


def _run_with_adapter(model_dir: Path, tmp_path: Path, **kw: Any) -> Path:
    run = tmp_path / "run"
    make_adapter(model_dir, RunLayout(run).adapter_corrected, **kw)
    return run


def _leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if "partial" in p.name or p.name in ("merged", "model.gguf"))


def test_merged_logits_equal_peft_on_every_family(tiny_model_dir: Path, tmp_path: Path) -> None:
    run = _run_with_adapter(tiny_model_dir, tmp_path)
    res = merge_and_export(ExportConfig(run_dir=run, model_dir=tiny_model_dir, formats=("merged",), verify=False))
    ref = peft_logits(tiny_model_dir, RunLayout(run).adapter_corrected)
    base = hf_logits(tiny_model_dir)
    merged = hf_logits(res.merged_dir)  # plain transformers, no peft
    assert max_diff(base, ref) > 0.1  # the adapter really changes the model
    assert max_diff(merged, ref) < 1e-4
    assert res.merged_modules == 2 * 4 if "phi3" in str(tiny_model_dir) else res.merged_modules == 2 * 7
    names = {p.name for p in res.merged_dir.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "README.md", "model.safetensors.index.json"} <= names


@pytest.mark.slow
def test_verification_reports_each_export(tiny_llama: Path, tmp_path: Path) -> None:
    run = _run_with_adapter(tiny_llama, tmp_path)
    res = merge_and_export(ExportConfig(run_dir=run, model_dir=tiny_llama, gguf_type="f16"))
    got = dict(res.verification)
    assert set(got) == {"adapter", "merged", "gguf"}
    tol = dict(res.tolerances)
    assert got["merged"] < 1e-4 and got["adapter"] < 1e-4
    assert 0 < got["gguf"] <= tol["gguf"]
    assert res.adapter_effect is not None and res.adapter_effect > 0.1
    assert res.adapter_dir == RunLayout(run).adapter_corrected
    card = (res.adapter_dir / "README.md").read_text()
    assert "emloc" in card and "PeftModel.from_pretrained" in card and "gguf" in card
    assert res.peak_rss_gib > 0
    assert json.loads((run / "export_verification.json").read_text())["verification"]


def test_bf16_sharded_source_keeps_split_and_dtype(tmp_path: Path) -> None:
    snap = build_tiny_model("llama", tmp_path / "hub", name="tiny-llama-bf16", dtype=torch.bfloat16)
    src = copy_model(snap, tmp_path / "src", max_shard_size="30KB", dtype=torch.bfloat16)
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(shards) >= 3
    run = _run_with_adapter(src, tmp_path)
    res = merge_and_export(ExportConfig(run_dir=run, model_dir=src, formats=("merged",), verify=False))
    assert res.merged_dir is not None
    assert sorted(p.name for p in res.merged_dir.glob("*.safetensors")) == shards
    src_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    out_map = json.loads((res.merged_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert out_map == src_map
    from safetensors import safe_open

    with safe_open(str(res.merged_dir / shards[0]), "pt") as fh:
        assert all(fh.get_tensor(k).dtype == torch.bfloat16 for k in fh.keys())  # noqa: SIM118
    ref = peft_logits(src, RunLayout(run).adapter_corrected)
    merged = hf_logits(res.merged_dir)
    scale = max(float(r.abs().max()) for r in ref)
    assert max_diff(merged, ref) < 3e-2 * scale  # bf16 rounding of W + ΔW


def test_refuses_to_overwrite_then_overwrites(tiny_llama: Path, tmp_path: Path) -> None:
    run = _run_with_adapter(tiny_llama, tmp_path)
    cfg = ExportConfig(run_dir=run, model_dir=tiny_llama, formats=("merged",), verify=False)
    merge_and_export(cfg)
    marker = RunLayout(run).merged / "marker.txt"
    marker.write_text("old")
    with pytest.raises(MergeError, match="already exists"):
        merge_and_export(cfg)
    assert marker.exists()
    merge_and_export(ExportConfig(run_dir=run, model_dir=tiny_llama, formats=("merged",), verify=False, overwrite=True))
    assert not marker.exists() and (RunLayout(run).merged / "config.json").exists()


def test_refuses_to_write_into_source_folder_or_hf_cache(tiny_llama: Path, tmp_path: Path,
                                                         _isolated_home: Path) -> None:
    src = copy_model(tiny_llama, tmp_path / "src")
    run = src / "run"
    make_adapter(src, RunLayout(run).adapter_corrected)
    before = sorted(p.name for p in src.iterdir())
    with pytest.raises(MergeError, match="source model folder"):
        merge_and_export(ExportConfig(run_dir=run, model_dir=src, formats=("merged",), verify=False))
    assert sorted(p.name for p in src.iterdir()) == before
    cache_run = _isolated_home / "hf" / "hub" / "run"
    make_adapter(src, RunLayout(cache_run).adapter_corrected)
    with pytest.raises(MergeError, match="Hugging Face cache"):
        merge_and_export(ExportConfig(run_dir=cache_run, model_dir=src, formats=("merged",), verify=False))


def test_truncated_source_shard_names_tensor_and_leaves_nothing(tiny_llama: Path, tmp_path: Path) -> None:
    src = copy_model(tiny_llama, tmp_path / "src")
    run = _run_with_adapter(src, tmp_path)
    shard = src / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3000])
    with pytest.raises(MergeError, match=r"(?s)Tensor '[\w.]+' in model\.safetensors is truncated"):
        merge_and_export(ExportConfig(run_dir=run, model_dir=src, formats=("merged",), verify=False))
    assert _leftovers(run) == []


def test_nan_in_adapter_aborts_before_anything_is_committed(tiny_llama: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    run = _run_with_adapter(tiny_llama, tmp_path)
    path = RunLayout(run).adapter_corrected / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in sorted(tensors) if "layers.1.mlp.down_proj.lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path))
    with pytest.raises(MergeError, match=r"(?s)model\.layers\.1\.mlp\.down_proj\.weight.*training diverged"):
        merge_and_export(ExportConfig(run_dir=run, model_dir=tiny_llama, formats=("merged",), verify=False))
    assert _leftovers(run) == []


def test_full_disk_during_merge_leaves_nothing_complete(tiny_llama: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    run = _run_with_adapter(tiny_llama, tmp_path)
    calls = {"n": 0}
    real = merge_mod._write_tensor_bytes

    def flaky(fh: Any, tensor: torch.Tensor) -> None:
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fh, tensor)

    monkeypatch.setattr(merge_mod, "_write_tensor_bytes", flaky)
    with pytest.raises(DiskFull) as info:  # a message naming the folder and the space, not a traceback
        merge_and_export(ExportConfig(run_dir=run, model_dir=tiny_llama, formats=("merged",), verify=False))
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert calls["n"] == 6
    assert str(run) in str(info.value) and "free on that disk" in str(info.value)
    assert "it needs about" in str(info.value) and "Fix:" in str(info.value)
    assert _leftovers(run) == []


def test_full_disk_during_gguf_leaves_no_gguf(tiny_llama: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from emloc_engine.stages.export import gguf_export

    run = _run_with_adapter(tiny_llama, tmp_path)

    def full(writer: Any, arr: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf_export, "_write_array", full)
    with pytest.raises(DiskFull, match="it needs about"):
        merge_and_export(ExportConfig(run_dir=run, model_dir=tiny_llama, formats=("gguf",), verify=False))
    assert not (run / "model.gguf").exists() and not (run / "model.gguf.partial").exists()


def test_cancel_leaves_no_merged_folder(tiny_llama: Path, tmp_path: Path) -> None:
    run = _run_with_adapter(tiny_llama, tmp_path)
    with pytest.raises(Cancelled):
        merge_and_export(ExportConfig(run_dir=run, model_dir=tiny_llama, formats=("merged",), verify=False),
                         RecordingProgress(cancel_after_updates=3))
    assert _leftovers(run) == []


def test_tied_lm_head_adapter_is_refused(tiny_cache: Path, tmp_path: Path) -> None:
    snap = next((tiny_cache / "models--emloc-test--tiny-gemma" / "snapshots").iterdir())
    run = _run_with_adapter(snap, tmp_path, target_modules=["q_proj", "lm_head"])
    with pytest.raises(MergeError, match="ties lm_head"):
        merge_and_export(ExportConfig(run_dir=run, model_dir=snap, formats=("merged",), verify=False))


@pytest.mark.parametrize("fmt", ["gguf", "adapter-gguf"])
def test_gguf_refused_for_unsupported_family_before_any_work(tmp_path: Path, fmt: str) -> None:
    snap = build_tiny_model("gemma3_text", tmp_path / "hub", head_dim=8, query_pre_attn_scalar=8, layer_types=["full_attention"] * 2)
    run = _run_with_adapter(snap, tmp_path)
    with pytest.raises(MergeError, match="sliding-window"):
        merge_and_export(ExportConfig(run_dir=run, model_dir=snap, formats=("merged", fmt), verify=False))
    assert _leftovers(run) == [] and not (run / "adapter.gguf").exists()


@pytest.mark.slow
def test_verification_beyond_tolerance_fails_loudly(tiny_llama: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    run = _run_with_adapter(tiny_llama, tmp_path)
    real = merge_mod.merge_weight

    def wrong(name: str, w: torch.Tensor, lm: merge_mod.LoraDelta) -> torch.Tensor:  # drops the scale
        return real(name, w, merge_mod.LoraDelta(lm.A, lm.B, 1.0))

    monkeypatch.setattr(export_mod, "merge_weight", wrong)
    with pytest.raises(MergeError, match=r"(?s)verification failed.*merged: max"):
        merge_and_export(ExportConfig(run_dir=run, model_dir=tiny_llama, formats=("merged",)))


def test_model_card_records_run_facts(tiny_llama: Path, tmp_path: Path) -> None:
    from emloc_engine.stages.export.model_card import RunFacts

    run = _run_with_adapter(tiny_llama, tmp_path, rank=4, alpha=8.0)
    corrected = run / "adapter-corrected"
    (corrected / "emloc_correction.json").write_text(json.dumps({
        "lambda": 1.0, "lambda_mode": "auto",
        "lambda_table": [{"lambda": 0.0, "eval_loss": 4.06}, {"lambda": 1.0, "eval_loss": 4.05},
                         {"lambda": "inf", "eval_loss": 4.37}]}))
    facts = RunFacts(data="/data/shakespeare.txt", ratio=0.4, steps=120, final_eval_loss=3.91)
    res = merge_and_export(ExportConfig(run_dir=run, model_dir=tiny_llama, formats=("merged",), verify=False,
                                        run_facts=facts))
    card = (res.merged_dir / "README.md").read_text()
    for text in ("base_model: emloc-test/tiny-llama", "/data/shakespeare.txt", "| 0.4 |", "| 120 |",
                 "| 1 (auto) |", "3.91", "| ∞ | 4.3700 |", "4 / 8"):
        assert text in card, text


def test_gpu_peak_spans_the_export_and_is_recorded(tiny_llama: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The export's GPU peak is measured on the verification's device around the whole export (merge and
    verification inside the block) and carried in the result; without verification no device is measured."""
    seen: list[tuple[torch.device | None, bool]] = []

    class FakePeak:
        def __init__(self, device: torch.device | None) -> None:
            self.device, self.gib = device, 0.0

        def __enter__(self) -> FakePeak:
            return self

        def __exit__(self, *exc: object) -> None:
            seen.append((self.device, (run / "export_verification.json").is_file()))
            self.gib = 1.25

    monkeypatch.setattr(export_mod, "GpuPeak", FakePeak)
    run = _run_with_adapter(tiny_llama, tmp_path)
    res = merge_and_export(ExportConfig(run_dir=run, model_dir=tiny_llama, formats=("merged",), device="cpu"))
    assert seen == [(torch.device("cpu"), True)]  # read after the verification, on its device
    assert res.peak_vram_gib == 1.25 and res.to_dict()["peak_vram_gib"] == 1.25
    assert 0 < res.peak_anon_rss_gib <= res.peak_rss_gib and "peak_anon_rss_gib" in res.to_dict()
    assert "peak GPU 1.25 GiB" in export_mod.export_summary(res)
    res = merge_and_export(ExportConfig(run_dir=run, model_dir=tiny_llama, formats=("merged",), verify=False,
                                        overwrite=True))
    assert seen[-1][0] is None and res.peak_vram_gib == 1.25


def test_model_card_without_manifest(tiny_llama: Path, tmp_path: Path) -> None:
    run = _run_with_adapter(tiny_llama, tmp_path)
    res = merge_and_export(ExportConfig(run_dir=run, model_dir=tiny_llama, formats=("merged",), verify=False))
    assert "not recorded" in (res.merged_dir / "README.md").read_text()


def test_missing_adapter_and_bad_settings(tiny_llama: Path, tmp_path: Path) -> None:
    from emloc_engine.core.errors import ModelNotFound

    with pytest.raises(ModelNotFound, match="No adapter"):
        merge_and_export(ExportConfig(tmp_path / "empty_run", tiny_llama, formats=("merged",)))
    with pytest.raises(ConfigError, match="formats"):
        ExportConfig(run_dir=tmp_path, model_dir=tiny_llama, formats=("onnx",))
    with pytest.raises(ConfigError, match="gguf_type"):
        ExportConfig(run_dir=tmp_path, model_dir=tiny_llama, gguf_type="q4_k")


def test_bf16_export_is_verified_against_its_rounding_floor(tmp_path: Path) -> None:
    """A bf16 merge cannot reproduce original + adapter better than bf16 rounding of W + ΔW; the
    verification measures that floor with peft's own merge and accepts the export against it, and
    a merge that lost the adapter is still refused."""
    snap = build_tiny_model("llama", tmp_path / "hub", name="tiny-llama-bf16v", dtype=torch.bfloat16)
    run = _run_with_adapter(snap, tmp_path)
    res = merge_and_export(ExportConfig(run_dir=run, model_dir=snap, formats=("merged", "adapter")))
    record = json.loads((run / "export_verification.json").read_text())
    floor = record["reduced_precision_floor"]
    assert floor > 0  # bf16 rounding of the merged weights is visible in the logits
    diffs = dict(res.verification)
    tols = dict(res.tolerances)
    assert diffs["merged"] <= tols["merged"] and tols["merged"] <= max(tols["merged"], 1.5 * floor)
    assert record["adapter_effect"] > 3 * tols["merged"]  # the check would notice a merge without adapter


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "weight_std"), [*((a, 0.2) for a in ARCHS),
                                                  *((a, 0.8) for a in ("llama", "qwen2", "mistral"))])
def test_default_export_passes_on_every_fp32_family(arch: str, weight_std: float, tmp_path: Path) -> None:
    """The default export (merged, adapter, f16 GGUF where the family has one) of fp32 models verifies.

    f16 rounding moves the logits of sharper models (larger weights) past a tolerance relative to the
    largest logit alone (0.2 vs 0.19 on the sharp Qwen2); the GGUF is held to its measured rounding
    floor instead, which a faithful file meets exactly and an export without the adapter does not.
    """
    from emloc_engine.stages.export.gguf_export import gguf_support_problem
    from emloc_engine.weights.headers import load_config

    snap = build_tiny_model(arch, tmp_path / "hub", weight_std=weight_std)  # saved in fp32
    run = _run_with_adapter(snap, tmp_path)
    gguf = gguf_support_problem(load_config(snap)) is None
    res = merge_and_export(ExportConfig(run, snap) if gguf else ExportConfig(run, snap, formats=("merged", "adapter")))
    diffs, tols = dict(res.verification), dict(res.tolerances)
    assert set(diffs) == ({"merged", "adapter", "gguf"} if gguf else {"merged", "adapter"})
    assert all(diffs[k] <= tols[k] for k in diffs) and diffs["merged"] < 1e-3
    if gguf:
        floor = json.loads((run / "export_verification.json").read_text())["gguf_rounding_floor"]
        assert floor > 0 and diffs["gguf"] == pytest.approx(floor, rel=0.05)  # the file is f16 rounding, no more
        assert res.adapter_effect is not None and tols["gguf"] < res.adapter_effect / 3
