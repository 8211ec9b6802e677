"""CPU proxy study: which emulator construction stays closest to the original model, end to end?

The quality benchmark (:mod:`benchmarks.bench_quality`) found that the emulator *with its trained LoRA*
scores worse than the original *without* LoRA at every ρ ≤ 0.8: the emulator is far from the original,
the LoRA learns repairs, and repairs do not transfer. This probe ranks emulator constructions by how
close the emulator itself is to the original, with no training at all:

* ``loss``: the emulator's next-token loss on the Shakespeare task's held-out play (a fixed subset of
  its test sequences, the first ``--n-test``), next to the original's loss on the same tokens;
* ``kl``: mean per-token ``KL(original ‖ emulator)`` of the next-token distributions on those tokens.

Variants (``--variants``; ρ from ``--rhos``):

``aa-calib32`` / ``aa-calib256`` / ``aa-calib1024``
    the engine's activation-aware emulator (:func:`~emloc_engine.stages.emulator.builder.build_emulator`) with 32, 256
    or 1024 calibration windows (``calibration_token_ids(task.data, tok, n, seed=0)``).
``aa-calib256-alloc``
    plus the spectral rank allocation of :func:`benchmarks.bench_quality.spectral_allocation`.
``aa-calib256-ends``
    the first and last decoder block kept dense, the other blocks compressed harder so that the kept
    fraction of the decoder linears' parameters is still ρ (rank overrides, see :func:`dense_ends_plan`).
``seq256`` / ``seq32``
    error-compensated sequential compression (:func:`write_sequential_emulator`, ``cross=True``):
    blocks in order, each linear fitted to the ORIGINAL linear's output on the original stream from the
    input it sees in the EMULATOR's stream (earlier blocks and earlier linears of the block already
    compressed).
``seq256-r0.01`` (any ridge after ``-r``)
    the same with ridge ``ε = 0.01 · mean diag Ĉ`` towards ``W`` (default 1e-6).
``gptq256``
    sequential, but only the emulator's own statistics (target ``W X̂``, no cross term).
``plain-svd``
    plain truncated SVD (:func:`benchmarks.bench_quality.write_plain_svd_emulator`).

Usage (CPU, ~2 cores)::

    nice -n 10 python benchmarks/probe_emulators.py --json /tmp/probe.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_quality import (
    _block_modules,
    _copy_side_files,
    _write_meta,
    spectral_allocation,
    write_plain_svd_emulator,
)
from benchmarks.tasks import demo_shakespeare_task
from emloc_engine.core.architectures import arch_spec, num_blocks
from emloc_engine.core.ranks import rank_for_ratio
from emloc_engine.data import calibration_token_ids, load_tokenizer, prepare_dataset
from emloc_engine.stages.emulator.builder import EmulatorConfig, build_emulator
from emloc_engine.stages.emulator.factorize import factorize
from emloc_engine.weights.checkpoint import Checkpoint
from emloc_engine.weights.headers import load_config
from emloc_engine.weights.lowrank import EMULATOR_META, load_emulator

DEFAULT_VARIANTS = ("aa-calib32", "aa-calib256", "aa-calib1024", "aa-calib256-alloc", "aa-calib256-ends",
                    "seq256", "gptq256", "seq32")


# --------------------------------------------------------------------------------------------------
# error-compensated sequential compression

class _Stop(Exception):  # control flow: stop a forward once the wanted input is captured
    pass


def _groups(spec: Any) -> list[list[str]]:
    """The block's linear modules in execution order, grouped by shared input (q/k/v, o, gate/up, down)."""
    paths = list(spec.linear_modules)
    order: list[list[str]] = []
    for head in ("q_proj", "o_proj", "gate_proj", "down_proj"):
        if head == "q_proj":
            grp = [p for p in paths if p.endswith(("q_proj", "k_proj", "v_proj"))]
        elif head == "gate_proj":
            grp = [p for p in paths if p.endswith(("gate_proj", "up_proj"))]
        else:
            grp = [p for p in paths if p.endswith(head)]
        if grp:
            order.append(grp)
    if sorted(p for grp in order for p in grp) != sorted(paths):
        raise ValueError(f"unsupported block layout: {paths}")
    return order


def _layer_out(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _capture(layer: torch.nn.Module, module: torch.nn.Module | None, hidden: list[torch.Tensor],
             kwargs: list[dict[str, Any]]) -> list[torch.Tensor]:
    """Run each chunk through ``layer``; return ``module``'s input (tokens × in) per chunk, or the
    layer's output when ``module`` is None. The forward stops at ``module`` (nothing after it runs)."""
    got: list[torch.Tensor] = []

    def hook(_m: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        got.append(args[0].reshape(-1, args[0].shape[-1]).float())
        raise _Stop

    handle = module.register_forward_pre_hook(hook) if module is not None else None
    outs = []
    try:
        with torch.no_grad():
            for h, kw in zip(hidden, kwargs, strict=True):
                with contextlib.suppress(_Stop):
                    outs.append(_layer_out(layer(h, **kw)))
    finally:
        if handle is not None:
            handle.remove()
    return got if module is not None else outs


def _block_inputs(model: Any, layers: torch.nn.ModuleList, ids: torch.Tensor, chunk: int,
                  ) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Block 0's input hidden states and keyword arguments, one entry per chunk of ``chunk`` windows."""
    hidden: list[torch.Tensor] = []
    kwargs: list[dict[str, Any]] = []

    def hook(_m: torch.nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
        kw = dict(kw)
        h = args[0] if args else kw.pop("hidden_states")
        kw.pop("past_key_values", None)
        kw.pop("past_key_value", None)
        kw["use_cache"] = False
        hidden.append(h.detach().float())
        kwargs.append(kw)
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for start in range(0, ids.shape[0], chunk):
                with contextlib.suppress(_Stop):
                    model(input_ids=ids[start:start + chunk], use_cache=False)
    finally:
        handle.remove()
    return hidden, kwargs


def write_sequential_emulator(model_dir: Path, out_dir: Path, calibration: Sequence[Sequence[int]], ratio: float,
                              *, cross: bool = True, ridge: float = 1e-6, chunk: int = 16,
                              device: str | torch.device = "cpu", rank_overrides: dict[str, int] | None = None,
                              log: Callable[[str], None] = lambda _: None) -> Path:
    """Error-compensated sequential activation-aware SVD, written in the emulator file format.

    Blocks are processed in order; within a block, the linears in execution order (q/k/v, o, gate/up,
    down). For linear ``W`` let ``X̂`` be its input in the EMULATOR (every earlier block and earlier
    linear of this block already compressed) and ``X`` its input in the ORIGINAL model. With
    ``cross=True`` the factors minimise ``‖X̂ W'ᵀ − X Wᵀ‖_F`` over rank-``k`` ``W'``: the unconstrained
    minimiser is ``W* = (W XᵀX̂ + εW)(X̂ᵀX̂ + εI)⁻¹`` (fp64, ``ε = ridge · mean diag Ĉ``; the ridge
    ``ε‖W' − W‖²`` pulls towards the original weight, not towards 0), and because the
    least-squares residual is orthogonal to the column space of ``X̂``, the rank-``k`` optimum is the
    activation-aware truncation of ``W*`` with ``Ĉ = X̂ᵀX̂`` (:func:`emloc_engine.stages.emulator.factorize.factorize`).
    With ``cross=False`` (GPTQ-style) the target is ``W X̂``: ``factorize(W, Ĉ, k)``.

    Ranks: ``k = floor(ρ·out·in/(out+in))`` like the engine, or ``rank_overrides[name]``. Factors are
    stored in the checkpoint's dtype, and the stream continues through the stored (rounded) factors.
    All calibration activations of one block are held in ``device`` memory (fp32); the forward runs
    in fp32 and the statistics, solve and factorisation in fp64 on ``device``.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = load_config(model_dir)
    spec = arch_spec(config)
    ckpt = Checkpoint(model_dir)
    device = torch.device(device)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    layers = model.get_submodule(spec.block_prefix)
    ids = torch.tensor([list(s) for s in calibration], dtype=torch.long, device=device)
    hat, kwargs = _block_inputs(model, layers, ids, chunk)
    orig = [h.clone() for h in hat] if cross else []
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    modules: dict[str, Any] = {}
    groups = _groups(spec)
    for b in range(num_blocks(config)):
        t0 = time.monotonic()
        layer = layers[b]
        first = [layer.get_submodule(g[0]) for g in groups]
        xs: list[list[torch.Tensor]] = []
        if cross:  # the original block's linear inputs, then its output (the original stream moves on)
            for m in first:
                xs.append(_capture(layer, m, orig, kwargs))
            orig = _capture(layer, None, orig, kwargs)
        for gi, grp in enumerate(groups):
            xh = _capture(layer, first[gi], hat, kwargs)
            width = xh[0].shape[1]
            c_hat = torch.zeros(width, width, dtype=torch.float64, device=device)
            c_x = torch.zeros(width, width, dtype=torch.float64, device=device)  # X̂ᵀX
            for i, x in enumerate(xh):
                xd = x.double()
                c_hat += xd.T @ xd
                if cross:
                    c_x += xd.T @ xs[gi][i].double()
            del xh
            cache: dict[str, torch.Tensor] = {}
            if cross:
                eye = torch.eye(width, dtype=torch.float64, device=device)
                shift = ridge * float(torch.diagonal(c_hat).mean())
                while True:  # ε grows ×10 until Ĉ + εI factorises (it does at the first try in practice)
                    chol, info = torch.linalg.cholesky_ex(c_hat + shift * eye)
                    if int(info) == 0:
                        break
                    shift *= 10.0
            for path in grp:
                name = spec.module_name(b, path)
                lin = layer.get_submodule(path)
                w = lin.weight.detach().double()
                out_f, in_f = w.shape
                k = (rank_overrides or {}).get(name, rank_for_ratio(ratio, out_f, in_f))
                k = min(k, out_f, in_f)
                # W* = (W XᵀX̂ + εW)(X̂ᵀX̂ + εI)⁻¹: the ridge pulls towards W, not towards 0
                target = torch.cholesky_solve(c_x @ w.T + shift * w.T, chol).T if cross else w
                f = factorize(target, c_hat, k, dtype=torch.float64, cache=cache)
                stored = ckpt.info(f"{name}.weight").dtype
                dt = {"BF16": torch.bfloat16, "F16": torch.float16}.get(stored, torch.float32)
                u, v = f.u.to(dt).cpu(), f.v.to(dt).cpu()
                factors[name] = (u, v)
                modules[name] = {"ratio": ratio, "rank": k, "in_features": in_f, "out_features": out_f,
                                 "bias": lin.bias is not None}
                with torch.no_grad():
                    lin.weight.copy_((u.float() @ v.float()).to(device))
        if cross:
            del xs
        hat = _capture(layer, None, hat, kwargs)
        log(f"block {b}: {time.monotonic() - t0:.1f} s")
    tensors: dict[str, torch.Tensor] = {}
    for key in ckpt.names():
        module, _, leaf = key.rpartition(".")
        if module in factors and leaf == "weight":
            tensors[f"{module}.u.weight"] = factors[module][0].contiguous()
            tensors[f"{module}.v.weight"] = factors[module][1].contiguous()
        elif module in factors and leaf == "bias":
            tensors[f"{module}.u.bias"] = ckpt.get(key)
        else:
            tensors[key] = ckpt.get(key)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _copy_side_files(model_dir, out_dir)
    method = "sequential-error-compensated" if cross else "sequential-gptq-style"
    _write_meta(model_dir, out_dir, method, modules)
    return out_dir


# --------------------------------------------------------------------------------------------------
# plans expressible through the engine's builder

def dense_ends_plan(model_dir: Path, ratio: float) -> tuple[tuple[tuple[str, int], ...], tuple[str, ...]]:
    """Rank overrides + dense modules: first and last block dense, the rest at a lower ρ' such that the
    kept parameters of all decoder linears are ρ of the total (floor ranks, then +1 in turn to use up
    the rounding remainder)."""
    config = load_config(model_dir)
    spec = arch_spec(config)
    ckpt = Checkpoint(model_dir)
    blocks = num_blocks(config)
    shapes = {n: tuple(ckpt.info(f"{n}.weight").shape) for n in _block_modules(model_dir)}
    dense = tuple(spec.module_name(b, p) for b in (0, blocks - 1) for p in spec.linear_modules)
    total = sum(o * i for o, i in shapes.values())
    budget = ratio * total - sum(o * i for n, (o, i) in shapes.items() if n in dense)
    rest = [n for n in shapes if n not in dense]
    rest_total = sum(shapes[n][0] * shapes[n][1] for n in rest)
    inner = budget / rest_total
    ranks = {n: rank_for_ratio(inner, *shapes[n]) for n in rest}
    spent = sum(k * sum(shapes[n]) for n, k in ranks.items())
    progress = True
    while progress:
        progress = False
        for n in rest:
            cost = sum(shapes[n])
            if spent + cost <= budget:
                ranks[n] += 1
                spent += cost
                progress = True
    return tuple(ranks.items()), dense


def kept_fraction(model_dir: Path, emulator_dir: Path) -> float:
    meta = json.loads((emulator_dir / EMULATOR_META).read_text(encoding="utf-8"))
    ckpt = Checkpoint(model_dir)
    total = kept = 0
    for name in _block_modules(model_dir):
        o, i = ckpt.info(f"{name}.weight").shape
        total += o * i
        spec = meta["modules"].get(name)
        kept += o * i if spec is None else int(spec["rank"]) * (o + i)
    return kept / total


# --------------------------------------------------------------------------------------------------
# scoring: loss and KL(original ‖ emulator) on fixed test sequences

class Evaluator:
    """The original's next-token log-probabilities on fixed test sequences (kept in RAM) and the scores."""

    def __init__(self, model_dir: Path, test_ids: list[list[int]], labels: list[list[int]], batch: int = 8) -> None:
        from transformers import AutoModelForCausalLM

        self.batches = []
        for start in range(0, len(test_ids), batch):  # right padding, like bench_quality's Scorer
            group = list(range(start, min(start + batch, len(test_ids))))
            width = max(len(test_ids[i]) for i in group)
            ids = torch.zeros((len(group), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            lab = torch.full_like(ids, -100)
            for row, i in enumerate(group):
                n = len(test_ids[i])
                ids[row, :n], mask[row, :n], lab[row, :n] = torch.tensor(test_ids[i]), 1, torch.tensor(labels[i])
            self.batches.append((ids, mask, lab[:, 1:]))
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.ref: list[torch.Tensor] = []
        for ids, mask, target in self.batches:
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            self.ref.append(torch.log_softmax(logits[target != -100], -1))
        self.tokens = sum(int((t != -100).sum()) for _, _, t in self.batches)
        self.original = self.score(model)
        del model

    @torch.no_grad()
    def score(self, model: Any) -> dict[str, float]:
        nll = kl = 0.0
        for (ids, mask, target), ref in zip(self.batches, self.ref, strict=True):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            mask = target != -100
            logp = torch.log_softmax(logits[mask], -1)
            nll -= float(logp.gather(1, target[mask][:, None]).sum())
            kl += float((ref.exp() * (ref - logp)).sum())
        return {"loss": nll / self.tokens, "kl": kl / self.tokens}


# --------------------------------------------------------------------------------------------------
# the study

def build_variant(variant: str, ratio: float, model_dir: Path, out: Path, calib: Callable[[int], list[list[int]]],
                  cache: dict[Any, Any], log: Callable[[str], None]) -> dict[str, Any]:
    info: dict[str, Any] = {}
    if variant == "plain-svd":
        write_plain_svd_emulator(model_dir, out, ratio, torch.device("cpu"))
    elif variant.startswith(("seq", "gptq")):
        head, _, ridge = variant.partition("-r")  # seq256-r0.01: ridge 0.01
        n = int(head.removeprefix("seq").removeprefix("gptq"))
        write_sequential_emulator(model_dir, out, calib(n), ratio, cross=variant.startswith("seq"),
                                  ridge=float(ridge) if ridge else 1e-6, log=log)
    elif variant.startswith("aa-calib"):
        n = int(variant.removeprefix("aa-calib").split("-")[0])
        overrides: tuple[tuple[str, int], ...] = ()
        dense: tuple[str, ...] = ()
        if variant.endswith("-alloc"):
            overrides, dense = spectral_allocation(model_dir, calib(n), ratio, torch.device("cpu"), cache)
        elif variant.endswith("-ends"):
            overrides, dense = dense_ends_plan(model_dir, ratio)
        info["dense_modules"] = len(dense)
        cfg = EmulatorConfig(model_dir=model_dir, out_dir=out, calibration_ids=tuple(map(tuple, calib(n))),
                             ratio=ratio, rank_overrides=overrides, dense_patterns=dense, device="cpu",
                             overwrite=True)
        build_emulator(cfg)
    else:
        raise SystemExit(f"unknown variant {variant!r}")
    return info


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from emloc_engine.catalog.demo import ensure_demo_model

    model_dir = Path(args.model_dir) if args.model_dir else Path(ensure_demo_model())
    task = demo_shakespeare_task(max_length=128, seed=0)
    tok = load_tokenizer(model_dir)
    examples = list(prepare_dataset(task.test_data, tok).train)[: args.n_test]
    evaluator = Evaluator(model_dir, [list(e.input_ids) for e in examples], [list(e.labels) for e in examples])
    print(f"original: {evaluator.original} on {len(examples)} sequences, {evaluator.tokens} tokens", flush=True)
    calib_cache: dict[int, list[list[int]]] = {}

    def calib(n: int) -> list[list[int]]:
        if n not in calib_cache:
            calib_cache[n] = calibration_token_ids(task.data, tok, n=n, seed=0)
        return calib_cache[n]

    result: dict[str, Any] = {"model_dir": str(model_dir), "n_test": len(examples), "test_tokens": evaluator.tokens,
                              "original": evaluator.original, "rows": [],
                              "command": "python benchmarks/probe_emulators.py " + " ".join(sys.argv[1:])}
    cache: dict[Any, Any] = {}
    for spec in args.variants.split(","):
        variant, _, rhos = spec.partition(":")
        ratios = [float(r) for r in rhos.split("/")] if rhos else list(args.rhos)
        for ratio in ratios:
            out = Path(args.work_dir) / variant / f"rho-{ratio:g}"
            t = time.monotonic()
            info = build_variant(variant, ratio, model_dir, out, calib, cache,
                                 log=lambda m: print(m, file=sys.stderr, flush=True) if args.verbose else None)
            build_s = time.monotonic() - t
            emu = load_emulator(out, dtype=torch.float32, device="cpu")
            scores = evaluator.score(emu)
            del emu
            row = {"variant": variant, "ratio": ratio, "kept": kept_fraction(model_dir, out), **scores,
                   "build_s": build_s, **info}
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


def table(result: dict[str, Any]) -> str:
    o = result["original"]
    lines = [f"Original: loss {o['loss']:.4f} on {result['n_test']} test sequences ({result['test_tokens']} tokens).",
             "", "| variant | ρ | kept | loss | Δloss | KL(orig‖emu) | build s |", "|---|---|---|---|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: (r["ratio"], r["kl"])):
        lines.append(f"| {r['variant']} | {r['ratio']:g} | {100 * r['kept']:.1f}% | {r['loss']:.4f} | "
                     f"{r['loss'] - o['loss']:+.4f} | {r['kl']:.4f} | {r['build_s']:.0f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help="comma-separated; 'name:0.4/0.8' limits a variant to those ρ")
    p.add_argument("--rhos", type=lambda s: tuple(float(x) for x in s.split(",")), default=(0.4, 0.8))
    p.add_argument("--n-test", type=int, default=48, help="the first N test sequences of the held-out play")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model-dir", default=None)
    p.add_argument("--work-dir", default="/tmp/emloc-probe")
    p.add_argument("--json", default=None)
    p.add_argument("--verbose", action="store_true", help="per-block times of the sequential builds")
    args = p.parse_args(argv)
    result = run(args)
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
