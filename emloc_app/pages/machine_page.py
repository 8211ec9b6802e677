"""Page 1: what this machine has (GPUs, RAM) and how much memory EMLoC may use."""

from __future__ import annotations

from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QLabel,
    QVBoxLayout,
    QWidget,
)

from emloc_app.pages.common import GIB, BasePage, gib
from emloc_app.state import WizardState
from emloc_engine.core.progress import Progress
from emloc_engine.machine.budget import default_budget_bytes
from emloc_engine.machine.hardware import GpuInfo, MachineInfo, detect_machine

CPU_TEXT = (
    "<b>CPU mode.</b> Every stage also runs on the processor, using system RAM instead of GPU memory. "
    "That is fine for the demo model (135M parameters: minutes) and for trying things out; a 7B model "
    "would take days. The budget below then limits the RAM EMLoC plans for."
)


def detect(_config: None, _progress: Progress) -> MachineInfo:
    """The worker's task: :func:`~emloc_engine.machine.hardware.detect_machine` (NVML, then torch)."""
    return detect_machine()


class MachinePage(BasePage):
    """GPU choice and memory budget; the budget defaults to what the engine's :func:`default_budget_bytes` gives
    (the device's free memory less a margin), not its whole memory: other programs may hold part of it."""

    def __init__(self, state: WizardState, parent: QWidget | None = None) -> None:
        super().__init__(state, parent)
        self.setTitle("Your machine")
        self.setSubTitle("EMLoC fine-tunes within the memory that running the model needs. "
                         "Pick the device and how much of its memory to use.")
        self.summary = QLabel("Looking at this machine…")
        self.summary.setWordWrap(True)
        self.device = QComboBox()
        self.device.setObjectName("device")
        self.device.currentIndexChanged.connect(self._device_changed)
        self.budget = QDoubleSpinBox()
        self.budget.setObjectName("budget")
        self.budget.setDecimals(1)
        self.budget.setSuffix(" GiB")
        self.budget.setRange(0.1, 4096.0)
        self.budget.setSingleStep(0.5)
        self.budget.setToolTip("Peak memory every stage must stay under. The planner picks the "
                               "compression ratio ρ so that training fits in it.")
        self.budget.valueChanged.connect(self._budget_edited)
        self.cpu_note = QLabel(CPU_TEXT)
        self.cpu_note.setWordWrap(True)
        self.notes = QLabel()
        self.notes.setWordWrap(True)
        self.notes.setObjectName("PageHint")

        box = QGroupBox("Device and budget")
        form = QFormLayout(box)
        device_label = QLabel("&Device:")
        device_label.setBuddy(self.device)
        budget_label = QLabel("Memory &budget:")
        budget_label.setBuddy(self.budget)
        form.addRow(device_label, self.device)
        form.addRow(budget_label, self.budget)
        hw = QGroupBox("Detected hardware")
        hw_layout = QVBoxLayout(hw)
        hw_layout.addWidget(self.summary)
        hw_layout.addWidget(self.notes)
        self.body.addWidget(hw)
        self.body.addWidget(box)
        self.body.addWidget(self.cpu_note)
        self.body.addWidget(self.hint(
            "<b>How the budget is used.</b> Fine-tuning normally needs more memory than running a model "
            "(adapter, optimizer state, activations, logits). EMLoC trains on a smaller <i>emulator</i> of the "
            "model, built from your own data, so that every stage stays within this budget; then it corrects "
            "the trained adapter so it works on the original model. The next pages show, for every model on "
            "this disk, whether it fits and how much of each layer the emulator keeps (ρ).<br><br>"
            "Lower the budget if other programs need the GPU (or, in CPU mode, the memory) at the same time."))
        self.body.addStretch(1)
        self._budget_touched = False
        self._filling = False
        self.registerField("budget_gib", self.budget, "value", self.budget.valueChanged)

    # -- detection ---------------------------------------------------------------------------
    def initializePage(self) -> None:
        if self.state.machine is not None:
            self._fill(self.state.machine)
            return
        if not self.busy("detect"):
            self.summary.setText("Looking at this machine…")
            self.run_task("detect", detect, None, self._detected)

    def _detected(self, machine: MachineInfo) -> None:
        self.state.machine = machine
        self._fill(machine)
        self.completeChanged.emit()

    def _fill(self, machine: MachineInfo) -> None:
        self._filling = True
        gpus = machine.gpus
        lines = [f"<b>{len(gpus)} GPU{'s' if len(gpus) != 1 else ''}</b> ({machine.backend})" if gpus
                 else "<b>No GPU found</b> — EMLoC will use the CPU."]
        lines += [f"GPU {g.index}: {g.name} — {gib(g.total_bytes)} ({gib(g.free_bytes)} free)" for g in gpus]
        lines.append(f"CPU: {machine.cpu_cores} cores · RAM {gib(machine.ram_total_bytes)} "
                     f"({gib(machine.ram_available_bytes)} available)")
        self.summary.setText("<br>".join(lines))
        notes = machine.notes
        self.notes.setText("\n".join(notes))
        self.notes.setVisible(bool(notes))
        self.device.clear()
        for g in gpus:
            self.device.addItem(f"GPU {g.index}: {g.name} ({gib(g.total_bytes)})", g.index)
        self.device.addItem("CPU only (slow; fine for the demo model)", None)
        index = 0
        if self.state.gpu_index is not None or self.state.budget_bytes is not None:
            found = self.device.findData(self.state.gpu_index)
            index = found if found >= 0 else 0
        self.device.setCurrentIndex(index)
        self._filling = False
        self._device_changed()
        if self.state.budget_bytes:
            self.budget.setValue(self.state.budget_bytes / GIB)
            self._budget_touched = True

    def _gpu(self, index: int | None) -> GpuInfo | None:
        gpus = self.state.machine.gpus if self.state.machine is not None else ()
        return next((g for g in gpus if g.index == index), None)

    def _device_changed(self) -> None:
        machine = self.state.machine
        if self._filling or machine is None:
            return
        gpu = self._gpu(self.selected_index())
        self.cpu_note.setVisible(gpu is None)
        if not self._budget_touched:
            budget = self.default_budget(gpu, machine)
            self.budget.blockSignals(True)
            self.budget.setValue(budget / GIB)
            self.budget.blockSignals(False)
        self.completeChanged.emit()

    @staticmethod
    def default_budget(gpu: GpuInfo | None, machine: MachineInfo) -> int:
        """The engine's default budget of the chosen device (free memory less a margin)."""
        if gpu is not None:
            return default_budget_bytes(gpu.free_bytes, gpu.total_bytes)
        available = machine.ram_available_bytes or 8 * GIB
        return default_budget_bytes(available, max(machine.ram_total_bytes, available))

    def _budget_edited(self) -> None:
        self._budget_touched = True

    # -- wizard protocol ---------------------------------------------------------------------
    def isComplete(self) -> bool:
        return self.state.machine is not None and self.budget.value() > 0

    def selected_index(self) -> int | None:
        """The GPU index of the device combo's choice (None: the CPU)."""
        data: object = self.device.currentData()
        return data if isinstance(data, int) else None

    def validatePage(self) -> bool:
        self.state.gpu_index = self.selected_index()
        self.state.budget_bytes = int(self.budget.value() * GIB)
        return True
