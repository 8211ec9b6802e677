"""Tiny VLMs of every supported family: built offline, found by discovery as vision-language, loadable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from emloc_engine.catalog.discovery import scan_hf_cache
from emloc_engine.catalog.model_facts import facts_from_config, read_model_facts
from emloc_engine.core.errors import UnsupportedModel
from emloc_engine.vision.families import VLM_MODEL_TYPES, vlm_spec
from emloc_engine.vision.processor import load_processor
from emloc_engine.weights.headers import read_config
from tests.tiny_vlms import VLM_FAMILIES, build_tiny_vlm, write_png


@pytest.fixture(scope="module")
def vlm_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("vlm_cache") / "hub"
    for family in VLM_FAMILIES:
        build_tiny_vlm(family, cache)
    return cache


def test_every_supported_family_has_a_tiny_model() -> None:
    assert set(VLM_FAMILIES) == set(VLM_MODEL_TYPES)


def test_discovery_lists_each_vlm_with_its_kind(vlm_cache: Path) -> None:
    models, warnings = scan_hf_cache(vlm_cache)
    assert not warnings
    by_type = {m.model_type: m for m in models}
    assert set(by_type) == set(VLM_FAMILIES)
    for family, info in by_type.items():
        assert info.kind == "vision-language", family
        assert info.to_dict()["kind"] == "vision-language"
        assert info.facts is not None and info.facts.vision is not None, family
        assert info.facts.num_layers == 2 and info.facts.hidden_size == 32, family
        assert info.facts.vision.num_blocks == 2, family
        assert info.facts.vision.linear_parameters_per_block > 0, family
        assert info.facts.vision.tokens_per_image > 0, family


def test_facts_split_language_model_and_vision_tower(vlm_cache: Path) -> None:
    snap = next((vlm_cache / "models--emloc-test--tiny-vlm-llava" / "snapshots").iterdir())
    facts = read_model_facts(snap)
    assert facts.kind == "vision-language" and facts.source == "headers"
    assert facts.modules[0].name == "self_attn.q_proj" and facts.modules[0].bias is False
    assert facts.vision is not None
    # CLIP block: q, k, v, out (32×32 each) + fc1, fc2 (64×32): 4·1024 + 2·2048
    assert facts.vision.linear_parameters_per_block == 4 * 32 * 32 + 2 * 64 * 32
    assert facts.vision.patches_per_image == 5 and facts.vision.tokens_per_image == 4
    config_only = facts_from_config(read_config(snap))
    assert config_only.kind == "vision-language" and config_only.num_parameters > facts.vision.num_parameters


def test_unknown_vlm_family_is_refused_by_name() -> None:
    with pytest.raises(UnsupportedModel, match="mllama"):
        vlm_spec({"model_type": "mllama", "text_config": {}, "vision_config": {}})


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_processor_and_model_load_offline_and_run_an_image(
    family: str, vlm_cache: Path, tmp_path: Path
) -> None:
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    snap = next((vlm_cache / f"models--emloc-test--tiny-vlm-{family}" / "snapshots").iterdir())
    processor = load_processor(snap)
    model = AutoModelForImageTextToText.from_pretrained(snap).eval()
    spec = vlm_spec(model.config)
    names = dict(model.named_modules())
    for tower in spec.towers:  # the spec names real modules
        for m in tower.linear_modules:
            assert isinstance(names[tower.module_name(tower.num_blocks - 1, m)], torch.nn.Linear), (family, m)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]}]
    text = processor.tokenizer.apply_chat_template(
        msgs, chat_template=processor.chat_template, tokenize=False, add_generation_prompt=True
    )
    image = Image.open(write_png(tmp_path / "a.png")).convert("RGB")
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()
