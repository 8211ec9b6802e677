"""Bigger than the GPU: the planner's answer for models whose weights do not fit the card (arithmetic, no GPU).

Every row is exactly what ``emloc plan`` prints for a config-only model folder of that shape
(``benchmarks/make_random_model.py``'s presets, written as ``config.json`` without weights) on a card
of that size, all of it free: the run's defaults (512 tokens, batch 4, LoRA r 16, 100 steps, anchors
under 4 GiB of RAM), the default budget (the card less ``max(0.5 GiB, 5 %)``), and the machine's RAM
as given. The 16 GiB and 8 GiB rows are the issue's acceptance runs: an H200 capped with
``--gpu-memory`` standing in for a 16 GB and an 8 GB card.

    python benchmarks/plan_bigger.py              # prints the tables
    python benchmarks/plan_bigger.py --write      # and writes them into benchmarks/RESULTS.md

The same numbers from the command line (one row)::

    python benchmarks/make_random_model.py --arch qwen2.5-32b --out /tmp/q32 --config-only
    emloc plan /tmp/q32 --gpu-gib 24 --gpu-name "RTX 4090" --ram-gib 64
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_random_model import model_config

from emloc_engine.cli.commands.plan import plan_config_of
from emloc_engine.cli.main import build_parser
from emloc_engine.core.progress import format_seconds
from emloc_engine.run.planning import MemoryPlan, model_facts, plan_memory

GIB = 2**30
BEGIN, END = "<!-- bigger-plans:begin -->", "<!-- bigger-plans:end -->"
DATE = "2026-12-06"
# (preset, card name for the time model, card GiB, RAM GiB, extra emloc plan options)
CASES: tuple[tuple[str, str, float, float, tuple[str, ...]], ...] = (
    ("qwen2.5-32b", "RTX 4090", 24, 64, ()),
    ("qwen2.5-32b", "RTX 6000 Ada", 48, 128, ()),
    ("llama3-70b", "RTX 4090", 24, 64, ()),
    ("llama3-70b", "RTX 4090", 24, 64, ("--batch", "1")),
    ("llama3-70b", "RTX 6000 Ada", 48, 192, ()),
    ("qwen2.5-14b", "H200", 16, 128, ()),
    ("llama3-8b", "H200", 8, 128, ()),
)


def write_config(preset: str, folder: Path) -> Path:
    """A config-only model folder of ``preset`` (the planner reads shapes from config.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model_config(preset)))
    return folder


def argv_of(folder: Path, gpu: str, gib: float, ram: float, extra: tuple[str, ...]) -> list[str]:
    return ["plan", str(folder), "--gpu-gib", f"{gib:g}", "--gpu-name", gpu, "--ram-gib", f"{ram:g}", *extra]


def plan_case(folder: Path, gpu: str, gib: float, ram: float, extra: tuple[str, ...]) -> MemoryPlan:
    args = build_parser().parse_args(argv_of(folder, gpu, gib, ram, extra))
    return plan_memory(model_facts(folder), plan_config_of(args))


def row(preset: str, gpu: str, gib: float, ram: float, extra: tuple[str, ...], plan: MemoryPlan) -> str:
    weights = plan.inference.parts[0][1] / GIB
    card = f"{gpu} {gib:g} GiB, RAM {ram:g} GiB" + (f" ({' '.join(extra)})" if extra else "")
    if plan.ratio is None or not plan.fits:
        why = "; ".join(f.message for f in plan.shortfalls) or plan.reason
        return f"| {preset} | {card} | {weights:.1f} | — | cannot train: {why} | | | | | |"
    peak = max(s.peak_bytes for s in plan.stages) / GIB
    t = {s.name: format_seconds(s.est_seconds) for s in plan.stages}
    original = "streamed" if plan.stream_original else "resident"
    anchors = f"{plan.anchor_ram_bytes / GIB:.1f} GiB × {plan.anchor_chunks}" if plan.anchor_chunks else "off"
    return (
        f"| {preset} | {card} | {weights:.1f} | {plan.ratio:.2f} | {original} | {peak:.2f} of "
        f"{plan.budget_bytes / GIB:.2f} | {plan.ram_bytes / GIB:.1f} | {anchors} | "
        f"{t['emulator']} / {t['train']} / {t['correct']} / {t['export']} | {format_seconds(plan.total_seconds)} |"
    )


def render(tmp: Path) -> str:
    out = [
        BEGIN,
        "## Bigger than the GPU: plans",
        "",
        f"{DATE} · planner arithmetic only (no GPU, no weights): config-only folders of "
        "`benchmarks/make_random_model.py`'s presets, `emloc plan` with the run's defaults (512 tokens, batch 4, "
        "LoRA r 16 on every linear, 100 steps, λ auto, anchors capped at 4 GiB of RAM), the whole card free, "
        "the default budget = card − max(0.5 GiB, 5%). Streamed passes are predicted from bytes / bandwidth, "
        "as the code moves the weights: pinned RAM → GPU at 55 GB/s (measured, H200 host, PCIe Gen5; 25 GB/s on "
        "PCIe 4.0 cards: RTX 4090, RTX 6000 Ada) for anchor chunks after the first when the original fits a "
        "quarter of the RAM (held in pinned RAM, counted in the RAM column), the page cache at 5 GB/s "
        "(unmeasured) when it fits the rest of the RAM, else the disk at a conservative 1 GB/s; "
        "each pass × 1.3. The 16 and 8 GiB rows are the acceptance runs' plans (an H200 under `--gpu-memory`). "
        "Command: `python benchmarks/plan_bigger.py --write`; one row by hand: "
        '`emloc plan FOLDER --gpu-gib 24 --gpu-name "RTX 4090" --ram-gib 64`.',
        "",
        "| model | card | bf16 weights GiB | ρ | original | highest stage peak GiB (of budget) | RAM GiB | "
        "anchors (RAM × chunks) | time: emulator / train / correct / export | total |",
        "|---|---|---:|---:|---|---|---:|---|---|---:|",
    ]
    commands = []
    for preset, gpu, gib, ram, extra in CASES:
        folder = write_config(preset, tmp / preset)
        plan = plan_case(folder, gpu, gib, ram, extra)
        out.append(row(preset, gpu, gib, ram, extra, plan))
        commands.append(
            "emloc "
            + " ".join(
                a if " " not in a else f'"{a}"' for a in argv_of(Path(f"/tmp/{preset}"), gpu, gib, ram, extra)
            )
        )
    out += [
        "",
        "Rows as commands (after `python benchmarks/make_random_model.py --arch PRESET --out /tmp/PRESET "
        "--config-only`):",
        "",
        "```",
        *commands,
        "```",
        "",
        'Reading it: "streamed" means the original\'s resident use (weights + activations) exceeds the budget, '
        "so the anchors, the λ search and the export verification run it block by block from the shards "
        "(two blocks, the embeddings and head, and one batch's activations on the GPU); every stage's "
        "predicted peak stays under the budget. The train time includes computing the anchors a chunk at a "
        "time: each chunk is one more pass over the original, so with the weights larger than the page "
        "cache (70B with 64 GiB of RAM) the disk bounds it; `--anchor-ram-gib` larger means fewer chunks. "
        "Time estimates are rough (±50%; GPU rates of `PlannerConstants`).",
        "",
        END,
    ]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="Write the section into benchmarks/RESULTS.md.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        section = render(Path(tmp))
    print(section)
    if args.write:
        from results_md import write_section

        write_section(section, BEGIN, END, after="<!-- plans:end -->")


if __name__ == "__main__":
    main()
