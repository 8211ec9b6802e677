"""Anchored training for image denoisers: the benchmark's name for the engine's implementation (issue 23).

The prototype that lived here is now :mod:`emloc_engine.images.anchors` (one implementation; the engine
trains with it when ``ImageTrainConfig.anchor == "blocks"``, ``emloc image --anchor blocks``).
``bench_images_quality.py --anchor`` imports ``BLOCK`` and ``OnlineBlockAnchors`` from here.
"""

from __future__ import annotations

from emloc_engine.images.anchors import BLOCK, OnlineBlockAnchors

__all__ = ["BLOCK", "OnlineBlockAnchors"]
