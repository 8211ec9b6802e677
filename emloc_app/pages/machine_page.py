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
from emloc_engine.machine.hardware import GpuInfo, MachineInfo, detect_machine
from emloc_engine.run.options import option_help
from emloc_engine.run.plan import machine_budget_bytes

CPU_TEXT = (
    "<b>CPU mode.</b> Every stage also runs on the processor, using system RAM instead of GPU memory. "
    "That is fine for the demo model (135M parameters: minutes) and for trying things out; a 7B model "
    "would take days. The budget below then limits the RAM EMLoC plans for."
)


def detect(_config: None, _progress: Progress) -> MachineInfo:
    """The worker's task: :func:`~emloc_engine.machine.hardware.detect_machine` (NVML, then torch)."""
    return detect_machine()


class MachinePage(BasePage):
    """GPU choice, memory budget and the process cap.

    The budget defaults to what ``emloc run`` uses (:func:`~emloc_engine.run.plan.machine_budget_bytes`):
    the selected GPU's free memory, or the cap when lower, less ``max(0.5 GiB, 5 %)``; on the CPU the
    available RAM less the same margin.
    """

    def __init__(self, state: WizardState, parent: QWidget | None = None) -> None:
        super().__init__(state, parent)
        self.setTitle("Your machine")
        self.setSubTitle("EMLoC fine-tunes within the memory your GPU has free, even models that do not fit it. "
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
        self.budget.setToolTip(option_help("budget_bytes"))
        self.budget.valueChanged.connect(self._budget_edited)
        self.gpu_memory = QDoubleSpinBox()
        self.gpu_memory.setObjectName("gpu_memory")
        self.gpu_memory.setDecimals(1)
        self.gpu_memory.setSuffix(" GiB")
        self.gpu_memory.setRange(0.0, 4096.0)
        self.gpu_memory.setSingleStep(0.5)
        self.gpu_memory.setSpecialValueText("no cap")  # 0 = off
        self.gpu_memory.setToolTip(option_help("gpu_memory_bytes"))
        self.gpu_memory.valueChanged.connect(self._cap_changed)
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
        cap_label = QLabel("&Cap this process at:")
        cap_label.setBuddy(self.gpu_memory)
        form.addRow(cap_label, self.gpu_memory)
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
            "A model larger than the budget runs <i>offloaded</i>: its original weights stream through the GPU block "
            "by block from disk and RAM, so it takes longer and needs RAM, and the next page says how much.<br><br>"
            "Lower the budget if other programs need the GPU (or, in CPU mode, the memory) at the same time; "
            "the cap makes this process stop at that much GPU memory, as a smaller card would."))
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
        if self.state.gpu_memory_bytes:
            self.gpu_memory.blockSignals(True)
            self.gpu_memory.setValue(self.state.gpu_memory_bytes / GIB)
            self.gpu_memory.blockSignals(False)
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
        self.gpu_memory.setEnabled(gpu is not None)
        if not self._budget_touched:
            device = f"cuda:{gpu.index}" if gpu is not None else "cpu"
            default = machine_budget_bytes(machine, device, 1, self.cap_bytes())
            self.budget.blockSignals(True)
            self.budget.setValue(default / GIB)
            self.budget.blockSignals(False)
        self.completeChanged.emit()

    def cap_bytes(self) -> int | None:
        """The process cap typed (None: no cap)."""
        value = self.gpu_memory.value()
        return int(value * GIB) if value > 0 else None

    def _cap_changed(self) -> None:
        self._device_changed()

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
        self.state.gpu_memory_bytes = self.cap_bytes() if self.selected_index() is not None else None
        return True
