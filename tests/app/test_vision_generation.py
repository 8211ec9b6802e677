"""The Try page's generation with an image: a VLM answers a question about it, base and tuned side by side."""

from __future__ import annotations

from pathlib import Path

from emloc_app.generation import ChatRequest, ChatSettings, chat_side_by_side, is_vision_language_folder
from tests.tiny_vlms import build_tiny_vlm, write_png


class _Recorder:
    def __init__(self) -> None:
        self.text: dict[str, str] = {}

    def update(self, fraction: float, message: str = "") -> None:
        pass

    def log(self, name: str, value: float, step: int) -> None:
        pass

    def check_cancelled(self) -> None:
        pass

    def emit_text(self, chunk: str, channel: str = "") -> None:
        self.text[channel] = self.text.get(channel, "") + chunk


def test_image_question_answered_by_base_and_tuned(tmp_path: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    snap = build_tiny_vlm("qwen2_vl", tmp_path / "hub")
    assert is_vision_language_folder(snap)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(snap)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "qkv"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    image = write_png(tmp_path / "red.png", (220, 20, 20))
    progress = _Recorder()
    turn = ({"role": "user", "content": "What colour?"},)
    req = ChatRequest(snap, tmp_path / "adapter", {"base": turn, "tuned": turn},
                      ChatSettings(temperature=0.0, max_new_tokens=6), device="cpu", image=image)
    out = chat_side_by_side(req, progress)
    assert set(out) == {"base", "tuned"} and out == progress.text
    assert out["base"] != out["tuned"]


def test_try_page_takes_an_image_for_a_vlm_only(qtbot, tmp_path: Path, state) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    from emloc_app.pages.try_page import TryPage

    text_page = TryPage(state)  # the state's model folder is a text model (no config: not a VLM)
    qtbot.addWidget(text_page)
    text_page.initializePage()
    assert text_page.image_button.isHidden() and text_page.chat_request("hi").image is None
    snap = build_tiny_vlm("qwen2_vl", tmp_path / "hub")
    page = TryPage(dataclasses.replace(state, model_dir=snap))
    qtbot.addWidget(page)
    page.initializePage()
    assert not page.image_button.isHidden()
    image = write_png(tmp_path / "blue.png", (20, 20, 220))
    page.set_image(image)
    req = page.chat_request("What colour?")
    assert req.image == image and req.model_dir == snap
    assert page.image_label.pixmap() is not None and page.image_label.toolTip() == str(image)
