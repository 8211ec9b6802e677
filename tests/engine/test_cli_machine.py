"""``emloc gpu``, ``emloc models`` and ``emloc plan`` from the command line (JSON output parses)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emloc_engine.cli.main import main


def _json(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 0) -> dict:  # type: ignore[type-arg]
    assert main(argv) == code
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_gpu_json(capsys: pytest.CaptureFixture[str]) -> None:
    out = _json(capsys, ["gpu", "--json"])
    assert out["backend"] in ("cuda", "rocm", "mps", "cpu")
    assert out["cpu_cores"] >= 1 and out["ram_total_bytes"] > 0
    assert (out["backend"] == "cpu") == (out["gpus"] == [])
    assert main(["gpu"]) == 0
    assert "Backend:" in capsys.readouterr().out


def test_models_json_add_and_remove(capsys: pytest.CaptureFixture[str], tiny_cache: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMSTUDIO_MODELS_DIR", str(tmp_path / "none"))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "none"))
    out = _json(capsys, ["models", "--json", "--cache-dir", str(tiny_cache)])
    assert len(out["models"]) == 5 and all(m["supported"] for m in out["models"])
    folder = tmp_path / "extra"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    out = _json(capsys, ["models", "--json", "--cache-dir", str(tiny_cache), "--add", str(folder)])
    extra = [m for m in out["models"] if m["source"] == "folder"]
    assert len(extra) == 1 and not extra[0]["supported"] and extra[0]["problem"]
    out = _json(capsys, ["models", "--json", "--cache-dir", str(tiny_cache), "--remove", str(folder)])
    assert not [m for m in out["models"] if m["source"] == "folder"]
    assert main(["models", "--cache-dir", str(tiny_cache)]) == 0
    assert "emloc-test/tiny-llama" in capsys.readouterr().out


def test_plan_reference_model_json(capsys: pytest.CaptureFixture[str]) -> None:
    out = _json(capsys, ["plan", "Llama-3-8B", "--gpu-gib", "24", "--context", "1024", "--json"])
    assert out["fits"] and 0 < out["ratio"] < 1
    names = [s["name"] for s in out["stages"]]
    assert names == ["emulator", "train", "correct", "export"]
    train = out["stages"][1]
    assert train["peak_bytes"] <= out["limit_bytes"] and train["parts"]
    assert out["full_lora"]["peak_bytes"] > out["inference"]["peak_bytes"]


def test_plan_table_and_impossible_budget(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "Llama-3-8B", "--gpu-gib", "24", "--budget-gib", "3"]) == 3
    text = capsys.readouterr().out
    assert "Nothing fits" in text and "Chosen ρ: none" in text


def test_plan_model_folder(capsys: pytest.CaptureFixture[str], tiny_llama: Path) -> None:
    out = _json(capsys, ["plan", str(tiny_llama), "--gpu-gib", "8", "--budget-gib", "4", "--ratio", "0.5", "--json"])
    assert out["fits"] and out["ratio"] == 0.5 and out["model"] == tiny_llama.name
