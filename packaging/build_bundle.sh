#!/usr/bin/env bash
# Build the one-folder bundle dist/emloc-studio/ with PyInstaller, then smoke-test it offscreen.
#
#   packaging/build_bundle.sh            # uses .venv (make setup) for the app and its dependencies
#   PYTHON=/path/to/python packaging/build_bundle.sh
#
# PyInstaller is installed into a throwaway venv (build/pyinstaller-venv) that sees the app's
# environment through a .pth file, so the project's .venv is left as it is. Output:
#   dist/emloc-studio/emloc-studio   the app        (QT_QPA_PLATFORM=offscreen ... --smoke-test works headless)
#   dist/emloc-studio/emloc          the CLI        (a symlink to the same executable)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
BVENV="$ROOT/build/pyinstaller-venv"
PYINSTALLER_SPEC="${PYINSTALLER_SPEC:-pyinstaller>=6.10}"
cd "$ROOT"

echo "==> Checking the app's environment ($PY)"
"$PY" -c "import emloc_engine, emloc_app, torch, PySide6, transformers" \
    || { echo "The environment lacks the app or its dependencies: run 'make setup' first." >&2; exit 1; }

if [ ! -x "$BVENV/bin/python" ]; then
    echo "==> Creating a throwaway venv for PyInstaller in $BVENV"
    "$PY" -m venv "$BVENV"
fi
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
BSITE="$("$BVENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
printf '%s\n%s\n' "$ROOT" "$SITE" > "$BSITE/_emloc_app_env.pth"
if ! "$BVENV/bin/python" -c "import PyInstaller" 2>/dev/null; then
    echo "==> Installing $PYINSTALLER_SPEC (package registry)"
    "$BVENV/bin/python" -m pip install --quiet --disable-pip-version-check "$PYINSTALLER_SPEC"
fi

echo "==> Building dist/emloc-studio with PyInstaller $("$BVENV/bin/python" -m PyInstaller --version)"
START=$(date +%s)
"$BVENV/bin/python" -m PyInstaller --noconfirm --log-level WARN \
    --distpath "$ROOT/dist" --workpath "$ROOT/build/pyinstaller" "$ROOT/packaging/emloc-studio.spec"
ln -sf emloc-studio "$ROOT/dist/emloc-studio/emloc"
echo "==> Built in $(( $(date +%s) - START )) s; size $(du -sh "$ROOT/dist/emloc-studio" | cut -f1)"

echo "==> Smoke test (offscreen, throwaway data folder)"
SMOKE_HOME="$(mktemp -d)"
trap 'rm -rf "$SMOKE_HOME"' EXIT
"$ROOT/dist/emloc-studio/emloc" --version
EMLOC_HOME="$SMOKE_HOME" QT_QPA_PLATFORM=offscreen "$ROOT/dist/emloc-studio/emloc-studio" --smoke-test
echo "==> OK: run dist/emloc-studio/emloc-studio (or install a launcher with:"
echo "    packaging/install_desktop_entry.sh --exec $ROOT/dist/emloc-studio/emloc-studio)"
