"""VLM memory benchmark: every EMLoC stage's GPU peak vs the model's own inference peak, at the planner's ρ.

Random bf16 weights of a real VLM's shapes (speed and memory do not depend on the values):
``Qwen2.5-VL-7B`` or ``InternVL2.5-8B`` (:mod:`emloc_engine.vision.reference`), saved as a model
folder with the hub's tensor layout, a processor (the family's image processor at its DEFAULT
settings; a byte-level tokenizer whose image tokens the config is pointed at) and generated images
of coloured shapes at the resolution the planner assumes (1024×1024 for Qwen, one 448² tile for
InternVL: the processors' defaults).

Measured, one after the other on one GPU (torch allocator peaks, ``max_memory_allocated``):

1. inference: the original model, one sample (image + question + answer), forward in bf16;
2. emulator build (:func:`emloc_engine.vision.emulator.build_vlm_emulator`) at the planner's ρ for
   this budget (the inference peak), both towers compressed, ``--calib`` samples;
3. training (:func:`emloc_engine.vision.finetune.train_vlm_lora`), ``--steps`` steps, rank 16,
   activation checkpointing of both towers, the loss on label positions in chunks;
4. correction with the λ search (original model + adapter resident, held-out loss in chunks);
5. merge (CPU only: 0 GPU bytes).

Prints one JSON object (also written to ``--out``). The H200 run takes about 5–7 minutes per model
(most of it writing and reading the 16 GB random model).

    python benchmarks/bench_vlm.py --model Qwen2.5-VL-7B --work /tmp/vlm-bench
    python benchmarks/bench_vlm.py --model InternVL2.5-8B --work /tmp/vlm-bench
    python benchmarks/bench_vlm.py --model tiny --work /tmp/vlm-tiny --device cpu   # a CPU smoke run
    python benchmarks/bench_vlm.py --model Qwen2.5-VL-7B --work /tmp/vlm-bench --anchor blocks  # anchored training
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emloc_engine.catalog.model_facts import read_model_facts
from emloc_engine.data.config import DataConfig
from emloc_engine.data.vision_pipeline import prepare_vision_dataset
from emloc_engine.run.planning import PlanConfig, plan_memory
from emloc_engine.vision.emulator import VlmEmulatorConfig, build_vlm_emulator, calibration_inputs
from emloc_engine.vision.finetune import (
    VlmTrainConfig,
    correct_vlm_adapter,
    example_batch,
    merge_vlm,
    train_vlm_lora,
)
from emloc_engine.vision.processor import load_processor, save_processor_parts
from emloc_engine.vision.reference import VLM_REFERENCE_CONFIGS

GIB = 2**30
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 210, 20)}


def _tokenizer(extra: tuple[str, ...], named: dict[str, str], placeholder: str) -> Any:
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    from tests.tiny_vlms import _chat_template  # the ChatML template with image parts

    specials = ("<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", *extra)
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(list(specials))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<|im_end|>",
                                  extra_special_tokens=named)
    tok.chat_template = _chat_template(placeholder)
    return tok


def make_model(name: str, folder: Path, device: str) -> tuple[Path, int]:
    """Random-weight VLM + processor in ``folder``; returns it and the image side in pixels."""
    import transformers as tf

    from emloc_engine.vision.processor import _without_video

    if name == "tiny":
        from tests.tiny_vlms import build_tiny_vlm

        snap = build_tiny_vlm("qwen2_5_vl", folder / "hub")
        return snap, 28
    cfg_dict = copy.deepcopy(VLM_REFERENCE_CONFIGS[name])
    if cfg_dict["model_type"] == "qwen2_5_vl":
        extra = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
        cfg_dict.update(vision_start_token_id=4, vision_end_token_id=5, image_token_id=6, video_token_id=7)
        tok = _tokenizer(extra, {}, "<|vision_start|><|image_pad|><|vision_end|>")
        processor = _without_video(tf.Qwen2_5_VLProcessor)(image_processor=tf.Qwen2VLImageProcessorPil(),
                                                             tokenizer=tok, chat_template=tok.chat_template)
        side = 1024
    else:
        extra = ("<img>", "</img>", "<IMG_CONTEXT>", "<video>")
        cfg_dict.update(image_token_id=6)
        tok = _tokenizer(extra, {"start_image_token": "<img>", "end_image_token": "</img>",
                                 "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
                         "<IMG_CONTEXT>")
        processor = _without_video(tf.InternVLProcessor)(image_processor=tf.GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}),
                                                          tokenizer=tok, image_seq_length=256,
                                                          chat_template=tok.chat_template)
        side = 448
    text = cfg_dict.pop("text_config")
    vision = {k: v for k, v in cfg_dict.pop("vision_config").items() if k != "model_type"}
    mt = cfg_dict.pop("model_type")
    cfg_dict.pop("architectures")
    cfg_dict.pop("torch_dtype")
    text.update(pad_token_id=0, eos_token_id=3, bos_token_id=None)
    config = tf.AutoConfig.for_model(mt, text_config=text, vision_config=vision, **cfg_dict)
    with torch.device(device):
        model = tf.AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    out = folder / name
    model.save_pretrained(out, max_shard_size="4GB")
    del model
    save_processor_parts(processor, out)
    tf.GenerationConfig(eos_token_id=3, pad_token_id=0, max_new_tokens=16).save_pretrained(out)
    return out, side


def make_data(folder: Path, n: int, side: int) -> Path:
    from tests.tiny_vlms import write_png

    names = list(COLOURS)
    rows = []
    for i in range(n):
        c = names[i % len(names)]
        write_png(folder / "img" / f"{i}.png", COLOURS[c], size=side, count=1 + i % 4)
        rows.append({"image": f"img/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour are the shapes, and how many are there?"},
            {"from": "gpt", "value": f"There are {1 + i % 4} {c} shapes."}]})
    f = folder / "shapes.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return f


def inference_peak(model_dir: Path, processor: Any, example: Any, device: torch.device) -> float:
    from transformers import AutoModelForImageTextToText

    torch.cuda.empty_cache() if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model: Any = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16 if device.type == "cuda"
                                                             else torch.float32)
    model = model.to(device).eval()
    batch = example_batch(processor, example, device, next(model.parameters()).dtype)
    batch.pop("labels")
    with torch.inference_mode():
        model(**batch, use_cache=False)
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else 0.0
    del model
    return peak


def _peak(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else 0.0


def _say(line: str) -> None:
    """One stage's numbers as soon as it ends (a run cut short by a time limit still leaves them)."""
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="Qwen2.5-VL-7B", choices=[*VLM_REFERENCE_CONFIGS, "tiny"])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--anchor", default="none", choices=("none", "blocks", "auto"),
                    help="Anchored training (its recording pass runs the original: the inference peak).")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    times: dict[str, float] = {}
    t = time.monotonic()
    model_dir, side = make_model(args.model, work, args.device)
    times["make_model"] = time.monotonic() - t
    processor = load_processor(model_dir)
    data = DataConfig(make_data(work / "data", args.samples, side), max_length=4096, eval_fraction=0.125)
    prepared = prepare_vision_dataset(data, processor)
    tokens = max(len(e) for e in prepared.train)
    facts = read_model_facts(model_dir)
    t = time.monotonic()
    infer = inference_peak(model_dir, processor, prepared.train[0], device)
    times["inference"] = time.monotonic() - t
    _say(f"inference peak {infer:.2f} GiB in {times['inference']:.0f} s ({tokens} tokens)")
    text_tokens = max(1, tokens - (facts.vision.tokens_per_image if facts.vision else 0))
    # what this run does: one sample per step, anchored only with --anchor (the planner adds the image tokens)
    plan_cfg = PlanConfig(context_length=text_tokens, lora_rank=16, anchored=args.anchor != "none")
    plan = plan_memory(facts, plan_cfg)
    fits, reason = plan.fits, plan.reason
    if plan.ratio is None:  # the plan says it does not fit: measure at ρ 0.5 anyway, and say so in the JSON
        _say(f"planner: does not fit ({reason}); measuring at rho 0.5")
        plan = plan_memory(facts, replace(plan_cfg, ratio=0.5))
    rho = plan.ratio or 0.5
    run = work / "run"
    t = time.monotonic()
    emu = build_vlm_emulator(VlmEmulatorConfig(model_dir, run / "emulator",
                                               calibration_inputs(prepared.train, processor, args.calib),
                                               ratio=rho, device=args.device))
    times["emulator"] = time.monotonic() - t
    _say(f"emulator at rho {rho}: peak {emu.peak_vram_gib:.2f} GiB in {times['emulator']:.0f} s")
    t = time.monotonic()
    train = train_vlm_lora(VlmTrainConfig(model_dir, emu.emulator_dir, data, run, steps=args.steps, lr=1e-4,
                                          rank=16, alpha=32, device=args.device, checkpoint_every=args.steps,
                                          anchor=args.anchor))
    times["train"] = time.monotonic() - t
    _say(f"train: peak {train.peak_vram_gib:.2f} GiB in {times['train']:.0f} s")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t = time.monotonic()
    corr = correct_vlm_adapter(model_dir, emu.emulator_dir, train.adapter_dir, run / "adapter-corrected", data,
                               device=args.device)
    correct_peak = _peak(device)
    times["correct"] = time.monotonic() - t
    _say(f"correct: peak {correct_peak:.2f} GiB in {times['correct']:.0f} s")
    t = time.monotonic()
    merge_vlm(model_dir, corr.adapter_dir, run / "merged", emu.emulator_dir)
    times["merge"] = time.monotonic() - t
    stages = {"emulator": emu.peak_vram_gib, "train": train.peak_vram_gib, "correct": correct_peak, "merge": 0.0}
    result = {
        "date": time.strftime("%Y-%m-%d"), "model": args.model,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "tokens_per_sample": tokens, "image_tokens": facts.vision.tokens_per_image if facts.vision else None,
        "planner_ratio": rho, "planner_fits": fits, "planner_reason": reason,
        "planner_inference_gib": plan.inference.peak_gib,
        "planner_stage_gib": {s.name: s.peak_gib for s in plan.stages},
        "inference_peak_gib": infer, "stage_peak_gib": stages,
        "within_inference": {k: v <= infer for k, v in stages.items()},
        "lambda": corr.lam if corr.lam != float("inf") else "inf", "train_losses": list(train.losses),
        "seconds": times,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
