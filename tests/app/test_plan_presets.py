"""The Plan page leads with Faster · Balanced · Best quality (the engine's presets), each with its predicted
time and memory; the method's settings sit under "Advanced", each with one plain sentence."""

from __future__ import annotations

import re

import pytest

from emloc_app.pages.plan_words import PLAIN
from emloc_app.state import WizardState
from emloc_engine.core.errors import ConfigError
from emloc_engine.run.config import RunConfig
from emloc_engine.run.planning import plan_memory as real_plan_memory  # before the fixtures replace it
from emloc_engine.run.presets import PRESETS, get_preset
from tests.app.fakes import FakeEngine
from tests.app.fakes import open_plan_page as plan_page


def _minutes(text: str) -> int:
    found = re.search(r"about (?:(\d+) h ?)?(?:(\d+) min)?", text)
    assert found, text
    return int(found.group(1) or 0) * 60 + int(found.group(2) or 0)


def test_presets_lead_with_time_and_memory_and_advanced_is_folded(
    qtbot,
    fake: FakeEngine,  # type: ignore[no-untyped-def]
    state: WizardState,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from emloc_engine.run import planning

    monkeypatch.setattr(planning, "plan_memory", real_plan_memory)  # real times and peaks (Llama-3-8B facts)
    page = plan_page(qtbot, state)
    page.show()
    assert page.presets.current() == "balanced"  # the engine's defaults
    assert not page.advanced.isVisible() and page.slider.isHidden() is False  # folded, not removed
    texts = {p.name: page.presets.estimates[p.name].text() for p in PRESETS}
    for text in texts.values():
        assert "min" in text and "GiB of GPU memory" in text and "GiB free" in text, text
    assert _minutes(texts["faster"]) < _minutes(texts["balanced"]) < _minutes(texts["best"])
    page.advanced_toggle.click()
    assert page.advanced.isVisible()
    labels = [
        w.text() for w in page.advanced.findChildren(type(page.ratio_label)) if w.objectName() == "PageHint"
    ]
    assert all(sentence in labels for sentence in (PLAIN["ratio"], PLAIN["rank"], PLAIN["lambda"]))


def test_choosing_a_preset_sets_the_advanced_settings_and_editing_one_makes_it_custom(  # type: ignore[no-untyped-def]
    qtbot, fake: FakeEngine, state: WizardState
) -> None:
    page = plan_page(qtbot, state)
    page.presets.buttons["best"].click()
    best = get_preset("best").overrides
    assert (
        page.settings["steps"].value() == best["train.steps"]
        and page.settings["rank"].value() == best["train.rank"]
    )
    assert page.allocation.isChecked()
    assert page.presets.current() == "best" and page.presets.custom.isHidden()
    assert page.validatePage() and state.config is not None and state.config.calib == best["calib"]
    page.settings["steps"].setValue(123)
    assert page.presets.current() is None and not page.presets.custom.isHidden()
    page.presets.buttons["balanced"].click()
    assert page.settings["steps"].value() == RunConfig.__dataclass_fields__["train"].default_factory().steps
    assert not page.allocation.isChecked()  # nothing of Best is left


def test_ratio_slider_stays_inside_the_engines_range(qtbot, fake: FakeEngine, state: WizardState) -> None:  # type: ignore[no-untyped-def]
    page = plan_page(qtbot, state)
    page.auto_ratio.setChecked(False)
    page.slider.setValue(page.slider.maximum())
    page.run_config()  # accepted by the engine
    page.slider.setValue(page.slider.minimum())
    page.run_config()
    # the slider reaches the engine's limits (0 < ρ < 1) in hundredths, not further
    assert (page.slider.minimum(), page.slider.maximum()) == (1, 99)
    for beyond in ((page.slider.maximum() + 1) / 100, (page.slider.minimum() - 1) / 100):
        with pytest.raises(ConfigError):
            RunConfig(**{**page.run_config().__dict__, "ratio": beyond})
