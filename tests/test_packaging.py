"""Packaging: the wheel installs into a fresh venv and both commands start; desktop files are valid.

The wheel test builds from a copy of the sources (the checkout stays clean), installs with
``--no-deps --no-index`` into a new venv whose dependencies come from this venv's site-packages
through a ``.pth`` line (offline, seconds), and runs ``emloc --version`` and
``emloc-studio --smoke-test`` offscreen from outside the checkout.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import sysconfig
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest

from emloc_engine.core.version import __version__

ROOT = Path(__file__).resolve().parents[1]
RES = ROOT / "resources"
APP_ID = "io.github.emloc.Studio"


def _run(cmd: list[str], cwd: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "PYTHONNOUSERSITE": "1", **env}
    full_env.pop("PYTHONPATH", None)
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``emloc_studio-<version>-py3-none-any.whl`` built from a copy of the sources."""
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("emloc_engine", "emloc_app"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(src)], cwd=src)
    (whl,) = dist.glob("*.whl")
    return whl


@pytest.mark.slow
def test_wheel_contents(wheel: Path) -> None:
    assert wheel.name == f"emloc_studio-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        dist_info = f"emloc_studio-{__version__}.dist-info"
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
    assert "emloc_engine/cli/main.py" in names and "emloc_engine/run/orchestrator.py" in names and "emloc_engine/catalog/demo.py" in names and "emloc_app/main.py" in names
    assert "emloc_app/resources/style.qss" in names
    assert not [n for n in names if n.startswith("tests/")]
    assert "emloc = emloc_engine.cli:main" in entry_points
    assert "[gui_scripts]" in entry_points and "emloc-studio = emloc_app.main:main" in entry_points


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_both_commands_start(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    vpy = bindir / ("python.exe" if os.name == "nt" else "python")
    site = Path(_run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path).stdout.strip())
    # Dependencies (torch, transformers, PySide6...) are reused from this venv; the wheel itself is
    # the only thing installed, and the fresh site-packages comes first on sys.path.
    (site / "_emloc_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(vpy), "install", "--no-deps", "--no-index",
          "--disable-pip-version-check", "--quiet", str(wheel)], cwd=tmp_path)

    where = _run([str(vpy), "-c", "import emloc_engine, emloc_app; print(emloc_engine.__file__, emloc_app.__file__)"],
                 cwd=tmp_path).stdout
    assert where.count(str(site)) == 2, f"imported from the wrong place: {where}"

    version = _run([str(bindir / "emloc"), "--version"], cwd=tmp_path).stdout
    assert f"emloc {__version__}" in version and "torch" in version

    smoke = _run([str(bindir / "emloc-studio"), "--smoke-test"], cwd=tmp_path,
                 EMLOC_HOME=str(tmp_path / "home"))
    assert "exit 0" in smoke.stdout + smoke.stderr


def test_desktop_entry_is_valid() -> None:
    desktop = RES / f"{APP_ID}.desktop"
    text = desktop.read_text(encoding="utf-8")
    assert "Exec=emloc-studio" in text and f"Icon={APP_ID}" in text and "Type=Application" in text
    tool = shutil.which("desktop-file-validate")
    if tool is None:
        pytest.skip("desktop-file-validate not installed (apt-get install desktop-file-utils)")
    proc = subprocess.run([tool, str(desktop)], capture_output=True, text=True)
    assert proc.returncode == 0 and "error" not in proc.stdout, proc.stdout


def test_appstream_metadata_is_valid_and_carries_the_one_version() -> None:
    meta = RES / f"{APP_ID}.metainfo.xml"
    root = ET.parse(meta).getroot()
    assert root.findtext("id") == APP_ID
    assert root.find("launchable").text == f"{APP_ID}.desktop"  # type: ignore[union-attr]
    releases = [r.get("version") for r in root.iter("release")]
    assert releases[0] == __version__, "the newest <release> must be the version emloc --version shows"
    tool = shutil.which("appstreamcli")
    if tool is None:
        pytest.skip("appstreamcli not installed (apt-get install appstream)")
    proc = subprocess.run([tool, "validate", "--no-net", str(meta)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_icon_png_is_a_256px_render_of_the_svg() -> None:
    ET.parse(RES / "emloc-studio.svg")  # well-formed
    head = (RES / "emloc-studio.png").read_bytes()[:32]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    assert (width, height) == (256, 256)


@pytest.mark.skipif(os.name == "nt", reason="the desktop entry is for Linux desktops")
def test_install_script_installs_for_the_user_and_uninstalls(tmp_path: Path) -> None:
    fake = tmp_path / "bin" / "emloc-studio"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    data = tmp_path / "share"
    script = ROOT / "packaging" / "install_desktop_entry.sh"
    out = _run(["bash", str(script), "--exec", str(fake)], cwd=tmp_path, XDG_DATA_HOME=str(data)).stdout
    assert "Installed EMLoC Studio" in out
    desktop = data / "applications" / f"{APP_ID}.desktop"
    assert f"Exec={fake}\n" in desktop.read_text()
    assert (data / "icons/hicolor/scalable/apps" / f"{APP_ID}.svg").is_file()
    assert (data / "icons/hicolor/256x256/apps" / f"{APP_ID}.png").is_file()
    assert (data / "metainfo" / f"{APP_ID}.metainfo.xml").is_file()
    _run(["bash", str(script), "--uninstall"], cwd=tmp_path, XDG_DATA_HOME=str(data))
    assert not desktop.exists() and not (data / "metainfo" / f"{APP_ID}.metainfo.xml").exists()


def test_install_script_refuses_without_an_executable(tmp_path: Path) -> None:
    script = ROOT / "packaging" / "install_desktop_entry.sh"
    proc = subprocess.run(["bash", str(script), "--exec", str(tmp_path / "nope")], capture_output=True, text=True,
                          env={**os.environ, "XDG_DATA_HOME": str(tmp_path / "share")})
    assert proc.returncode == 1 and "not found" in proc.stderr
    assert not (tmp_path / "share").exists()
