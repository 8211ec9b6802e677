"""The README.md model card written next to every export: what was fine-tuned, on what, and how well.

Facts come from ``RUN_DIR/manifest.json`` (inputs, settings, stage results) and the corrected
adapter's ``emloc_correction.json``; either may be missing or partial (an adapter trained elsewhere,
an older run), and the card then says "not recorded" rather than failing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emloc_engine.core.json_files import read_json_object
from emloc_engine.core.version import __version__


@dataclass(frozen=True)
class CardFacts:
    """Everything the card states; ``None`` means not recorded."""

    base_model: str
    base_model_path: str
    kind: str  # "merged model", "LoRA adapter" or "GGUF"
    data: str | None = None
    ratio: float | None = None
    lambda_: float | None = None
    lambda_mode: str | None = None
    lambda_table: tuple[tuple[float, float], ...] = ()
    steps: int | None = None
    rank: int | None = None
    alpha: float | None = None
    final_eval_loss: float | None = None
    verification: tuple[tuple[str, float], ...] = ()
    extra: tuple[tuple[str, str], ...] = field(default=())


def _num(x: Any) -> float | None:
    if x == "inf":
        return math.inf
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v


def base_model_name(model_dir: Path) -> str:
    """``org/name`` for a Hugging Face cache snapshot (``models--org--name/snapshots/rev``), else the folder name."""
    parts = Path(model_dir).resolve().parts
    for i, part in enumerate(parts):
        if part.startswith("models--") and i + 2 < len(parts) and parts[i + 1] == "snapshots":
            return part[len("models--"):].replace("--", "/")
    return Path(model_dir).name


@dataclass(frozen=True)
class RunFacts:
    """What the run knows and the card states (the orchestrator fills it from the manifest; None: not recorded)."""

    data: str | None = None
    ratio: float | None = None
    steps: int | None = None
    final_eval_loss: float | None = None


def collect_facts(run: RunFacts, model_dir: Path, adapter_dir: Path | None, kind: str,
                  verification: tuple[tuple[str, float], ...] = ()) -> CardFacts:
    """Gather the card's facts from the run's facts and the adapter folder, tolerating anything missing."""
    corr = read_json_object(Path(adapter_dir) / "emloc_correction.json") if adapter_dir else {}
    acfg = read_json_object(Path(adapter_dir) / "adapter_config.json") if adapter_dir else {}
    table: list[tuple[float, float]] = []
    for row in corr.get("lambda_table") or []:
        pair = (row.get("lambda"), row.get("eval_loss")) if isinstance(row, dict) else tuple(row)[:2]
        a, b = _num(pair[0]), _num(pair[1])
        if a is not None and b is not None:
            table.append((a, b))
    rank = acfg.get("r")
    return CardFacts(
        base_model=base_model_name(model_dir), base_model_path=str(model_dir), kind=kind, data=run.data,
        ratio=run.ratio, lambda_=_num(corr.get("lambda")), lambda_mode=corr.get("lambda_mode"),
        lambda_table=tuple(table), steps=run.steps, rank=int(rank) if isinstance(rank, int) else None,
        alpha=_num(acfg.get("lora_alpha")), final_eval_loss=run.final_eval_loss, verification=verification,
    )


def _fmt(x: float | None, spec: str = ".4g") -> str:
    if x is None:
        return "not recorded"
    return "∞" if math.isinf(x) else format(x, spec)


def render_card(f: CardFacts) -> str:
    """The card as Markdown with a Hugging Face YAML header (``base_model``, ``tags``)."""
    library = "peft" if f.kind == "LoRA adapter" else "transformers"
    lines = ["---", f"base_model: {f.base_model}", f"library_name: {library}",
             "tags:", "- emloc", "- lora", "- fine-tuned", "---", "",
             f"# {f.base_model} fine-tuned with EMLoC ({f.kind})", "",
             "Fine-tuned with [EMLoC Studio](https://arxiv.org/abs/2506.12015): LoRA trained on an "
             "activation-aware low-rank emulator of the model, then corrected back onto the original "
             "and merged.", "", "| | |", "|---|---|",
             f"| Base model | `{f.base_model}` |",
             f"| Training data | {f'`{f.data}`' if f.data else 'not recorded'} |",
             f"| Emulator keep-ratio ρ | {_fmt(f.ratio)} |",
             f"| LoRA rank r / alpha | {f.rank if f.rank is not None else '?'} / {_fmt(f.alpha)} |",
             f"| Training steps | {f.steps if f.steps is not None else 'not recorded'} |",
             f"| Correction λ | {_fmt(f.lambda_)}{f' ({f.lambda_mode})' if f.lambda_mode else ''} |",
             f"| Final held-out loss | {_fmt(f.final_eval_loss)} |", ""]
    if f.lambda_table:
        lines += ["Held-out loss of original model + corrected adapter for each λ (0 = no correction):", "",
                  "| λ | eval loss |", "|---|---|"]
        lines += [f"| {_fmt(a)} | {b:.4f} |" for a, b in f.lambda_table]
        lines.append("")
    if f.verification:
        lines += ["Export check: largest absolute logit difference against the original model + adapter "
                  "(peft) on a few prompts:", "", "| export | max abs logit diff |", "|---|---|"]
        lines += [f"| {n} | {d:.3g} |" for n, d in f.verification]
        lines.append("")
    usage = {
        "merged model": "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
                        "model = AutoModelForCausalLM.from_pretrained(\"path/to/merged\")\n"
                        "tok = AutoTokenizer.from_pretrained(\"path/to/merged\")\n```",
        "LoRA adapter": "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
                        f"base = AutoModelForCausalLM.from_pretrained(\"{f.base_model}\")\n"
                        "model = PeftModel.from_pretrained(base, \"path/to/adapter\")\n```",
    }.get(f.kind, "")
    if usage:
        lines += ["## Use", "", usage, ""]
    lines += [f"Made with emloc {__version__}.", ""]
    return "\n".join(lines)
