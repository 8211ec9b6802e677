"""What the emulator build holds on the GPU at its peak: one build of a few blocks under the allocator's history.

The planner predicts the build's ``max_memory_allocated`` term by term; when the measurement disagrees
(Qwen2.5-14B shapes, 2026-12-06: 6.47 GiB measured, 5.22 planned) this names what was live at the peak.
It builds a model of the same block shapes with only ``--layers`` blocks (the build runs one block at a
time, so its peak does not depend on the block count), records every CUDA allocation with its Python
stack (``torch.cuda.memory._record_memory_history``), replays the trace to the moment of the highest
allocated total, and lists what was live then, grouped by the innermost engine frame and the innermost
model/torch frame that allocated it. Also the highest total while factorising (frames in factorize.py).

    python benchmarks/device/emulator_peak_trace.py --arch qwen2.5-14b --budget-gib 13.73 --out trace-14b.json

``--budget-gib`` is the build's memory budget (what the run's plan gave it: min(allowed, half the inference
peak)); the chunking follows from it exactly as in the run. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

GIB = 2**30


def _frame_label(frames: list[dict[str, Any]], keys: tuple[str, ...]) -> str:
    for f in frames:  # innermost first
        name = str(f.get("filename", ""))
        if any(k in name for k in keys):
            short = name.split("site-packages/")[-1].split(str(ROOT) + "/")[-1]
            return f"{short}:{f.get('line')} {f.get('name')}"
    return "-"


def live_at_peaks(trace: list[dict[str, Any]]) -> dict[str, Any]:
    """Replay one device's allocator trace: the peak of allocated bytes and what was live then, overall and per phase."""
    live: dict[int, tuple[int, str, str]] = {}
    cur = 0
    best: dict[str, tuple[int, dict[int, tuple[int, str, str]], int]] = {}
    for i, ev in enumerate(trace):
        act = ev.get("action")
        if act == "alloc":
            frames = ev.get("frames") or []
            engine = _frame_label(frames, ("emloc_engine",))
            op = _frame_label(frames, ("transformers/", "torch/nn/", "torch/functional", "torch/_tensor"))
            live[int(ev["addr"])] = (int(ev["size"]), engine, op)
            cur += int(ev["size"])
            phase = "factorize" if "factorize.py" in engine else ("forward" if "calibration.py" in engine else "other")
            for key in ("all", phase):
                if cur > best.get(key, (-1, {}, 0))[0]:
                    best[key] = (cur, dict(live), i)
        elif act in ("free_requested", "free_completed"):
            got = live.pop(int(ev["addr"]), None)
            if got is not None:
                cur -= got[0]
    out: dict[str, Any] = {}
    for key, (total, snap, idx) in best.items():
        groups: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        for size, engine, op in snap.values():
            g = groups[(engine, op)]
            g[0] += size
            g[1] += 1
        rows = sorted(groups.items(), key=lambda kv: -kv[1][0])
        out[key] = {
            "allocated_gib": total / GIB,
            "event": idx,
            "live": [{"gib": round(v[0] / GIB, 4), "n": v[1], "engine": k[0], "op": k[1]} for k, v in rows[:25]],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="qwen2.5-14b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--budget-gib", type=float, required=True, help="The build's memory budget (sizes its chunks).")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/peak-trace"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("this trace records CUDA allocations and needs a CUDA GPU (run it on the device machine).")
    from make_random_model import make

    from emloc_engine.stages.emulator.builder import EmulatorConfig, build_emulator

    model = args.work / f"{args.arch}-{args.layers}"
    if not (model / "tokenizer_config.json").is_file():
        make(args.arch, model, shards=1, layers=args.layers)
    rng = random.Random(0)
    ids = tuple(tuple(rng.randrange(5, 250) for _ in range(args.max_length)) for _ in range(args.samples))
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, context="alloc", stacks="python")
    t0 = time.monotonic()
    res = build_emulator(EmulatorConfig(model_dir=model, out_dir=args.work / f"emu-{args.arch}", calibration_ids=ids,
                                        ratio=args.ratio, device="cuda", overwrite=True,
                                        memory_budget_bytes=int(args.budget_gib * GIB)))
    wall = time.monotonic() - t0
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = snap["device_traces"][torch.cuda.current_device()]
    out = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "arch": args.arch,
        "layers": args.layers,
        "budget_gib": args.budget_gib,
        "calibration": [args.samples, args.max_length],
        "ratio": args.ratio,
        "chunk_tokens": res.chunk_tokens,
        "peak_vram_gib": res.peak_vram_gib,
        "wall_s": wall,
        "events": len(trace),
        "peaks": live_at_peaks(trace),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "peaks"}))
    for key, p in out["peaks"].items():
        print(f"-- {key}: {p['allocated_gib']:.3f} GiB allocated at event {p['event']}")
        for row in p["live"][:14]:
            print(f"   {row['gib']:7.3f} GiB  x{row['n']:<4} {row['engine']}  |  {row['op']}")


if __name__ == "__main__":
    main()
