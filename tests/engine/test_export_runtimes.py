"""Exports for the runtimes people chat with: adapter.gguf, 4/5-bit and K-quant GGUFs, the Ollama Modelfile
and command, LM Studio's folder. Every written GGUF is read back and verified against original + adapter
through peft by the exporter's own verification."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from emloc_engine.core.errors import MergeError, MissingTool
from emloc_engine.core.layout import RunLayout
from emloc_engine.stages.export.exporter import ExportConfig, export_summary, merge_and_export
from emloc_engine.stages.export.modelfile import chat_settings, parse_modelfile
from tests.engine.export_helpers import make_adapter


def _run_with_adapter(model_dir: Path, tmp_path: Path, **kw: Any) -> Path:
    run = tmp_path / "run"
    make_adapter(model_dir, RunLayout(run).adapter_corrected, **kw)
    return run


def _fake_program(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return p


def _snap(cache: Path, arch: str) -> Path:
    return next((cache / f"models--emloc-test--tiny-{arch}" / "snapshots").iterdir())


@pytest.mark.parametrize(("arch", "gguf_type"), [("llama", "q4_0"), ("gemma", "q5_1"), ("phi3", "q4_1")])
def test_quantized_gguf_and_adapter_gguf_are_verified(tiny_cache: Path, tmp_path: Path, arch: str,
                                                      gguf_type: str) -> None:
    snap = _snap(tiny_cache, arch)
    run = _run_with_adapter(snap, tmp_path)
    res = merge_and_export(ExportConfig(run_dir=run, model_dir=snap, gguf_type=gguf_type,
                                        formats=("gguf", "adapter-gguf")))
    got, tol = dict(res.verification), dict(res.tolerances)
    assert set(got) == {"merged", "gguf", "adapter-gguf"}
    assert got["adapter-gguf"] < 1e-3 * max(1.0, res.adapter_effect or 0)  # f32 factors: exact up to summation
    assert 0 < got["gguf"] <= tol["gguf"]
    assert res.adapter_gguf_path == run / "adapter.gguf" and res.gguf_path == run / "model.gguf"
    assert "adapter-gguf" in export_summary(res)


def test_ollama_from_a_merged_gguf_with_a_fake_ollama(tiny_llama: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = tmp_path / "bin"
    _fake_program(bindir, "ollama", "exit 0")
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    run = _run_with_adapter(tiny_llama, tmp_path)
    res = merge_and_export(ExportConfig(run_dir=run, model_dir=tiny_llama, formats=("ollama",), verify=False,
                                        ollama_name="My Tiny"))
    assert res.modelfile_path == run / "Modelfile" and res.gguf_path == run / "model.gguf"
    assert res.ollama_command == ("ollama", "create", "my-tiny", "-f", str(run / "Modelfile"))
    assert f"Add it to Ollama: ollama create my-tiny -f {run / 'Modelfile'}" in export_summary(res)
    parsed = parse_modelfile(res.modelfile_path.read_text())
    instr = dict(parsed)
    assert (run / instr["FROM"]).resolve() == res.gguf_path.resolve() and "ADAPTER" not in instr
    assert "<|im_start|>{{ .Role }}" in instr["TEMPLATE"]  # the tiny models' ChatML template, as Go
    stops = [a.split(" ", 1)[1] for i, a in parsed if i == "PARAMETER" and a.startswith("stop ")]
    assert stops == ["<|im_start|>", "<|im_end|>"]


def test_ollama_from_the_users_gguf_uses_base_plus_adapter(tiny_llama: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that started from a GGUF: FROM that file (absolute, read-only), ADAPTER ./adapter.gguf; no
    ollama on PATH: no command, the summary says how."""
    from emloc_engine.stages.export.gguf_export import GgufConfig, export_gguf
    from tests.engine.export_helpers import copy_model

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    user_gguf = tmp_path / "lmstudio" / "base.gguf"
    user_gguf.parent.mkdir()
    export_gguf(GgufConfig(tiny_llama, user_gguf, "q8_0"))
    imported = copy_model(tiny_llama, tmp_path / "imported")
    (imported / "emloc_import.json").write_text(json.dumps({"source": str(user_gguf)}))
    run = _run_with_adapter(imported, tmp_path)
    res = merge_and_export(ExportConfig(run_dir=run, model_dir=imported, formats=("ollama",)))
    assert res.ollama_command is None and res.gguf_path is None
    assert dict(res.verification)["adapter-gguf"] < 1e-3
    instr = dict(parse_modelfile(res.modelfile_path.read_text()))
    assert Path(instr["FROM"]) == user_gguf.resolve() and (run / instr["ADAPTER"]).resolve() == res.adapter_gguf_path
    assert all(Path(p).is_file() for p in (instr["FROM"], run / instr["ADAPTER"]))
    assert "ollama create" in export_summary(res) and "not found" in export_summary(res)


def test_lmstudio_gets_a_link_only_on_request(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "lms"
    monkeypatch.setenv("LMSTUDIO_MODELS_DIR", str(models))
    run = _run_with_adapter(tiny_llama, tmp_path)
    merge_and_export(ExportConfig(run_dir=run, model_dir=tiny_llama, formats=("gguf",), verify=False))
    assert not models.exists()
    res = merge_and_export(ExportConfig(run_dir=run, model_dir=tiny_llama, formats=("lmstudio",), verify=False,
                                        overwrite=True, gguf_type="q8_0"))
    name = "tiny-llama-emloc"
    assert res.lmstudio_path is not None and res.lmstudio_path.parent.parent == models / "emloc"
    assert res.lmstudio_path.name.endswith("-Q8_0.gguf") and name in res.lmstudio_path.name
    assert res.lmstudio_path.read_bytes() == res.gguf_path.read_bytes()  # type: ignore[union-attr]
    with pytest.raises(MergeError, match="already exists"):
        from emloc_engine.stages.export.lmstudio import install_in_lmstudio

        install_in_lmstudio(res.gguf_path, res.lmstudio_path.parent.name, "q8_0")  # type: ignore[arg-type]


def test_k_quant_without_llama_quantize_names_type_and_fix(tiny_llama: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("EMLOC_LLAMA_QUANTIZE", raising=False)
    run = _run_with_adapter(tiny_llama, tmp_path)
    with pytest.raises(MissingTool, match="q4_k_m") as err:
        merge_and_export(ExportConfig(run_dir=run, model_dir=tiny_llama, formats=("gguf",), gguf_type="q4_k_m"))
    assert "llama-quantize" in err.value.hint and "q4_0" in err.value.hint
    assert not (run / "merged").exists()  # refused before any work


def test_k_quant_runs_llama_quantize_with_the_exact_arguments(tiny_llama: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake llama-quantize records its arguments and copies the F16 file (so verification still reads a file)."""
    log = tmp_path / "args.txt"
    _fake_program(tmp_path / "bin", "llama-quantize", f'echo "$@" > {log}\ncp "$1" "$2"')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    run = _run_with_adapter(tiny_llama, tmp_path)
    res = merge_and_export(ExportConfig(run_dir=run, model_dir=tiny_llama, formats=("gguf",), gguf_type="q4_k_m"))
    src, dst, qtype = log.read_text().split()
    assert qtype == "Q4_K_M" and dst == str(run / "model.gguf.partial") and src.endswith(".partial.f16")
    assert not Path(src).exists() and res.gguf_path is not None and res.gguf_path.is_file()


def test_chat_settings_recognise_the_common_families(tmp_path: Path) -> None:
    cases = {"<|start_header_id|>": ("llama3", "<|eot_id|>"), "<start_of_turn>": ("gemma", "<end_of_turn>"),
             "[INST]": ("mistral", "[/INST]"), "<|user|>...<|end|>": ("phi3", "<|end|>")}
    for marker, (family, stop) in cases.items():
        d = tmp_path / family
        d.mkdir()
        (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": f"{{{{ x }}}}{marker}", "eos_token": "</s>"}))
        (d / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.9}))
        s = chat_settings(d)
        assert s.family == family and stop in s.stops and "</s>" in s.stops
        assert dict(s.parameters) == {"temperature": 0.6, "top_p": 0.9}
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert chat_settings(odd).template is None


def test_run_validation_refuses_what_cannot_be_exported_before_training(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from emloc_engine.core.errors import UnsupportedModel
    from emloc_engine.data.config import DataConfig
    from emloc_engine.run.config import RunConfig
    from emloc_engine.run.plan import checked_exports
    from emloc_engine.stages.export.options import ExportOptions
    from tests.tiny_models import build_tiny_model

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    gemma3 = build_tiny_model("gemma3_text", tmp_path / "hub", head_dim=8, query_pre_attn_scalar=8,
                              layer_types=["full_attention"] * 2)  # not llama.cpp's fixed pattern
    llama = build_tiny_model("llama", tmp_path / "hub")

    def cfg(model: Path, **kw: Any) -> RunConfig:
        return RunConfig(model_dir=model, data=DataConfig(path=tmp_path / "d.jsonl"), run_dir=tmp_path / "run",
                         export=ExportOptions(**kw))

    formats, notes = checked_exports(cfg(gemma3))  # the defaults: GGUF dropped with a note
    assert formats == ("merged", "adapter") and "sliding-window" in notes[0]
    for fmts in (("adapter-gguf",), ("merged", "ollama"), ("gguf",)):
        with pytest.raises(UnsupportedModel, match="sliding-window"):
            checked_exports(cfg(gemma3, formats=fmts))
    with pytest.raises(MissingTool, match="q5_k_m"):
        checked_exports(cfg(llama, gguf_type="q5_k_m"))
    assert checked_exports(cfg(llama, formats=("ollama", "adapter-gguf"), gguf_type="q4_0")) == (
        ("ollama", "adapter-gguf"), ())


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_gemma2_and_3_export_and_verify(tmp_path: Path, arch: str) -> None:
    """Gemma 2/3 (norms as 1 + w, post-norms, q/k norms): merged q8_0 GGUF and adapter.gguf verified."""
    from tests.tiny_models import build_tiny_model

    snap = build_tiny_model(arch, tmp_path / "hub", head_dim=8, query_pre_attn_scalar=8, tie_word_embeddings=True)
    run = _run_with_adapter(snap, tmp_path)
    res = merge_and_export(ExportConfig(run_dir=run, model_dir=snap, gguf_type="q8_0", formats=("gguf", "adapter-gguf")))
    got, tol = dict(res.verification), dict(res.tolerances)
    assert got["adapter-gguf"] < 1e-3 * max(1.0, res.adapter_effect or 0) and 0 < got["gguf"] <= tol["gguf"]


@pytest.mark.parametrize("head_dim", [8, 128])
def test_qwen3_gguf_is_verified_whatever_its_head_dim(tmp_path: Path, head_dim: int) -> None:
    """transformers reads Qwen3 GGUFs with head_dim 128 only; other widths are read back by the exporter."""
    from tests.tiny_models import build_tiny_model

    snap = build_tiny_model("qwen3", tmp_path / "hub", head_dim=head_dim)
    run = _run_with_adapter(snap, tmp_path)
    res = merge_and_export(ExportConfig(run_dir=run, model_dir=snap, gguf_type="f32", formats=("gguf",)))
    assert dict(res.verification)["gguf"] < 1e-3


def test_chat_settings_of_a_gguf_file_come_from_its_metadata(tiny_llama: Path, tmp_path: Path) -> None:
    from emloc_engine.stages.export.gguf_export import GgufConfig, export_gguf
    from emloc_engine.stages.export.modelfile import base_gguf_of

    out = tmp_path / "m.gguf"
    export_gguf(GgufConfig(tiny_llama, out, "q8_0"))
    s = chat_settings(out)
    assert s.family == "chatml" and s.stops == ("<|im_start|>", "<|im_end|>") and s.parameters == ()
    assert base_gguf_of(out) == out and base_gguf_of(tiny_llama) is None


def test_ollama_from_a_gguf_model_view_names_the_users_file(tiny_llama: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A run trained in place from a GGUF (its model view, no weights): the Modelfile's FROM is the user's file
    and the adapter.gguf verified against it."""
    from emloc_engine.catalog.gguf_import import make_gguf_view
    from tests.gguf_files import write_gguf

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    user_gguf = tmp_path / "ollama-blobs" / "base.gguf"
    user_gguf.parent.mkdir()
    write_gguf(tiny_llama, user_gguf, "Q8_0")
    view = make_gguf_view(user_gguf, tmp_path / "view")
    assert not list(view.glob("*.safetensors"))  # a view holds no weights
    run = _run_with_adapter(tiny_llama, tmp_path)  # the same module names as the view's model
    res = merge_and_export(ExportConfig(run_dir=run, model_dir=view, formats=("ollama",)))
    instr = dict(parse_modelfile(res.modelfile_path.read_text()))
    assert Path(instr["FROM"]) == user_gguf.resolve() and dict(res.verification)["adapter-gguf"] < 1e-3
    assert sorted(p.name for p in user_gguf.parent.iterdir()) == ["base.gguf"]  # nothing written beside it


def test_adapter_gguf_is_checked_when_the_original_is_streamed(tiny_llama: Path, tmp_path: Path) -> None:
    """A base that does not fit is never loaded whole: adapter.gguf is read back tensor by tensor instead."""
    run = _run_with_adapter(tiny_llama, tmp_path)
    res = merge_and_export(ExportConfig(run_dir=run, model_dir=tiny_llama, formats=("adapter-gguf",),
                                        stream_original=True))
    checks = dict(res.verification)
    assert checks["adapter-gguf"] == 0.0  # F32 tensors: exactly the corrected adapter's
    assert res.adapter_gguf_path is not None and res.adapter_gguf_path.is_file()
