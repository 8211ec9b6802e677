"""Predicted vs measured peak GPU memory: inference, plain LoRA, and LoRA on the emulator at several ρ.

For each architecture (built from its config with random bf16 weights, directly on the GPU; memory
does not depend on weight values) and each context length, this measures
``torch.cuda.max_memory_allocated`` of

* inference: one forward of ``B×T`` tokens with a KV cache (``use_cache=True``), no grad;
* plain LoRA on the full model: peft + transformers loss, gradient checkpointing, AdamW, 2 steps;
* EMLoC training on the emulator at each ρ: every block linear replaced by a random
  :class:`~emloc_engine.weights.lowrank.LowRankLinear` of rank ``k(ρ)``, LoRA attached exactly like
  :mod:`emloc_engine.stages.training.trainer` does (``lora_layers.attach_lora``, non-reentrant checkpointing,
  bf16 autocast, fused AdamW, chunked ``lm_loss_sum``), 2 steps;

and prints each with the planner's prediction (:attr:`StagePeak.allocated_bytes`) and the error.

    python benchmarks/bench_planner.py                        # 3 archs × 3 ratios × 2 contexts (H200: ~2-4 min)
    python benchmarks/bench_planner.py --archs Llama-3-8B --contexts 1024
    python benchmarks/bench_planner.py --model-dir /path/to/model   # shapes of a local model
    python benchmarks/bench_planner.py --dry-run              # CPU: predictions only
    python benchmarks/bench_planner.py --device cpu --archs SmolLM2-135M --layers 2 --contexts 64  # code smoke test

Output: one JSON object per measurement on stdout (``--jsonl``), then a Markdown table for
``benchmarks/RESULTS.md`` and a JSON summary line with the worst error.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emloc_engine.catalog.model_facts import REFERENCE_CONFIGS, ModelFacts, facts_from_config
from emloc_engine.core.ranks import rank_for_ratio
from emloc_engine.run.planning import GIB, PlanConfig, inference_peak, training_peak
from emloc_engine.weights.headers import load_config

DEFAULT_ARCHS = ("Llama-3-8B", "Qwen2.5-7B", "Mistral-7B")


def _configs(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    if args.model_dir:
        cfg = load_config(Path(args.model_dir))
        out = [(Path(args.model_dir).name, cfg)]
    else:
        out = [(a, dict(REFERENCE_CONFIGS[a])) for a in args.archs.split(",")]
    if args.layers:
        for _, c in out:
            c["num_hidden_layers"] = args.layers
    return out


def predictions(facts: ModelFacts, context: int, batch: int, rank: int, ratio: float | None) -> dict[str, int]:
    cfg = PlanConfig(context_length=context, batch_size=batch, lora_rank=rank)
    if ratio is None:
        return {"inference": inference_peak(facts, cfg).allocated_bytes,
                "full_lora": training_peak(facts, cfg, 1.0, name="full_lora", chunked_loss=False).allocated_bytes}
    return {"emulator_train": training_peak(facts, cfg, ratio).allocated_bytes}


# ------------------------------------------------------------------------------------------------
# measurements (torch imported lazily so --dry-run needs no GPU)


def _checkpointing(model: Any, on: bool) -> None:
    """Non-reentrant activation checkpointing, switched the way emloc_engine.stages.training.trainer does it."""
    if on:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:  # transformers >= 5
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()


class Bench:
    def __init__(self, name: str, config: dict[str, Any], device: str, batch: int, rank: int, steps: int) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        self.torch = torch
        self.name, self.device, self.batch, self.rank, self.steps = name, torch.device(device), batch, rank, steps
        kw = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "torch_dtype")}
        self.hf_config = AutoConfig.for_model(config["model_type"], **kw)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        t0 = time.perf_counter()
        with self.device:
            self.model = AutoModelForCausalLM.from_config(self.hf_config, dtype=self.dtype)
        self.model.eval()
        self.build_s = time.perf_counter() - t0
        self.vocab = int(self.hf_config.vocab_size)

    def _reset(self) -> int:
        torch = self.torch
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return int(torch.cuda.memory_allocated())
        return 0

    def _peak(self) -> int | None:
        if self.device.type != "cuda":
            return None
        self.torch.cuda.synchronize()
        return int(self.torch.cuda.max_memory_allocated())

    def _ids(self, context: int) -> Any:
        g = self.torch.Generator(device="cpu").manual_seed(context)
        ids = self.torch.randint(4, self.vocab, (self.batch, context), generator=g)
        return ids.to(self.device)

    def inference(self, context: int) -> int | None:
        self._reset()
        with self.torch.no_grad():
            out = self.model(input_ids=self._ids(context), use_cache=True)
            del out
        return self._peak()

    def full_lora(self, context: int) -> int | None:
        from peft import LoraConfig, get_peft_model

        from emloc_engine.core.architectures import arch_spec

        targets = list(arch_spec(self.hf_config).short_names)
        peft_model = get_peft_model(self.model, LoraConfig(r=self.rank, lora_alpha=2 * self.rank, lora_dropout=0.05,
                                                           target_modules=targets, task_type="CAUSAL_LM"))
        return self._train_peak(peft_model, context, lambda batch: peft_model(**batch).loss, mask=False)

    def _train_peak(self, peft_model: Any, context: int, loss_of: Any, mask: bool) -> int | None:
        """``self.steps`` AdamW steps of ``peft_model`` with checkpointing on a random ``B×T`` batch
        (``input_ids``, ``labels``, and with ``mask`` an all-ones ``attention_mask``), loss ``loss_of(batch)``;
        returns the peak memory, then removes the LoRA layers again."""
        torch = self.torch
        base = peft_model.get_base_model()
        base.config.use_cache = False
        _checkpointing(base, True)
        peft_model.train()
        opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4,
                                fused=self.device.type == "cuda")
        self._reset()
        ids = self._ids(context)
        batch = {"input_ids": ids, "labels": ids}
        if mask:
            batch["attention_mask"] = torch.ones_like(ids)
        for _ in range(self.steps):
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.device.type == "cuda"):
                loss = loss_of(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss
        peak = self._peak()
        del opt
        self.model = peft_model.unload()
        _checkpointing(base, False)
        self.model.eval()
        return peak

    def compress(self, ratio: float) -> None:
        """Swap every block linear (dense or low-rank) for a random LowRankLinear of rank k(ρ)."""
        from emloc_engine.core.architectures import arch_spec
        from emloc_engine.weights.lowrank import LowRankLinear

        torch = self.torch
        spec = arch_spec(self.hf_config)
        layers = self.model.get_submodule(spec.block_prefix)
        for layer in layers:
            for name in spec.linear_modules:
                parent_name, leaf = name.rsplit(".", 1)
                parent = layer.get_submodule(parent_name)
                old = getattr(parent, leaf)
                k = rank_for_ratio(ratio, old.out_features, old.in_features)
                has_bias = (old.u.bias if isinstance(old, LowRankLinear) else old.bias) is not None
                setattr(parent, leaf, None)  # free the old module before allocating the new one
                del old
                out_f, in_f = self._shape(name)
                new_mod = LowRankLinear(in_f, out_f, k, has_bias, device=self.device, dtype=self.dtype)
                with torch.no_grad():
                    new_mod.u.weight.normal_(0, 0.02)
                    new_mod.v.weight.normal_(0, 0.02)
                setattr(parent, leaf, new_mod)
        gc.collect()

    def _shape(self, name: str) -> tuple[int, int]:
        from emloc_engine.catalog.model_facts import _config_modules

        cfg = self.hf_config.to_dict()
        m = next(x for x in _config_modules(cfg, (name,)))
        return m.out_features, m.in_features

    def emulator_train(self, context: int) -> int | None:
        from emloc_engine.core.architectures import arch_spec
        from emloc_engine.stages.training.lora_layers import attach_lora, lora_config
        from emloc_engine.stages.training.trainer import lm_loss_sum

        peft_model = attach_lora(self.model, lora_config(self.rank, 2.0 * self.rank, 0.05,
                                                         arch_spec(self.hf_config).short_names, False))
        base = peft_model.get_base_model()
        return self._train_peak(peft_model, context, lambda b: lm_loss_sum(base, b) / b["input_ids"].numel(),
                                mask=True)

    def close(self) -> None:
        del self.model
        self._reset()


# ------------------------------------------------------------------------------------------------


def _row(arch: str, stage: str, ratio: float | None, context: int, predicted: int, measured: int | None) -> dict[str, Any]:
    err = None if not measured else 100.0 * (predicted - measured) / measured
    return {"arch": arch, "stage": stage, "ratio": ratio, "context": context,
            "predicted_gib": round(predicted / GIB, 3), "measured_gib": None if measured is None else round(measured / GIB, 3),
            "error_pct": None if err is None else round(err, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=",".join(DEFAULT_ARCHS), help=f"Comma list of {', '.join(REFERENCE_CONFIGS)}.")
    ap.add_argument("--model-dir", default=None, help="Use the shapes of this local model instead (weights not read).")
    ap.add_argument("--ratios", default="0.3,0.5,0.7")
    ap.add_argument("--contexts", default="512,1024")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2, help="Optimizer steps per training measurement (≥2: AdamW states).")
    ap.add_argument("--layers", type=int, default=None, help="Override num_hidden_layers (smaller, faster runs).")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-full-lora", action="store_true", help="Skip the plain-LoRA measurement.")
    ap.add_argument("--dry-run", action="store_true", help="Predictions only; no torch, no GPU.")
    ap.add_argument("--jsonl", action="store_true", help="Print one JSON object per measurement as it is taken.")
    args = ap.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        if args.jsonl:
            print(json.dumps(row), flush=True)

    for arch, config in _configs(args):
        facts = facts_from_config(config, name=arch)
        bench = None if args.dry_run else Bench(arch, config, args.device, args.batch, args.rank, args.steps)
        for t in contexts:
            pred = predictions(facts, t, args.batch, args.rank, None)
            emit(_row(arch, "inference", None, t, pred["inference"], bench.inference(t) if bench else None))
            if not args.no_full_lora:
                emit(_row(arch, "full_lora", 1.0, t, pred["full_lora"], bench.full_lora(t) if bench else None))
        for r in ratios:
            if bench:
                bench.compress(r)
            for t in contexts:
                pred = predictions(facts, t, args.batch, args.rank, r)
                emit(_row(arch, "emulator_train", r, t, pred["emulator_train"], bench.emulator_train(t) if bench else None))
        if bench:
            bench.close()
    print("\n| arch | stage | ρ | context | predicted GiB | measured GiB | error % |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        measured = "-" if r["measured_gib"] is None else f"{r['measured_gib']:.2f}"
        ratio = "-" if r["ratio"] is None else r["ratio"]
        err = "-" if r["error_pct"] is None else r["error_pct"]
        print(f"| {r['arch']} | {r['stage']} | {ratio} | {r['context']} | {r['predicted_gib']:.2f} | {measured} | {err} |")
    errs = [abs(r["error_pct"]) for r in rows if r["error_pct"] is not None]
    summary = {"n": len(rows), "measured": len(errs), "max_abs_error_pct": max(errs) if errs else None,
               "within_10pct": sum(e <= 10 for e in errs), "wall_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps({"summary": summary, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
