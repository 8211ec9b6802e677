"""The λ search keeps an untied input-embedding table in RAM (emloc_engine.weights.cpu_embeddings)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from emloc_engine.weights.cpu_embeddings import CpuInputEmbeddings, keep_input_embeddings_on_cpu


def _model(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


def test_the_wrapped_table_gives_the_same_logits_and_leaves_the_module_tree() -> None:
    model = _model(tied=False)
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    table = model.get_input_embeddings()
    model.set_input_embeddings(CpuInputEmbeddings(table, "cpu"))
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    # outside the module tree: model.to(...) and the parameter list skip it, so the GPU never holds it
    assert all(p is not table.weight for p in model.parameters())
    assert model.get_input_embeddings().weight is table.weight


def test_only_untied_tables_on_a_gpu_device_are_moved() -> None:
    untied, tied = _model(tied=False), _model(tied=True)
    assert not keep_input_embeddings_on_cpu(untied, "cpu")  # nothing to save on the CPU
    assert not keep_input_embeddings_on_cpu(tied, "meta")  # the head needs the shared table where it runs
    assert not isinstance(tied.get_input_embeddings(), CpuInputEmbeddings)
    assert keep_input_embeddings_on_cpu(untied, "meta")
    wrapper = untied.get_input_embeddings()
    assert isinstance(wrapper, CpuInputEmbeddings) and wrapper.weight.device.type == "cpu"
    untied.to("meta")  # stands in for model.to("cuda"): everything moves but the table
    assert wrapper.weight.device.type == "cpu" and untied.lm_head.weight.device.type == "meta"
    assert not keep_input_embeddings_on_cpu(untied, "meta")  # idempotent


def _force_wrapper(model: object, device: object) -> bool:
    """keep_input_embeddings_on_cpu as it acts on a GPU, here with the CPU as the 'GPU' (the path CI can run)."""
    if isinstance(model.get_input_embeddings(), CpuInputEmbeddings):  # type: ignore[attr-defined]
        return False
    model.set_input_embeddings(CpuInputEmbeddings(model.get_input_embeddings(), "cpu"))  # type: ignore[attr-defined]
    return True


def test_peft_adapter_on_a_wrapped_text_model_gives_the_same_logits() -> None:
    from peft import LoraConfig, get_peft_model

    ids = torch.randint(0, 97, (2, 7))
    outs = []
    for wrap in (False, True):
        model = _model(tied=False)
        if wrap:
            _force_wrapper(model, "cpu")
        torch.manual_seed(1)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                      init_lora_weights=False)).eval()
        with torch.no_grad():
            outs.append(peft_model(input_ids=ids).logits)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("family", ["qwen2_vl", "internvl", "gemma3"])
def test_vlm_lambda_search_is_unchanged_with_the_table_in_ram(family: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The VLM λ search (image features merged into the looked-up rows) scores every λ the same with the table
    behind the wrapper as without it."""
    from emloc_engine.vision.finetune import VlmTrainConfig, correct_vlm_adapter, train_vlm_lora
    from emloc_engine.weights import cpu_embeddings
    from tests.engine.test_vision_finetune import _setup

    snap, emu, data, _ = _setup(family, tmp_path)
    res = train_vlm_lora(VlmTrainConfig(snap, emu, data, tmp_path / "run", steps=2, lr=5e-3, rank=4, alpha=8,
                                        device="cpu", dtype="float32", checkpoint_every=2))
    plain = correct_vlm_adapter(snap, emu, res.adapter_dir, tmp_path / "c1", data, device="cpu")
    calls: list[bool] = []
    monkeypatch.setattr(cpu_embeddings, "keep_input_embeddings_on_cpu",
                        lambda m, d: calls.append(_force_wrapper(m, d)) or True)
    wrapped = correct_vlm_adapter(snap, emu, res.adapter_dir, tmp_path / "c2", data, device="cpu")
    assert calls == [True]
    assert [lam for lam, _ in plain.table] == [lam for lam, _ in wrapped.table]
    for (_, a), (_, b) in zip(plain.table, wrapped.table, strict=True):
        assert math.isclose(a, b, rel_tol=1e-9), (a, b)
