"""The engine never imports Qt: two packages, one direction."""

from __future__ import annotations

import subprocess
import sys


def test_engine_imports_without_pyside6() -> None:
    code = (
        "import sys, importlib, pkgutil, emloc_engine\n"
        "mods = [m.name for m in pkgutil.walk_packages(emloc_engine.__path__, 'emloc_engine.')]\n"
        "for m in mods:\n    if not m.endswith('__main__'): importlib.import_module(m)\n"
        "from emloc_engine.cli.main import build_parser; build_parser()\n"
        "bad = sorted(k for k in sys.modules if k.startswith(('PySide6', 'shiboken6', 'emloc_app')))\n"
        "print(len(mods)); assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip().splitlines()[-1]) >= 10  # every engine module was really imported
