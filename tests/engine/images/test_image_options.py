"""The image settings the app and the CLI read at start-up import neither torch nor diffusers."""

from __future__ import annotations

import subprocess
import sys

from emloc_engine.images import options, planning, run


def test_settings_modules_import_no_torch_or_diffusers() -> None:
    code = (
        "import sys, emloc_engine.images.options, emloc_engine.images.export, emloc_engine.run.history\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers', 'transformers'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_stage_modules_use_the_one_definition() -> None:
    assert run.ImageRunConfig is options.ImageRunConfig and run.ImageRunResult is options.ImageRunResult
    assert run.RUN_SETTINGS == options.RUN_SETTINGS and planning.RESOLUTIONS is options.RESOLUTIONS
