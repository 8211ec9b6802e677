"""The app's data settings start at the engine's defaults (they were copies: 512 tokens, 0.1 held out...)."""

from __future__ import annotations

from pathlib import Path

from emloc_app.pages.data_page import DataSettings
from emloc_app.state import WizardState
from emloc_engine.data import DataConfig


def test_the_wizard_and_the_data_page_start_at_the_data_configs_defaults() -> None:
    engine = DataConfig(path=Path("chat.jsonl"))
    assert DataSettings().config(Path("chat.jsonl")) == engine
    s = WizardState()
    assert (s.data_format, s.max_length, s.eval_fraction, s.train_on, s.max_samples) == (
        engine.format, engine.max_length, engine.eval_fraction, engine.train_on, engine.max_samples)
