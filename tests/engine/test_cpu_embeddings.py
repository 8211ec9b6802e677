"""The λ search keeps an untied input-embedding table in RAM (emloc_engine.weights.cpu_embeddings)."""

from __future__ import annotations

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
