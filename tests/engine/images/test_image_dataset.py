"""The image folder scan: items with captions and sizes, every problem named by file with its fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from emloc_engine.core.errors import ConfigError, DataError
from emloc_engine.images.dataset import ImageFolderConfig, add_trigger, scan_image_folder
from tests.tiny_pipelines import write_subject_images


def test_captions_sizes_and_trigger(tmp_path: Path) -> None:
    write_subject_images(tmp_path, 3, size=(40, 32), trigger="sks")
    (tmp_path / "img_001.txt").write_text("a red circle\n on grass")  # no trigger: put in front
    report = scan_image_folder(ImageFolderConfig(tmp_path, trigger="sks", min_side_px=16))
    assert report.ok and len(report.items) == 3 and report.problems == ()
    item0, item1 = report.items[0], report.items[1]
    assert (item0.width, item0.height) == (40, 32)
    assert item0.caption.startswith("a photo of sks circle")
    assert item1.caption == "sks, a red circle on grass"


def test_problems_named_with_fix(tmp_path: Path) -> None:
    write_subject_images(tmp_path, 2, size=(32, 32), captions=False)
    write_subject_images(tmp_path / "big", 1, size=(64, 64))
    (tmp_path / "big" / "img_000.png").rename(tmp_path / "large.png")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    (tmp_path / "orphan.txt").write_text("caption of a renamed image")
    report = scan_image_folder(ImageFolderConfig(tmp_path, caption_mode="files", min_side_px=48))
    by_file = {p.path.name: p for p in report.problems}
    assert "cannot be read" in by_file["broken.jpg"].message
    assert (
        "smaller than 48" in by_file["img_000.png"].message and "larger photo" in by_file["img_000.png"].fix
    )
    assert "no caption" in by_file["large.png"].message and "large.txt" in by_file["large.png"].fix
    assert by_file["orphan.txt"].severity == "warning"
    assert report.items == () and not report.ok
    with pytest.raises(DataError) as err:
        report.raise_if_unusable()
    assert "broken.jpg" in str(err.value) and "orphan.txt" not in str(err.value)


def test_prompt_modes(tmp_path: Path) -> None:
    write_subject_images(tmp_path, 2, captions=False)
    (tmp_path / "img_000.txt").write_text("own caption sks")
    mixed = scan_image_folder(ImageFolderConfig(tmp_path, trigger="sks", prompt="a photo", min_side_px=1))
    assert [i.caption for i in mixed.items] == ["own caption sks", "sks, a photo"]
    one = scan_image_folder(
        ImageFolderConfig(
            tmp_path, trigger="sks", prompt="a photo of sks", caption_mode="prompt", min_side_px=1
        )
    )
    assert [i.caption for i in one.items] == ["a photo of sks"] * 2


def test_empty_folder_and_bad_settings(tmp_path: Path) -> None:
    report = scan_image_folder(ImageFolderConfig(tmp_path))
    assert not report.ok and "holds no image" in report.problems[0].message
    with pytest.raises(DataError):
        scan_image_folder(ImageFolderConfig(tmp_path / "missing"))
    with pytest.raises(ConfigError):
        ImageFolderConfig(tmp_path, trigger="two words")
    assert add_trigger("sksy dog", "sks") == "sks, sksy dog" and add_trigger("sks, dog", "sks") == "sks, dog"
