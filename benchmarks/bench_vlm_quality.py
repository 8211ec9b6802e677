"""VLM quality benchmark: EMLoC's share of full-model LoRA's gain on a synthetic visual task (CPU, minutes).

No pretrained VLM installs offline here, so the task and the model are synthetic: a tiny random
Qwen2-VL (:mod:`tests.tiny_vlms`, widened to 64) learns to answer "How many shapes, and what colour?"
about generated 28×28 images (1–3 squares or circles in one of 4 colours) with "2 blue". The vision
tower must see the colour and the count: the answer is not in the text.

Three adapters, same data order, steps, rank and learning rate, scored by the held-out loss per
answer token of the ORIGINAL model + adapter on a test split never used for training or for λ:

* base: the original model, no adapter;
* full LoRA: LoRA trained on the original model itself (a full-rank emulator reproduces it exactly,
  tests/engine/test_vision_emulator.py, so the same code path trains it);
* EMLoC: emulator at ρ (both towers compressed) → LoRA → correction (λ chosen on the eval split).

``fraction = (base − EMLoC) / (base − full LoRA)``, the share of full LoRA's gain that reaches the
original. ρ defaults to the planner's ρ for Qwen2.5-VL-7B on a 24 GiB budget (computed, printed).

    python benchmarks/bench_vlm_quality.py --steps 300 --out benchmarks/results/vlm_quality.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emloc_engine.catalog.model_facts import facts_from_config
from emloc_engine.data.config import DataConfig
from emloc_engine.data.vision_pipeline import prepare_vision_dataset
from emloc_engine.run.planning import PlanConfig, plan_memory
from emloc_engine.vision.emulator import VlmEmulatorConfig, build_vlm_emulator, calibration_inputs
from emloc_engine.vision.finetune import VlmTrainConfig, correct_vlm_adapter, eval_loss, train_vlm_lora
from emloc_engine.vision.processor import load_processor
from emloc_engine.vision.reference import VLM_REFERENCE_CONFIGS
from tests.tiny_vlms import build_tiny_vlm, write_png

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 210, 20)}


def planner_ratio(budget_gib: float) -> float:
    facts = facts_from_config(VLM_REFERENCE_CONFIGS["Qwen2.5-VL-7B"])
    plan = plan_memory(facts, PlanConfig(context_length=64, budget_bytes=int(budget_gib * 2**30)))
    return float(plan.ratio or 0.5)


def write_split(folder: Path, name: str, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        colour = rng.choice(list(COLOURS))
        count = rng.randint(1, 3)
        shape = rng.choice(["square", "circle"])
        img = write_png(folder / "img" / f"{name}-{i}.png", COLOURS[colour], count=count, shape=shape)
        rows.append({"image": str(img.relative_to(folder)), "conversations": [
            {"from": "human", "value": "<image>\nHow many shapes, and what colour?"},
            {"from": "gpt", "value": f"{count} {colour}"}]})
    f = folder / f"{name}.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return f


def score(model_dir: Path, adapter: Path | None, test: DataConfig) -> float:
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    processor = load_processor(model_dir)
    examples = prepare_vision_dataset(test, processor).train
    model: Any = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    return float(eval_loss(model, processor, examples, torch.device("cpu"), torch.float32) or 0.0)


def widen(config: Any) -> None:
    for sub in (config.text_config, config.vision_config):
        for k in ("hidden_size", "embed_dim"):
            if getattr(sub, k, None):
                setattr(sub, k, 64)
        if getattr(sub, "intermediate_size", None):
            sub.intermediate_size = 128
    config.text_config.rope_parameters["mrope_section"] = [2, 3, 3]  # head_dim 16: sections sum to 8


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/emloc-vlm-quality"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--ratio", type=float, default=None, help="ρ (default: the planner's, see module doc)")
    ap.add_argument("--budget-gib", type=float, default=24.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    torch.manual_seed(args.seed)
    rho = args.ratio if args.ratio is not None else planner_ratio(args.budget_gib)
    work = args.work
    snap = build_tiny_vlm("qwen2_vl", work / "hub", name="tiny-vlm-quality", weight_std=0.1, tweak=widen)
    processor = load_processor(snap)
    train = DataConfig(write_split(work / "data", "train", 160, args.seed), eval_fraction=0.2, seed=args.seed)
    test = DataConfig(write_split(work / "data", "test", 48, args.seed + 1), eval_fraction=0.0)
    prepared = prepare_vision_dataset(train, processor)
    calib = calibration_inputs(prepared.train, processor, 64)
    common = dict(steps=args.steps, lr=args.lr, rank=args.rank, alpha=2.0 * args.rank, device="cpu",
                  dtype="float32", seed=args.seed, checkpoint_every=args.steps, warmup=10)
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "ratio": rho, "steps": args.steps, "lr": args.lr,
                           "rank": args.rank}
    secs: dict[str, float] = {}
    out["seconds"] = secs
    t = time.monotonic()

    def lap(name: str) -> None:
        nonlocal t
        secs[name] = round(time.monotonic() - t, 1)
        t = time.monotonic()

    lap("setup")
    out["base"] = score(snap, None, test)
    lap("score_base")
    full_emu = build_vlm_emulator(VlmEmulatorConfig(snap, work / "full" / "emulator", calib, ratio=0.5,
                                                    device="cpu", compute_dtype="float32", full_rank=True))
    lap("full_emulator")
    full = train_vlm_lora(VlmTrainConfig(snap, full_emu.emulator_dir, train, work / "full", **common))
    lap("full_train")
    out["full_lora"] = score(snap, full.adapter_dir, test)
    emu = build_vlm_emulator(VlmEmulatorConfig(snap, work / "emloc" / "emulator", calib, ratio=rho, device="cpu",
                                               compute_dtype="float32"))
    lap("emloc_emulator")
    trained = train_vlm_lora(VlmTrainConfig(snap, emu.emulator_dir, train, work / "emloc", **common))
    lap("emloc_train")
    out["emulator_plus_adapter_eval"] = trained.eval_loss
    out["emloc_uncorrected"] = score(snap, trained.adapter_dir, test)
    corr = correct_vlm_adapter(snap, emu.emulator_dir, trained.adapter_dir, work / "emloc" / "adapter-corrected",
                               train, device="cpu")
    lap("correct")
    out["lambda"] = corr.lam if corr.lam != float("inf") else "inf"
    out["lambda_table"] = [[a if a != float("inf") else "inf", b] for a, b in corr.table]
    out["emloc"] = score(snap, corr.adapter_dir, test)
    gain = out["base"] - out["full_lora"]
    out["fraction_of_full_lora_gain"] = (out["base"] - out["emloc"]) / gain if gain > 0 else None
    out["fraction_uncorrected"] = (out["base"] - out["emloc_uncorrected"]) / gain if gain > 0 else None
    out["wall_s"] = time.monotonic() - t0
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
