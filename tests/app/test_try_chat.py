"""The Try page as a chat: turns, system prompt and sampling settings, streaming, Stop, prompts kept per run."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from emloc_app.generation import ChatRequest
from emloc_app.pages import try_page as try_module
from emloc_app.pages.try_page import TryPage
from emloc_app.state import WizardState
from tests.app.fakes import FakeEngine, open_try_page


def send(qtbot: Any, page: TryPage, text: str) -> None:
    page.prompt.setPlainText(text)
    page.generate.click()
    qtbot.waitUntil(lambda: not page.busy() and page.generate.isEnabled(), timeout=60_000)


def test_two_turns_with_system_prompt_and_sampling_settings(
    qtbot, fake: FakeEngine, state: WizardState
) -> None:  # type: ignore[no-untyped-def]
    page = open_try_page(qtbot, state)
    page.system_prompt.setText("You are a pirate.")
    page.temperature.setValue(0.3)
    page.top_p.setValue(0.8)
    page.max_tokens.setValue(64)
    send(qtbot, page, "Hello?")
    send(qtbot, page, "And now?")
    first, second = [arg for name, arg in fake.calls.items if name == "chat"]
    assert isinstance(second, ChatRequest)
    assert (second.settings.temperature, second.settings.top_p, second.settings.max_new_tokens) == (
        0.3,
        0.8,
        64,
    )
    # each side continues its own conversation: the user turns are shared, the replies are its own
    assert second.messages("base") == [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hello?"},
        {"role": "assistant", "content": "Hello from base #1"},
        {"role": "user", "content": "And now?"},
    ]
    assert second.histories["tuned"][1] == {"role": "assistant", "content": "Hello from tuned #1"}
    assert first.seed != second.seed or first.histories != second.histories
    text = page.outputs["tuned"].toPlainText()
    assert "You: Hello?" in text and text.endswith("You: And now?\n\nFine-tuned: Hello from tuned #2")
    assert page.prompt.toPlainText() == ""
    page.new_chat.click()
    assert page.outputs["base"].toPlainText() == "" and page.conversations == {"base": [], "tuned": []}
    send(qtbot, page, "Fresh start")
    assert page.outputs["base"].toPlainText().endswith("Hello from base #1")


def test_stop_keeps_the_reply_so_far(qtbot, fake: FakeEngine, state: WizardState, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    streaming = threading.Event()

    def endless(req: Any, progress: Any) -> dict[str, str]:
        progress.emit_text("Once upon", "base")
        streaming.set()
        while True:
            progress.check_cancelled()
            time.sleep(0.01)

    monkeypatch.setattr(try_module, "chat_side_by_side", endless)
    page = open_try_page(qtbot, state)
    page.prompt.setPlainText("Tell a story")
    page.generate.click()
    qtbot.waitUntil(streaming.is_set, timeout=60_000)
    qtbot.waitUntil(lambda: "Once upon" in page.outputs["base"].toPlainText(), timeout=60_000)
    assert page.stop.isEnabled() and not page.generate.isEnabled()
    page.stop.click()
    qtbot.waitUntil(lambda: not page.busy(), timeout=60_000)
    assert page.gen_status.text() == "Stopped." and page.generate.isEnabled() and not page.stop.isEnabled()
    assert page.outputs["base"].toPlainText().endswith("Base: Once upon [stopped]")
    assert page.conversations["base"][-1] == {"role": "assistant", "content": "Once upon"}
    assert page.conversations["tuned"][-1] == {"role": "assistant", "content": ""}


def test_prompts_and_settings_are_kept_in_the_run_folder(qtbot, fake: FakeEngine, state: WizardState) -> None:  # type: ignore[no-untyped-def]
    page = open_try_page(qtbot, state)
    page.system_prompt.setText("Answer in French.")
    page.temperature.setValue(0.0)
    send(qtbot, page, "First question")
    send(qtbot, page, "Second question")
    send(qtbot, page, "First question")  # asked again: moves to the end, not kept twice
    assert state.run_dir is not None
    saved = json.loads((Path(state.run_dir) / "prompts.json").read_text())
    assert saved["prompts"] == ["Second question", "First question"]
    assert saved["system_prompt"] == "Answer in French." and saved["temperature"] == 0.0
    again = TryPage(state)  # the app restarted on the same run
    qtbot.addWidget(again)
    again.initializePage()
    assert again.system_prompt.text() == "Answer in French." and again.temperature.value() == 0.0
    assert [again.saved.itemData(i) for i in range(again.saved.count())] == [
        "First question",
        "Second question",
    ]
    assert again.prompt.toPlainText() == "First question"
    again.saved.activated.emit(1)
    assert again.prompt.toPlainText() == "Second question"
    assert again.temperature.text() == "0 (fixed)"
