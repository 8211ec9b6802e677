#!/usr/bin/env bash
# Install (or remove) EMLoC Studio's desktop entry, icon and AppStream metadata for the current user.
#
#   packaging/install_desktop_entry.sh                 # uses the emloc-studio found next to it or on PATH
#   packaging/install_desktop_entry.sh --exec /path/to/emloc-studio
#   packaging/install_desktop_entry.sh --uninstall
#
# Files go under ${XDG_DATA_HOME:-~/.local/share}: applications/, icons/hicolor/{scalable,256x256}/apps/,
# metainfo/. Nothing needs root. The launcher runs the absolute path of emloc-studio, so it works
# from a virtual environment that is not on PATH (e.g. this checkout's .venv after `make setup`,
# a pipx install, or a PyInstaller bundle: --exec dist/emloc-studio/emloc-studio).
set -euo pipefail

APP_ID="io.github.emloc.Studio"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RES="$(cd "$HERE/../resources" && pwd)"
DATA="${XDG_DATA_HOME:-$HOME/.local/share}"
EXEC=""
UNINSTALL=0

while [ $# -gt 0 ]; do
    case "$1" in
        --exec) EXEC="$2"; shift 2 ;;
        --uninstall) UNINSTALL=1; shift ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
done

APPS="$DATA/applications"
SVG_DIR="$DATA/icons/hicolor/scalable/apps"
PNG_DIR="$DATA/icons/hicolor/256x256/apps"
META="$DATA/metainfo"
FILES=("$APPS/$APP_ID.desktop" "$SVG_DIR/$APP_ID.svg" "$PNG_DIR/$APP_ID.png" "$META/$APP_ID.metainfo.xml")

refresh() {
    if command -v update-desktop-database >/dev/null 2>&1; then update-desktop-database -q "$APPS" || true; fi
    if command -v gtk-update-icon-cache >/dev/null 2>&1; then
        gtk-update-icon-cache -q -t -f "$DATA/icons/hicolor" 2>/dev/null || true
    fi
}

if [ "$UNINSTALL" = 1 ]; then
    rm -f "${FILES[@]}"
    refresh
    echo "Removed the EMLoC Studio desktop entry, icons and metadata from $DATA"
    exit 0
fi

if [ -z "$EXEC" ]; then
    for candidate in "$HERE/../.venv/bin/emloc-studio" "$(command -v emloc-studio 2>/dev/null || true)"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then EXEC="$candidate"; break; fi
    done
fi
if [ -z "$EXEC" ] || [ ! -x "$EXEC" ]; then
    echo "emloc-studio not found: run 'make setup' first, or pass --exec /path/to/emloc-studio" >&2
    exit 1
fi
EXEC="$(cd "$(dirname "$EXEC")" && pwd)/$(basename "$EXEC")"
case "$EXEC" in
    *[[:space:]\"\'\\\`\$]*) echo "The path $EXEC contains spaces or quotes; pass a path without them." >&2; exit 1 ;;
esac

mkdir -p "$APPS" "$SVG_DIR" "$PNG_DIR" "$META"
sed -e "s|^Exec=.*|Exec=$EXEC|" -e "s|^TryExec=.*|TryExec=$EXEC|" \
    "$RES/$APP_ID.desktop" > "$APPS/$APP_ID.desktop.tmp"
mv "$APPS/$APP_ID.desktop.tmp" "$APPS/$APP_ID.desktop"
install -m 0644 "$RES/emloc-studio.svg" "$SVG_DIR/$APP_ID.svg"
install -m 0644 "$RES/emloc-studio.png" "$PNG_DIR/$APP_ID.png"
install -m 0644 "$RES/$APP_ID.metainfo.xml" "$META/$APP_ID.metainfo.xml"
if command -v desktop-file-validate >/dev/null 2>&1; then desktop-file-validate "$APPS/$APP_ID.desktop"; fi
refresh
echo "Installed EMLoC Studio for ${USER:-the current user}: $APPS/$APP_ID.desktop (runs $EXEC)"
echo "It appears in the application menu as 'EMLoC Studio'. Remove it with: $0 --uninstall"
