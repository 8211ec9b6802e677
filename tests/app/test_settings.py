"""The app's remembered choices survive a restart (a second ``Settings`` on the same file) and unset stays unset."""

from __future__ import annotations

from pathlib import Path

from emloc_app.settings import Settings


def test_remembered_paths_survive_a_restart_and_none_stays_none(tmp_path: Path) -> None:
    first = Settings(tmp_path / "s.ini")
    assert first.last_model is None and first.last_config_dir is None and first.last_data is None
    first.last_model = tmp_path / "unet" / "flux1-dev.safetensors"
    first.last_config_dir = tmp_path / "FLUX.1-dev"
    first.last_data = tmp_path / "chat.jsonl"
    first.sync()
    again = Settings(tmp_path / "s.ini")
    assert again.last_model == tmp_path / "unet" / "flux1-dev.safetensors"
    assert again.last_config_dir == tmp_path / "FLUX.1-dev" and again.last_data == tmp_path / "chat.jsonl"
    again.last_config_dir = None  # a folder model: no pipeline folder
    again.sync()
    assert Settings(tmp_path / "s.ini").last_config_dir is None
    assert Settings(tmp_path / "s.ini").last_model == tmp_path / "unet" / "flux1-dev.safetensors"
