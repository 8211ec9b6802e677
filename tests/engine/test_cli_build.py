"""``emloc build`` end to end on a tiny model: from a JSONL chat dataset and from pre-tokenized ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from emloc_engine.cli.main import build_parser, main
from emloc_engine.weights.lowrank import load_emulator, read_emulator_meta


def _chat_jsonl(path: Path, n: int = 24) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"{i}+{i}?"},
                          {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_build_from_dataset(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _chat_jsonl(tmp_path / "chat.jsonl")
    run_dir = tmp_path / "run"
    code = main(["build", str(tiny_llama), str(data), "--out", str(run_dir), "--ratio", "0.4", "--calib", "6",
                 "--max-length", "64", "--device", "cpu", "--dense", "*.1.mlp.down_proj", "*.0.self_attn.k_proj"])
    assert code == 0
    out = capsys.readouterr().out
    assert "Emulator:" in out and "modules compressed" in out
    meta = read_emulator_meta(run_dir / "emulator")
    assert meta["calibration"]["samples"] == 6
    assert meta["calibration"]["tokens"] == 6 * 64
    assert meta["ratio"] == 0.4
    assert {"model.layers.1.mlp.down_proj", "model.layers.0.self_attn.k_proj"} <= set(meta["dense_modules"])
    assert len(meta["modules"]) == 14 - 2
    emu = load_emulator(run_dir / "emulator")
    with torch.no_grad():
        assert torch.isfinite(emu(torch.tensor([[5, 6, 7, 8]])).logits).all()
    # Same command again: the complete emulator is reused, nothing rebuilt.
    assert main(["build", str(tiny_llama), str(data), "--out", str(run_dir), "--ratio", "0.4", "--calib", "6",
                 "--max-length", "64", "--device", "cpu", "--dense", "*.1.mlp.down_proj",
                 "*.0.self_attn.k_proj"]) == 0
    assert "reused blocks [0, 1]" in capsys.readouterr().out


def _calib_file(tmp_path: Path) -> Path:
    """4 samples × 30 token ids as the JSON file `--calib-file` takes."""
    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps([[(7 * i + j) % 250 + 4 for j in range(30)] for i in range(4)]))
    return calib


@pytest.mark.slow
def test_build_from_token_file_and_errors(tiny_llama: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    calib = _calib_file(tmp_path)
    run_dir = tmp_path / "run"
    assert main(["build", str(tiny_llama), "--calib-file", str(calib), "--out", str(run_dir), "--ratio", "0.3",
                 "--ratio-override", "*.mlp.*=0.6", "--device", "cpu"]) == 0
    meta = read_emulator_meta(run_dir / "emulator")
    assert meta["calibration"]["tokens"] == 120
    assert meta["modules"]["model.layers.0.mlp.up_proj"]["ratio"] == 0.6
    assert meta["modules"]["model.layers.0.self_attn.q_proj"]["ratio"] == 0.3
    # Other settings on a complete emulator: a clear error (exit 2) until --overwrite.
    assert main(["build", str(tiny_llama), "--calib-file", str(calib), "--out", str(run_dir), "--ratio", "0.5",
                 "--device", "cpu"]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert main(["build", str(tiny_llama), "--calib-file", str(calib), "--out", str(run_dir), "--ratio", "1.0",
                 "--device", "cpu"]) == 2
    assert "ratio must be in (0, 1)" in capsys.readouterr().err
    assert main(["build", str(tiny_llama), "--out", str(run_dir), "--device", "cpu"]) == 2
    assert "needs DATA" in capsys.readouterr().err


def test_parser_options() -> None:
    from emloc_engine.run.options import apply_values, top_value, typed_values
    from emloc_engine.stages.emulator.options import EmulatorOptions

    values = typed_values(build_parser().parse_args(["build", "m", "d", "--out", "r", "--dense", "a", "b",
                                                     "--ratio-override", "x.*=0.7", "--solver", "randomized",
                                                     "--budget-gib", "8"]))
    options = apply_values(EmulatorOptions(), "emulator", values)
    assert options.dense_patterns == ("a", "b")
    assert options.ratio_overrides == (("x.*", 0.7),)
    assert options.solver == "randomized" and top_value(values, "budget_bytes", None) == 8 * 2**30


def test_build_with_spectral_allocation(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    calib = _calib_file(tmp_path)
    run_dir = tmp_path / "run"
    assert main(["build", str(tiny_llama), "--calib-file", str(calib), "--out", str(run_dir), "--ratio", "0.5",
                 "--allocation", "spectral", "--device", "cpu"]) == 0
    meta = read_emulator_meta(run_dir / "emulator")
    assert meta["allocation"] == "spectral"
    assert meta["spectral_allocation"]["params_spent"] <= meta["spectral_allocation"]["budget"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["build", "m", "--out", "r", "--allocation", "greedy"])
