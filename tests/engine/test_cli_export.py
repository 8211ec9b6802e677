"""``emloc export`` end to end on the tiny Llama: every format, manifest record, refusals, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emloc_engine.cli.main import main
from emloc_engine.core.layout import RunLayout
from emloc_engine.run.manifest import InputRecord, Manifest, write_manifest
from tests.engine.export_helpers import hf_logits, make_adapter, max_diff, peft_logits


@pytest.mark.slow
def test_cli_export_end_to_end(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    make_adapter(tiny_llama, RunLayout(run).adapter_corrected)
    write_manifest(Manifest(root=run, inputs={"model": InputRecord(str(tiny_llama), "fp")}))  # --model defaults to it
    code = main(["export", str(run), "--formats", "merged,adapter,gguf", "--gguf-type", "q8_0"])
    cap = capsys.readouterr()
    out = cap.out
    assert code == 0, cap.out + cap.err
    assert "verified merged" in out and "verified gguf" in out and "verified adapter" in out
    assert (run / "merged" / "config.json").exists() and (run / "model.gguf").exists()
    stage = json.loads((run / "manifest.json").read_text())["stages"]["export"]
    assert stage["status"] == "done"
    assert set(stage["result"]["paths"]) == {"merged_dir", "adapter_dir", "gguf_path"}
    assert {n for n, _ in stage["result"]["verification"]} == {"merged", "adapter", "gguf"}
    assert max_diff(hf_logits(run / "merged"), peft_logits(tiny_llama, RunLayout(run).adapter_corrected)) < 1e-4
    # a second export into the same run is refused (exit 2, message names the folder) ...
    assert main(["export", str(run), "--formats", "merged", "--no-verify"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert json.loads((run / "manifest.json").read_text())["stages"]["export"]["status"] == "failed"
    # ... unless --overwrite
    assert main(["export", str(run), "--model", str(tiny_llama), "--formats", "merged", "--no-verify",
                 "--overwrite"]) == 0


def test_cli_export_errors(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    make_adapter(tiny_llama, tmp_path / "elsewhere")
    assert main(["export", str(run), "--no-verify"]) == 2
    assert "--model" in capsys.readouterr().err  # no recorded model
    assert main(["export", str(run), "--model", str(tiny_llama), "--formats", "merged,onnx"]) == 2
    assert "formats" in capsys.readouterr().err
    assert main(["export", str(run), "--model", str(tiny_llama), "--formats", "merged", "--no-verify"]) == 2
    assert "No adapter" in capsys.readouterr().err
    # an adapter from outside the run is copied into RUN_DIR/adapter-export with a card
    assert main(["export", str(run), "--model", str(tiny_llama), "--adapter", str(tmp_path / "elsewhere"),
                 "--formats", "adapter", "--no-verify"]) == 0
    assert (run / "adapter-export" / "adapter_model.safetensors").exists()
    assert "emloc" in (run / "adapter-export" / "README.md").read_text()


def test_cli_offers_the_exact_ollama_command_and_never_runs_it(tiny_llama: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import stat

    bindir, ran = tmp_path / "bin", tmp_path / "ollama-ran"
    bindir.mkdir()
    fake = bindir / "ollama"
    fake.write_text(f"#!/bin/sh\ntouch {ran}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    run = tmp_path / "run"
    make_adapter(tiny_llama, RunLayout(run).adapter_corrected)
    code = main(["export", str(run), "--model", str(tiny_llama), "--formats", "ollama", "--no-verify",
                 "--ollama-name", "tiny-chat"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"Add it to Ollama: ollama create tiny-chat -f {run / 'Modelfile'}" in out.splitlines()
    assert (run / "Modelfile").is_file() and (run / "model.gguf").is_file() and not ran.exists()
    stage = json.loads((run / "manifest.json").read_text())["stages"]["export"]
    assert stage["result"]["ollama_command"] == ["ollama", "create", "tiny-chat", "-f", str(run / "Modelfile")]


def test_unknown_export_formats_and_a_missing_run_folder_are_named_with_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from emloc_engine.core.errors import ConfigError
    from emloc_engine.stages.export.options import ExportOptions

    with pytest.raises(ConfigError) as err:
        ExportOptions(formats=("merged", "ggu", "onnx"))
    assert err.value.problems == [
        "unknown export format 'ggu' (--export): the formats are merged, adapter, gguf, adapter-gguf, ollama, "
        "lmstudio; did you mean 'gguf'?",
        "unknown export format 'onnx' (--export): the formats are merged, adapter, gguf, adapter-gguf, ollama, "
        "lmstudio",
    ]
    assert "--export merged,adapter,gguf" in err.value.hint
    assert main(["export", str(tmp_path / "no-such-run"), "--no-verify"]) == 2
    text = capsys.readouterr().err
    assert f"There is no run folder at {tmp_path / 'no-such-run'}" in text and "emloc run --out" in text
