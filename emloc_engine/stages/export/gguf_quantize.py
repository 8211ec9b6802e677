"""K-quant GGUF files (q4_k_m, q5_k_m, q6_k...) through llama.cpp's ``llama-quantize``.

The ``gguf`` package writes F32/F16/BF16/Q8_0/Q5_x/Q4_x itself but has no K-quant quantizer, so a
K-quant export writes an F16 (BF16 for a bf16 model) GGUF next to the target and runs
``llama-quantize SRC DST TYPE`` on it: the same program llama.cpp users run, with its per-tensor type
mix (``_M`` keeps some ``attn_v``/``ffn_down`` tensors in a larger type) and its fallbacks for rows that
are not whole 256-value super-blocks. The program is found on ``PATH`` or through the
``EMLOC_LLAMA_QUANTIZE`` environment variable; without it the export refuses before any training
(:func:`resolve_llama_quantize` is called when the run is planned).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from emloc_engine.core.errors import Cancelled, MergeError, MissingTool
from emloc_engine.core.progress import NULL_PROGRESS, Progress

TOOL = "llama-quantize"
ENV = "EMLOC_LLAMA_QUANTIZE"


def find_llama_quantize() -> Path | None:
    """``$EMLOC_LLAMA_QUANTIZE`` when it names a file, else ``llama-quantize`` on PATH, else ``None``."""
    env = os.environ.get(ENV)
    if env and Path(env).is_file():
        return Path(env)
    found = shutil.which(TOOL)
    return Path(found) if found else None


def resolve_llama_quantize(gguf_type: str) -> Path:
    """The ``llama-quantize`` program for a K-quant type.

    Raises:
        MissingTool: it is not installed; the message names the type and how to get the program.
    """
    tool = find_llama_quantize()
    if tool is None:
        raise MissingTool(
            f"The GGUF type {gguf_type} is a K-quant, which llama.cpp's `{TOOL}` writes, and `{TOOL}` is not on PATH.",
            hint=f"Install llama.cpp so that `{TOOL}` is on PATH (`brew install llama.cpp`, a release from "
                 f"https://github.com/ggml-org/llama.cpp/releases, or build it), or set {ENV}=/path/to/{TOOL}; "
                 "or choose q8_0, q5_1, q5_0, q4_1 or q4_0, which are written without it.")
    return tool


def quantize_with_llama_cpp(tool: Path, src: Path, dst: Path, gguf_type: str,
                            progress: Progress = NULL_PROGRESS) -> None:
    """Run ``tool SRC DST TYPE`` (cancellable: the process is killed on cancel).

    Raises:
        MergeError: the program failed (its last output lines are listed).
    """
    cmd = [str(tool), str(src), str(dst), gguf_type.upper()]
    progress.update(0.0, f"llama-quantize → {gguf_type}")
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        try:
            while proc.poll() is None:
                progress.check_cancelled()
                time.sleep(0.2)
        except Cancelled:
            proc.kill()
            raise
        out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0 or not dst.is_file():
        tail = [line for line in out.splitlines() if line.strip()][-8:]
        raise MergeError(f"{TOOL} failed (exit code {proc.returncode}) writing {gguf_type}: {' '.join(cmd)}",
                         problems=tail, hint="Check the llama.cpp build, or choose a type written without it (q8_0, q4_0...).")
    progress.update(1.0, f"Quantized to {gguf_type}")
