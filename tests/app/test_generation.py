"""``chat_side_by_side`` on a tiny model: streamed turns, the system prompt, greedy and seeded sampling, Stop."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from emloc_app.generation import ChatRequest, ChatSettings, chat_side_by_side, conversation_ids, fit_context
from emloc_engine.core.errors import Cancelled
from tests.tiny_models import make_tokenizer


@dataclass
class Collect:
    """A ``TextProgress`` that keeps the streamed chunks; ``stop_after`` chunks it cancels."""

    chunks: dict[str, list[str]] = field(default_factory=dict)
    stop_after: int | None = None

    def update(self, fraction: float, message: str = "") -> None:
        pass

    def log(self, name: str, value: float, step: int) -> None:
        pass

    def emit_text(self, chunk: str, channel: str = "") -> None:
        self.chunks.setdefault(channel, []).append(chunk)

    def check_cancelled(self) -> None:
        if self.stop_after is not None and sum(map(len, self.chunks.values())) >= self.stop_after:
            raise Cancelled()


def request(model: Path, settings: ChatSettings, seed: int = 1) -> ChatRequest:
    history = (
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "More?"},
    )
    return ChatRequest(model, None, {"base": history}, settings, device="cpu", seed=seed)


def test_conversation_ids_render_every_turn_and_the_system_prompt() -> None:
    tok = make_tokenizer()
    req = ChatRequest(
        Path("m"),
        None,
        {
            "base": (
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello there"},
                {"role": "user", "content": "Again"},
            )
        },
        ChatSettings(system_prompt="Be brief."),
    )
    text = tok.decode(conversation_ids(tok, req.messages("base"))[0])
    assert text.index("Be brief.") < text.index("Hi") < text.index("Hello there") < text.index("Again")
    assert text.endswith("<|im_start|>assistant\n")


def test_a_template_without_system_role_gets_the_system_prompt_in_the_first_message() -> None:
    tok = make_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    ids = conversation_ids(
        tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert tok.decode(ids[0]) == "<user>Be brief.\n\nHi<assistant>"


def test_a_long_conversation_drops_its_oldest_turns_to_fit_the_context() -> None:
    tok = make_tokenizer()
    messages = [{"role": "system", "content": "Sys."}]
    for i in range(6):
        messages += [
            {"role": "user", "content": f"question {i} " * 5},
            {"role": "assistant", "content": f"answer {i}"},
        ]
    messages.append({"role": "user", "content": "last one"})
    full = conversation_ids(tok, messages).shape[1]
    assert fit_context(tok, messages, None).shape[1] == full
    fitted = fit_context(tok, messages, full // 2)
    assert fitted.shape[1] <= full // 2
    short = tok.decode(fitted[0])
    assert short.startswith("<|im_start|>system\nSys.") and "last one" in short and "question 0" not in short


@pytest.mark.integration
def test_streamed_replies_greedy_and_seeded_sampling_and_stop(tiny_llama: Path) -> None:
    greedy = ChatSettings(temperature=0.0, max_new_tokens=12)
    progress = Collect()
    first = chat_side_by_side(request(tiny_llama, greedy), progress)
    assert "".join(progress.chunks["base"]) == first["base"] and first["base"]
    assert chat_side_by_side(request(tiny_llama, greedy, seed=7), Collect()) == first  # greedy: no randomness
    hot = ChatSettings(temperature=1.5, top_p=1.0, max_new_tokens=12)
    a = chat_side_by_side(request(tiny_llama, hot, seed=3), Collect())
    assert chat_side_by_side(request(tiny_llama, hot, seed=3), Collect()) == a  # same seed, same sample
    samples = {chat_side_by_side(request(tiny_llama, hot, seed=s), Collect())["base"] for s in range(4, 9)}
    assert len(samples) > 1  # sampling does vary with the seed
    stopper: Any = Collect(stop_after=1)
    with pytest.raises(Cancelled):
        chat_side_by_side(request(tiny_llama, greedy), stopper)
    assert len(stopper.chunks["base"]) == 1
