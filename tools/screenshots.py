"""Render every page of the EMLoC Studio wizard to PNGs (offscreen or under Xvfb), for review.

    python tools/screenshots.py OUT_DIR [--dark]

Uses the fake engine of the app tests (a 24 GiB GPU, an 8B model, a chat dataset), so the pages
show realistic content without any model work. The Run page is shown mid-training with plots.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", type=Path)
    p.add_argument("--dark", action="store_true", help="Force the dark palette.")
    p.add_argument("--gpus", type=int, default=1, help="Fake this many 24 GiB GPUs (2+ shows the GPUs choice).")
    args = p.parse_args()
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    tmp = Path(tempfile.mkdtemp(prefix="emloc-shots-"))
    os.environ["EMLOC_HOME"] = str(tmp / "home")

    from PySide6.QtCore import QCoreApplication
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    from emloc_app import theme

    theme.apply_theme(app)  # type: ignore[arg-type]
    if args.dark:
        app.setPalette(theme.dark_palette())  # type: ignore[union-attr]
    from emloc_app.state import WizardState
    from emloc_app.wizard import EmlocWizard, Page
    from emloc_app.worker import shutdown_workers
    from tests.app.fakes import FakeEngine, gpu, machine, model_info, problem, report

    models = [model_info("meta-llama/Llama-3.1-8B-Instruct", tmp / "llama"),
              model_info("Qwen/Qwen2.5-7B-Instruct", tmp / "qwen", num_parameters=7_600_000_000, size_gib=15,
                         model_type="qwen2"),
              model_info("mistralai/Mistral-Small-24B-big", tmp / "mistral", num_parameters=24_000_000_000,
                         size_gib=47, model_type="mistral"),
              model_info("lmstudio: gemma-3-12b-Q4_K_M.gguf", tmp / "gemma.gguf", model_type="gemma3",
                         needs_conversion=True, dtype="Q4_K_M", size_gib=7,
                         problem="GGUF file: convert it to safetensors first (emloc models convert)."),
              model_info("state-spaces/mamba-2.8b", tmp / "mamba", model_type="mamba", supported=False,
                         problem="Mamba models have no attention/MLP linears EMLoC can compress.")]
    found = report(
        n_samples=1200, n_train=1080, n_eval=120, n_truncated=14,
        rendered_examples=tuple(
            f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nQuestion {i}: how do I "
            f"reverse a list in Python?<|im_end|>\n<|im_start|>assistant\nUse my_list[::-1] or my_list.reverse()."
            "<|im_end|>" for i in range(1, 5)),
        problems=(problem(str(tmp / "chat.jsonl"), 57, "Sample has no assistant turn; it is skipped.", False),
                  problem(str(tmp / "chat.jsonl"), 311, "Sample is 731 tokens, longer than max_length 512; "
                          "it is truncated.", False)))
    detected = machine(gpus=tuple(gpu(i) for i in range(args.gpus))) if args.gpus > 1 else None
    FakeEngine(tmp, models=models, report=found, machine=detected).install(setattr)  # a one-shot process
    state = WizardState()
    wizard = EmlocWizard(state)
    wizard.resize(1100, 820)
    wizard.show()
    args.out.mkdir(parents=True, exist_ok=True)

    def settle(ms: int = 400) -> None:
        import time

        end = time.monotonic() + ms / 1000
        while time.monotonic() < end:
            QCoreApplication.processEvents()
            time.sleep(0.01)

    def shot(name: str) -> None:
        settle()
        path = args.out / f"{name}.png"
        wizard.grab().save(str(path))
        print(path)

    settle(800)
    shot("1_machine")
    wizard.next()
    settle(800)
    shot("2_model")
    wizard.next()
    settle(1200)
    shot("3_data")
    wizard.next()
    shot("4_plan")
    wizard.next()
    run = wizard.pages[Page.Run]
    run.start()
    settle(1500)
    run.plot.clear()
    # simulate a training curve on the plots (the fake stages are instant)
    for step in range(1, 101):
        loss = 2.4 * math.exp(-step / 35) + 0.9 + 0.05 * math.sin(step)
        run.plot.on_metric("train/loss", loss, step)
        run.plot.on_metric("train/lr", 2e-4 * min(1, step / 10) * (0.5 + 0.5 * math.cos(math.pi * step / 100)), step)
        run.plot.on_metric("gpu/peak_gib", 17.2 + 0.3 * (step > 3), step)
        if step % 25 == 0:
            run.plot.on_metric("eval/loss", loss + 0.08, step)
    shot("5_run")
    wizard.next()
    tp = wizard.pages[Page.Try]
    tp.outputs["base"].setPlainText("The sea is a large body of salt water. It covers most of the Earth.")
    tp.outputs["tuned"].setPlainText("Grey waves fold over the harbour wall at dusk. The gulls go quiet, and "
                                     "the tide takes the day's footprints back.")
    tp.export_bars["merged"].setValue(1000)
    tp.export_status["merged"].setText(f"{tmp}/run/merged · verified (max logit diff 0.004)")
    tp.gen_status.setText("Done.")
    shot("6_try_export")
    wizard.shutdown()
    shutdown_workers()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
