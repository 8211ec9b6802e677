"""benchmarks/image_anchors.py re-exports the engine's anchors: one implementation (tests in test_image_anchors.py)."""

from __future__ import annotations


def test_the_benchmark_uses_the_engine_anchors() -> None:
    import benchmarks.image_anchors as bench
    from emloc_engine.images import anchors

    assert bench.OnlineBlockAnchors is anchors.OnlineBlockAnchors and bench.BLOCK is anchors.BLOCK
