"""The CPU time model against the demo's measured run (benchmarks/RESULTS.md: 60 steps in 267 s on 2 cores)."""

from __future__ import annotations

import json

from emloc_engine.catalog.model_facts import facts_from_config
from emloc_engine.data.validation import LengthStats
from emloc_engine.run import planning
from emloc_engine.run.plan import sample_tokens_of

SMOLLM2_135M = {  # the demo model's config.json (SmolLM2-135M-Instruct)
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "max_position_embeddings": 8192,
}
MEASURED_TRAIN_S = 267.0  # the demo, 60 steps, batch 4, ρ 0.9, on this project's 2-core CPU box


def _demo_train_seconds(sample_tokens: int | None) -> float:
    facts = facts_from_config(json.loads(json.dumps(SMOLLM2_135M)), name="SmolLM2-135M")
    cfg = planning.PlanConfig(
        device="cpu",
        gpu_total_bytes=24 * 2**30,
        budget_bytes=24 * 2**30,
        context_length=512,
        batch_size=4,
        train_steps=60,
        ratio=0.9,
        anchored=False,
        sample_tokens=sample_tokens,
    )
    return planning.training_peak(facts, cfg, 0.9).est_seconds


def test_cpu_training_estimate_is_within_half_of_the_measured_demo() -> None:
    sample = sample_tokens_of(
        _report_with(LengthStats(unit="tokens", min=57, mean=102.6, p95=154, max=211)), 4
    )
    assert sample == 154  # batches are padded to their longest sample: near the long end
    predicted = _demo_train_seconds(sample)
    assert 0.5 * MEASURED_TRAIN_S <= predicted <= 1.5 * MEASURED_TRAIN_S, predicted  # was ~10× over
    assert _demo_train_seconds(None) > 2 * predicted  # not knowing the data: counted at the whole context


def _report_with(stats: LengthStats):  # type: ignore[no-untyped-def]
    from types import SimpleNamespace

    return SimpleNamespace(token_stats=stats)


def test_no_token_statistics_means_no_sample_length() -> None:
    assert sample_tokens_of(None, 4) is None
    assert (
        sample_tokens_of(_report_with(LengthStats(unit="tokens", min=5, mean=20.4, p95=40, max=50)), 1) == 20
    )
