"""Benchmark GGUF in, streamed (issue 18): emulator build straight from a Q4_K_M-sized GGUF vs convert-then-build.

The GGUF has Llama-3-8B shapes (32 blocks, hidden 4096, MLP 14336, 32/8 heads, vocab 128256) and random
weights laid out like llama.cpp's Q4_K_M: Q4_K for token_embd, attn_q/k/output, ffn_gate/up; Q6_K for
attn_v, ffn_down and output; F32 norms (5.2 GB; a real Q4_K_M of Llama-3-8B is 4.9 GB). gguf 0.19
cannot *quantize* K-quants, so the blocks are written directly: random 4/6-bit codes with constant
sub-scales and super-scales chosen so every weight has mean 0 and std ≈ 0.02 (speed and memory do not
depend on the values).

Two paths, each in its own process (so one's memory cannot show up in the other's peak RSS):

* ``streamed``: the model view (config + tokenizer from the metadata, no weights), then
  ``build_emulator`` reading every tensor from the GGUF, dequantized one at a time;
* ``convert``: what EMLoC did before (main at 0231445, ``convert_gguf_to_safetensors``): transformers
  loads the whole GGUF dequantized (``GgufConfig(dequantize=True)``), a plain model is rebuilt and
  saved as 16 GB of bf16 safetensors, then ``build_emulator`` from that folder.

Reported per path: wall time of each step, peak CPU RSS (sampled), the peak of the GGUF source's live
dequantized tensors (streamed path), peak GPU memory, and disk written.

    python benchmarks/bench_gguf_stream.py --work /tmp/ggufbench --json benchmarks/results/gguf_stream.json
    python benchmarks/bench_gguf_stream.py --work /tmp/ggufbench-tiny --tiny      # CPU smoke run (2 small blocks)

Writing the GGUF and both paths take well over 10 minutes (on an H100 host, 2026-12-06, writing the file and the
streamed path together did not finish in 400 s); to stay under a 10-minute command limit run three commands with
the same --work and --json (each adds its step to the file, saved as the step ends):

    python benchmarks/bench_gguf_stream.py --work /tmp/ggufbench --json benchmarks/results/gguf_stream.json --paths write
    python benchmarks/bench_gguf_stream.py --work /tmp/ggufbench --json benchmarks/results/gguf_stream.json --paths streamed
    python benchmarks/bench_gguf_stream.py --work /tmp/ggufbench --json benchmarks/results/gguf_stream.json --paths convert

Needs about 5.2 (GGUF) + 16 (converted) + 2 × 6.5 (emulators, each removed after its path) GB of disk.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMA3_8B = dict(hidden=4096, inter=14336, layers=32, heads=32, kv_heads=8, vocab=128256)
TINY = dict(hidden=256, inter=512, layers=2, heads=4, kv_heads=2, vocab=1024)
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


# -- the file ------------------------------------------------------------------------------------------
def _fp16_bytes(x: float) -> np.ndarray:
    return np.frombuffer(np.float16(x).tobytes(), dtype=np.uint8)


def kquant_blocks(rows: int, cols: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Random Q4_K / Q6_K blocks whose weights have mean 0 and std ≈ 0.02.

    Q4_K (144 B / 256 weights: d, dmin, 12 packed 6-bit scale/min bytes, 128 B of 4-bit codes): every
    scale byte 0x88 gives sub-block scale = min = 8 (sub-blocks 0-3) or 40 (4-7), so
    ``w = sc·(d·q − dmin) = sc·d·(q − 7.5)`` with ``dmin = 7.5·d``. Q6_K (210 B: 128 B low bits, 64 B high
    bits, 16 int8 scales, d): ``w = d·sc·(q − 32)``, zero-mean for uniform codes.
    """
    size = 144 if kind == "Q4_K" else 210
    n_blocks = cols // 256
    raw = np.frombuffer(rng.bytes(rows * n_blocks * size), dtype=np.uint8).reshape(rows, n_blocks, size).copy()
    if kind == "Q4_K":
        d = 0.02 / (24 * 4.6)
        raw[..., 0:2] = _fp16_bytes(d)
        raw[..., 2:4] = _fp16_bytes(7.5 * d)
        raw[..., 4:16] = 0x88
    else:
        raw[..., 192:208] = 8
        raw[..., 208:210] = _fp16_bytes(0.02 / (8 * 18.5))
    return raw.reshape(rows, n_blocks * size)


def _tensors(s: dict[str, int]) -> list[tuple[str, tuple[int, int] | tuple[int], str]]:
    h, hd = s["hidden"], s["hidden"] // s["heads"]
    out: list[tuple[str, Any, str]] = [("token_embd.weight", (s["vocab"], h), "Q4_K")]
    for b in range(s["layers"]):
        p = f"blk.{b}."
        out += [(p + "attn_norm.weight", (h,), "F32"),
                (p + "attn_q.weight", (h, h), "Q4_K"),
                (p + "attn_k.weight", (s["kv_heads"] * hd, h), "Q4_K"),
                (p + "attn_v.weight", (s["kv_heads"] * hd, h), "Q6_K"),
                (p + "attn_output.weight", (h, h), "Q4_K"),
                (p + "ffn_norm.weight", (h,), "F32"),
                (p + "ffn_gate.weight", (s["inter"], h), "Q4_K"),
                (p + "ffn_up.weight", (s["inter"], h), "Q4_K"),
                (p + "ffn_down.weight", (h, s["inter"]), "Q6_K")]
    return [*out, ("output_norm.weight", (h,), "F32"), ("output.weight", (s["vocab"], h), "Q6_K")]


def _byte_alphabet() -> list[str]:
    """GPT-2's byte → character spelling (printable Latin-1 as itself, the other bytes from U+0100 on)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def _merges(symbols: list[str], n: int) -> list[str]:
    """``n`` BPE merges over single-character ``symbols``: every pair, then pair + symbol, each making a new token.

    A real Q4_K_M of Llama-3 carries its 280k merges; without them transformers rebuilds them from the vocabulary,
    at ~250 tokens/s for 128k tokens (over 8 minutes, found on the H100 on 2026-12-06), which would time the
    tokenizer instead of the weights.
    """
    pairs = [f"{a} {b}" for a in symbols for b in symbols]
    out = pairs[:n]
    if n > len(pairs):
        out += [f"{a}{b} {c}" for a in symbols for b in symbols for c in symbols][: n - len(pairs)]
    return out


def write_q4km_gguf(path: Path, s: dict[str, int], seed: int = 0) -> dict[str, Any]:
    """Write the random Q4_K_M-like GGUF, one tensor in memory at a time."""
    import gguf

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("random Llama-3-8B shapes Q4_K_M")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    w.add_context_length(8192)
    w.add_embedding_length(s["hidden"])
    w.add_block_count(s["layers"])
    w.add_feed_forward_length(s["inter"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_rope_dimension_count(s["hidden"] // s["heads"])
    w.add_vocab_size(s["vocab"])
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
    symbols = _byte_alphabet()  # the 256 single-character tokens of a byte-level BPE, as GPT-2 spells bytes
    merges = _merges(symbols, s["vocab"] - len(specials) - len(symbols))
    tokens = specials + symbols + ["".join(m.split(" ")) for m in merges]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(3)
    w.add_chat_template(CHATML)
    plan = _tensors(s)
    q = gguf.GGMLQuantizationType
    for name, shape, kind in plan:
        if kind == "F32":
            w.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
        else:
            nbytes = shape[0] * shape[1] // 256 * (144 if kind == "Q4_K" else 210)
            w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=q[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, shape, kind in plan:
        if kind == "F32":
            w.write_tensor_data(rng.uniform(0.8, 1.2, size=shape).astype(np.float32))
        else:
            w.write_tensor_data(kquant_blocks(shape[0], shape[1], kind, rng))
    w.close()
    return {"gguf_bytes": path.stat().st_size, "write_s": round(time.perf_counter() - t0, 1)}


# -- the two paths ---------------------------------------------------------------------------------------
def _calibration(vocab: int, samples: int, length: int) -> tuple[tuple[int, ...], ...]:
    rng = np.random.default_rng(0)
    return tuple(tuple(int(x) for x in rng.integers(260, vocab, size=length)) for _ in range(samples))


def _build(model_dir: Path, out: Path, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    import torch

    from emloc_engine.stages.emulator.builder import EmulatorConfig, build_emulator

    t0 = time.perf_counter()
    result = build_emulator(EmulatorConfig(model_dir=model_dir, out_dir=out, ratio=args.ratio, device=args.device,
                                           calibration_ids=_calibration(vocab, args.samples, args.length)))
    wall = time.perf_counter() - t0
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    emu_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    shutil.rmtree(out)
    return {"build_s": round(wall, 1), "peak_gpu_gib": round(result.peak_vram_gib, 2),
            "emulator_bytes": emu_bytes}


def run_streamed(gguf_path: Path, work: Path, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    from emloc_engine.catalog.gguf_import import make_gguf_view
    from emloc_engine.machine.process_memory import RssSampler
    from emloc_engine.weights.gguf_source import MATERIALISED

    with RssSampler() as rss:
        t0 = time.perf_counter()
        view = make_gguf_view(gguf_path, work / "view", overwrite=True)
        view_s = time.perf_counter() - t0
        MATERIALISED.reset()
        out = _build(view, work / "emu-streamed", args, vocab)
    disk = sum(f.stat().st_size for f in view.iterdir())
    return {"path": "streamed", "view_s": round(view_s, 1), **out, "total_s": round(view_s + out["build_s"], 1),
            "peak_rss_gib": round(rss.peak_bytes / 2**30, 3),
            "peak_live_dequantized_gib": round(MATERIALISED.peak / 2**30, 3),
            "dequantized_total_gib": round(MATERIALISED.total / 2**30, 3), "disk_written_bytes": disk}


def legacy_convert(gguf_path: Path, out_dir: Path) -> None:
    """EMLoC's conversion before issue 18 (main at 0231445), condensed: whole model dequantized in RAM, saved as bf16."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16,
                                                  quantization_config=GgufConfig(dequantize=True))
    cfg = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    config = type(loaded.config).from_dict(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in loaded.state_dict().items()}
    model.load_state_dict(state, strict=False, assign=True)
    for bname, buf in loaded.named_buffers():
        owner, _, leaf = bname.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buf
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)


def run_convert(gguf_path: Path, work: Path, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    from emloc_engine.machine.process_memory import RssSampler

    out_dir = work / "converted"
    with RssSampler() as rss_convert:
        t0 = time.perf_counter()
        legacy_convert(gguf_path, out_dir)
        convert_s = time.perf_counter() - t0
    disk = sum(f.stat().st_size for f in out_dir.iterdir())
    with RssSampler() as rss:
        out = _build(out_dir, work / "emu-converted", args, vocab)
    if not args.keep:
        shutil.rmtree(out_dir)
    return {"path": "convert", "convert_s": round(convert_s, 1), **out,
            "total_s": round(convert_s + out["build_s"], 1),
            "peak_rss_convert_gib": round(rss_convert.peak_bytes / 2**30, 3),
            "peak_rss_gib": round(max(rss.peak_bytes, rss_convert.peak_bytes) / 2**30, 3),
            "disk_written_bytes": disk}


BEGIN, END = "<!-- gguf-stream:begin -->", "<!-- gguf-stream:end -->"


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def render(report: dict[str, Any], source: str) -> str:
    """RESULTS.md's section, made from one recorded JSON (never typed in)."""
    st, cv = report["streamed"], report["convert"]
    sh = report["shapes"]
    lines = [
        BEGIN,
        "## GGUF in, streamed: a Q4_K_M file of Llama-3-8B shapes (issue 18)",
        "",
        f"{report['date'][:10]} · {report['device']} · torch {report['torch']} · "
        f"{sh['layers']} blocks, hidden {sh['hidden']}, MLP {sh['inter']}, vocab {sh['vocab']}; random weights in "
        f"llama.cpp's Q4_K_M layout ({_gib(report['gguf_bytes'])} file); emulator at ρ {report['ratio']} from "
        f"{report['samples']} × {report['length']} calibration tokens  ",
        "Command: three calls on one warm machine, `T=… PATHS=write`, `PATHS=streamed`, `PATHS=convert` "
        f"`bash benchmarks/device/issue18_gguf_stream.sh` (runs `{report['command']}`)  ",
        f"Numbers: `{source}`; rendered by `python benchmarks/bench_gguf_stream.py --render {source}`.",
        "",
        "| path | before the build | emulator build | total | peak RAM (RSS) | written to disk | peak GPU |",
        "|---|---|---|---|---|---|---|",
        f"| streamed from the GGUF (now) | view {st['view_s']:.0f} s | {st['build_s']:.0f} s | {st['total_s']:.0f} s | "
        f"{st['peak_rss_gib']:.1f} GiB | {_gib(st['disk_written_bytes'])} | {st['peak_gpu_gib']:.2f} GiB |",
        f"| convert to bf16, then build (before) | convert {cv['convert_s']:.0f} s | {cv['build_s']:.0f} s | "
        f"{cv['total_s']:.0f} s | {cv['peak_rss_gib']:.1f} GiB | {_gib(cv['disk_written_bytes'])} | "
        f"{cv['peak_gpu_gib']:.2f} GiB |",
        "",
        f"Reading: the streamed path never holds more than {st['peak_live_dequantized_gib']:.2f} GiB of dequantized "
        f"weights at once and writes only the view's small files, against {cv['peak_rss_gib']:.0f} GiB of RAM and "
        f"{cv['disk_written_bytes'] / 1e9:.0f} GB of bf16 shards for the conversion; it is "
        f"{cv['total_s'] / st['total_s']:.2f}× as fast end to end. Its build is slower "
        f"({st['build_s']:.0f} vs {cv['build_s']:.0f} s) because every weight is dequantized by gguf's numpy code "
        "on the CPU during the build (the conversion paid that before); its view step is mostly reading the file's "
        "metadata (128k tokens and merges) with gguf's reader, four times (since this run the engine reads the "
        "header with its own reader, `emloc_engine/weights/gguf_header.py`; transformers still reads it twice for "
        "the config and the tokenizer). "
        f"*{st['dequantized_total_gib']:.1f} GiB handed out* counts each weight once as fp32 scratch plus its bf16 "
        "copy (6 bytes a weight): every weight is dequantized once, the embedding table twice (bf16 and fp32).",
        END,
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, help="Folder for the GGUF, the view and the converted copy.")
    ap.add_argument("--render", type=Path, metavar="JSON", help="Write RESULTS.md's section from a recorded JSON.")
    ap.add_argument("--json", type=Path, help="Also write the report here.")
    ap.add_argument("--tiny", action="store_true", help="2 blocks of width 256 (a CPU smoke run).")
    ap.add_argument("--phase", choices=("all", "streamed", "convert"), default="all")
    ap.add_argument("--paths", default="streamed,convert",
                    help="Which paths to run (comma-separated; 'write' alone only writes the GGUF). With --json, "
                         "results already in that file are kept, so the steps can run as separate commands.")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--device", default=None, help="Default: cuda when present, else cpu.")
    ap.add_argument("--keep", action="store_true", help="Keep the converted folder.")
    args = ap.parse_args()
    if args.render:
        from results_md import write_section

        write_section(render(json.loads(args.render.read_text()), str(args.render)), BEGIN, END,
                      after="<!-- llamacpp:end -->")
        return
    if args.work is None:
        ap.error("--work is required (a scratch folder), unless --render is given")
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shapes = TINY if args.tiny else LLAMA3_8B
    if args.tiny:
        args.samples, args.length = min(args.samples, 8), min(args.length, 128)
    args.work.mkdir(parents=True, exist_ok=True)
    gguf_path = args.work / "store" / ("tiny-q4km.gguf" if args.tiny else "llama3-8b-shapes-Q4_K_M.gguf")
    if args.phase != "all":  # one path, in this process: print its JSON line
        fn = run_streamed if args.phase == "streamed" else run_convert
        print("RESULT " + json.dumps(fn(gguf_path, args.work, args, shapes["vocab"])), flush=True)
        return
    report: dict[str, Any] = {}
    if args.json and args.json.is_file():
        report = json.loads(args.json.read_text(encoding="utf-8"))
    report.update({"date": dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
                   "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
                   "torch": torch.__version__, "shapes": shapes, "samples": args.samples,
                   "length": args.length, "ratio": args.ratio})
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    if not gguf_path.exists():
        report["file"] = write_q4km_gguf(gguf_path, shapes)
    report["gguf_bytes"] = gguf_path.stat().st_size
    _save(report, args.json)  # each step is kept as it ends: a call cut off by its time limit loses only its own
    for phase in [p for p in ("streamed", "convert") if p in args.paths.split(",")]:
        cmd = [sys.executable, __file__, "--work", str(args.work), "--phase", phase, "--samples", str(args.samples),
               "--length", str(args.length), "--ratio", str(args.ratio), "--device", args.device]
        cmd += ["--tiny"] if args.tiny else []
        cmd += ["--keep"] if args.keep else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            report[phase] = {"error": proc.stderr[-3000:]}
        else:
            report[phase] = json.loads(lines[-1][len("RESULT "):])
        print(json.dumps({phase: report[phase]}), flush=True)
        _save(report, args.json)
    print(json.dumps(report, indent=2))


def _save(report: dict[str, Any], path: Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
