"""No model folder's code ever runs: a folder that needs its ``auto_map`` code is refused before anything
loads (CLI, catalog, resolve, tokenizer, config), every transformers load passes ``trust_remote_code=False``,
and exports never carry ``*.py`` files or ``auto_map``."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import emloc_engine
from emloc_engine.catalog.discovery import inspect_model_dir
from emloc_engine.catalog.resolve import resolve_model
from emloc_engine.core.errors import UntrustedCode
from emloc_engine.core.layout import RunLayout
from emloc_engine.data import load_tokenizer
from emloc_engine.stages.export.exporter import ExportConfig, merge_and_export
from emloc_engine.weights.headers import load_config
from tests.engine.export_helpers import make_adapter

REPO_ROOT = Path(emloc_engine.__file__).resolve().parents[1]
EVIL_CODE = """from pathlib import Path
Path({marker!r}).write_text("the model folder's code ran")
from transformers import PretrainedConfig


class EvilConfig(PretrainedConfig):
    model_type = {model_type!r}
"""


def _folder_with_code(src: Path, dst: Path, marker: Path, model_type: str) -> Path:
    """A copy of a tiny model whose config.json maps AutoConfig/AutoModel to the folder's own .py files,
    which write ``marker`` the moment they are imported."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (dst / "config.json").write_text(json.dumps(config))
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (dst / name).write_text(EVIL_CODE.format(marker=str(marker), model_type=model_type))
    return dst


@pytest.fixture
def evil(tiny_llama: Path, tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "MARKER"
    return _folder_with_code(tiny_llama, tmp_path / "evil-model", marker, "evil"), marker


@pytest.mark.parametrize("command", ["data", "plan"])
def test_cli_never_runs_a_model_folders_code_even_when_stdin_says_yes(
        evil: tuple[Path, Path], tmp_path: Path, command: str) -> None:
    """`yes y | emloc data good.jsonl --model FOLDER` used to import the folder's configuration_*.py."""
    folder, marker = evil
    data = tmp_path / "good.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello"}]}) + "\n")
    argv = ["data", str(data), "--model", str(folder)] if command == "data" else ["plan", str(folder)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "emloc_engine", *argv], input="y\n" * 10, capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=300)
    assert not marker.exists(), out.stderr
    assert out.returncode == 2, out.stdout + out.stderr
    assert str(folder) in out.stderr and "never runs code from a model folder" in out.stderr
    assert "auto_map" in out.stderr and "Fix:" in out.stderr
    assert "Traceback" not in out.stderr and "[y/N]" not in out.stdout + out.stderr  # no prompt, no crash


def test_catalog_resolve_tokenizer_and_config_refuse_it_before_loading(evil: tuple[Path, Path]) -> None:
    folder, marker = evil
    (info,) = inspect_model_dir(folder)
    assert not info.supported and info.problem is not None and "own Python code" in info.problem
    with pytest.raises(UntrustedCode, match="never runs code") as exc:
        resolve_model(folder)
    assert str(folder) in str(exc.value)
    for load in (load_tokenizer, load_config):
        with pytest.raises(UntrustedCode):
            load(folder)
    assert not marker.exists()


def test_a_supported_family_with_auto_map_loads_builtin_code_and_exports_none(
        tiny_llama: Path, tmp_path: Path) -> None:
    """Phi-3's official checkpoints carry auto_map for a family transformers implements: usable, but its
    code is never imported, and the merged export carries neither the .py files nor auto_map."""
    marker = tmp_path / "MARKER"
    folder = _folder_with_code(tiny_llama, tmp_path / "llama-with-code", marker, "llama")
    assert inspect_model_dir(folder)[0].supported and resolve_model(folder) == folder
    run = tmp_path / "run"
    make_adapter(tiny_llama, RunLayout(run).adapter_corrected)
    res = merge_and_export(ExportConfig(run, folder, formats=("merged",)))  # verify loads it back
    assert res.merged_dir is not None
    assert not list(res.merged_dir.glob("*.py"))
    assert "auto_map" not in json.loads((res.merged_dir / "config.json").read_text())
    assert not marker.exists()


def _loads_without_trust_false(source: str, where: str) -> list[str]:
    """``Auto*.from_pretrained/from_config`` calls in ``source`` without ``trust_remote_code=False``."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("from_pretrained", "from_config")):
            continue
        owner = node.func.value
        name = owner.id if isinstance(owner, ast.Name) else ""
        if not name.startswith("Auto"):  # PeftModel.from_pretrained reads an adapter, not model code
            continue
        value = {k.arg: k.value for k in node.keywords}.get("trust_remote_code")
        if not (isinstance(value, ast.Constant) and value.value is False):
            bad.append(f"{where}:{node.lineno}: {name}.{node.func.attr}")
    return bad


def test_every_transformers_load_passes_trust_remote_code_false() -> None:
    """Without it, transformers asks on stdin (and runs the code on "y"); with False it never asks."""
    assert _loads_without_trust_false("AutoTokenizer.from_pretrained(d, local_files_only=True)", "x") == ["x:1: AutoTokenizer.from_pretrained"]
    files = [*sorted((REPO_ROOT / "emloc_engine").rglob("*.py")), REPO_ROOT / "emloc_app" / "generation.py"]
    bad = [b for f in files for b in _loads_without_trust_false(f.read_text(encoding="utf-8"),
                                                               str(f.relative_to(REPO_ROOT)))]
    assert bad == []
