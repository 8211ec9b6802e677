"""The Data page takes a Hugging Face datasets folder (Folder… button) and lists its bad rows (real engine)."""

from __future__ import annotations

from pathlib import Path

import datasets
from PySide6.QtWidgets import QFileDialog

from emloc_app.pages.data_page import DataPage
from emloc_app.state import WizardState


def test_data_page_checks_a_saved_datasets_folder(
    qtbot, tmp_path: Path, tiny_llama: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    rows = [
        {"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}]}
        for i in range(6)
    ]
    rows[2] = {"messages": [{"role": "user", "content": "Q"}, {"role": "wizard", "content": "A"}]}
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    state = WizardState(model_dir=tiny_llama)
    page = DataPage(state)
    qtbot.addWidget(page)
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: str(folder))
    page.browse_folder.click()
    assert page.path.text() == str(folder)
    qtbot.waitUntil(
        lambda: page.inspection is not None and page.inspection.data_path == folder and not page.busy(),
        timeout=60_000,
    )
    assert page.inspection.report.format == "messages" and page.inspection.report.n_records == 6
    assert page.problems.rowCount() == 1 and page.problems.item(0, 0).text() == "saved: row 2"
    assert "unknown role 'wizard'" in page.problems.item(0, 2).text()
    assert not page.isComplete()
