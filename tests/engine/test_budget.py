"""The budget is the GPU: the default budget, the process cap ``--gpu-memory``, the export's verification
placement under the budget, and ``emloc plan`` / ``plan_run`` on a fake GPU (no GPU needed)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from emloc_engine.cli.main import main
from emloc_engine.core.errors import ConfigError
from emloc_engine.machine.budget import (
    BUDGET_MARGIN_MIN_BYTES,
    budget_margin_bytes,
    default_budget_bytes,
    memory_fraction,
)
from emloc_engine.machine.hardware import GpuInfo, MachineInfo
from emloc_engine.machine.memory_cap import apply_gpu_memory_cap, cap_devices
from emloc_engine.run.options import build_config, command_line, option
from emloc_engine.stages.export.verify_budget import model_need_bytes, verify_placement

GIB = 2**30


def test_default_budget_is_free_memory_less_max_half_a_gib_or_five_percent() -> None:
    assert budget_margin_bytes(8 * GIB) == BUDGET_MARGIN_MIN_BYTES  # 5% of 8 GiB is 0.4 GiB < 0.5 GiB
    assert budget_margin_bytes(80 * GIB) == 4 * GIB
    assert default_budget_bytes(20 * GIB) == 19 * GIB
    assert default_budget_bytes(80 * GIB, 16 * GIB) == 16 * GIB - int(
        0.05 * 16 * GIB
    )  # the cap, when lower, is the room
    assert default_budget_bytes(10 * GIB, 16 * GIB) == int(9.5 * GIB)  # free memory, when lower than the cap
    assert default_budget_bytes(GIB // 2) == GIB // 8  # a nearly full card: a quarter of what is left


class FakeProps:
    def __init__(self, total: int) -> None:
        self.total_memory = total


class FakeCuda:
    """``torch.cuda`` as the cap uses it: two cards of 141 GiB and 80 GiB."""

    def __init__(self, available: bool = True) -> None:
        self.available = available
        self.totals = [141 * GIB, 80 * GIB]
        self.fractions: dict[int, float] = {}

    def is_available(self) -> bool:
        return self.available

    def device_count(self) -> int:
        return len(self.totals)

    def get_device_properties(self, index: int) -> FakeProps:
        return FakeProps(self.totals[index])

    def set_per_process_memory_fraction(self, fraction: float, device: int) -> None:
        assert 0 < fraction <= 1
        self.fractions[device] = fraction


def test_gpu_memory_cap_sets_the_fraction_of_every_used_card() -> None:
    cuda = FakeCuda()
    notes = apply_gpu_memory_cap(int(15.5 * GIB), "auto", 2, cuda=cuda)
    assert cuda.fractions[0] == pytest.approx(15.5 / 141) and cuda.fractions[1] == pytest.approx(15.5 / 80)
    assert len(notes) == 2 and "15.50 GiB" in notes[0]
    one = FakeCuda()
    apply_gpu_memory_cap(8 * GIB, "cuda:1", 1, cuda=one)
    assert one.fractions == {1: pytest.approx(0.1)}
    big = FakeCuda()
    notes = apply_gpu_memory_cap(500 * GIB, "cuda", 1, cuda=big)
    assert big.fractions == {0: 1.0}  # a cap above the card is no cap, and the note says so
    assert "500.00 GiB" in notes[0] and "141.0 GiB" in notes[0] and "caps nothing" in notes[0]
    none = FakeCuda()
    assert apply_gpu_memory_cap(None, "cuda", 1, cuda=none) == [] and none.fractions == {}
    assert memory_fraction(GIB, 4 * GIB) == 0.25
    with pytest.raises(ValueError):
        memory_fraction(0, GIB)


def test_gpu_memory_cap_on_the_cpu_is_recorded_and_ignored_with_a_note() -> None:
    cuda = FakeCuda(available=False)
    notes = apply_gpu_memory_cap(8 * GIB, "auto", 1, cuda=cuda)
    assert cuda.fractions == {} and "ignored" in notes[0]
    assert "ignored" in apply_gpu_memory_cap(8 * GIB, "cpu", 1, cuda=FakeCuda())[0]
    assert cap_devices("cpu", 1) == () and cap_devices("mps", 1) == () and cap_devices("cuda:3", 1) == (3,)


def test_gpu_memory_is_one_setting_typed_in_gib(tmp_path: Path) -> None:
    opt = option("gpu_memory_bytes")
    assert opt.flag == "--gpu-memory" and opt.unit == "GiB" and "set_per_process_memory_fraction" in opt.help
    cfg = build_config(
        None,
        {"gpu_memory_bytes": "15.5", "budget_bytes": 12},
        model_dir=tmp_path / "m",
        data_path=tmp_path / "d.jsonl",
        run_dir=tmp_path / "r",
    )
    assert cfg.gpu_memory_bytes == int(15.5 * GIB) and cfg.budget_bytes == 12 * GIB
    args = command_line(cfg)
    assert args[args.index("--gpu-memory") + 1] == "15.5" and args[args.index("--budget-gib") + 1] == "12"
    assert option("train.anchor_ram_gib").default == 4.0


def test_export_verification_keeps_to_the_budget_not_the_cards_free_memory() -> None:
    n = 8_030_000_000  # Llama-3-8B: fp32 copy 29.9 GiB
    # The failure: an H200 (139 GiB free) capped to a 15.5 GiB budget; fp32 must not be chosen.
    capped = verify_placement(
        n, 2, on_gpu=True, free_bytes=139 * GIB, budget_bytes=int(15.5 * GIB), ram_free_bytes=200 * GIB
    )
    assert (
        capped.device == "cpu"
    )  # bf16 needs 1.2·15 + 0.5 GiB > 15.5 GiB: the CPU verifies, in fp32 (RAM allows)
    assert capped.fp32
    roomy = verify_placement(n, 2, on_gpu=True, free_bytes=139 * GIB, budget_bytes=40 * GIB)
    assert roomy == replace(roomy, device="gpu", fp32=True)
    mid = verify_placement(n, 2, on_gpu=True, free_bytes=139 * GIB, budget_bytes=24 * GIB)
    assert mid.device == "gpu" and not mid.fp32  # bf16 on the GPU: 1.2·15 + 0.5 ≤ 24
    assert model_need_bytes(n * 2) <= 24 * GIB < model_need_bytes(n * 4)
    low_ram = verify_placement(
        n, 2, on_gpu=True, free_bytes=139 * GIB, budget_bytes=8 * GIB, ram_free_bytes=20 * GIB
    )
    assert low_ram.device == "cpu" and not low_ram.fp32
    # Without a budget (per-stage command): the old rule on the device's free memory.
    assert verify_placement(n, 2, on_gpu=True, free_bytes=139 * GIB).fp32
    assert not verify_placement(n, 2, on_gpu=True, free_bytes=20 * GIB).fp32


def test_exporter_places_its_verification_under_the_budget(
    monkeypatch: pytest.MonkeyPatch, tiny_llama: Path
) -> None:
    import torch

    from emloc_engine.stages.export import exporter

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (139 * GIB, 141 * GIB))
    monkeypatch.setattr(exporter.Checkpoint, "num_parameters", lambda self: 8_030_000_000)
    monkeypatch.setattr(exporter, "_storage_dtype", lambda model_dir: torch.bfloat16)
    cuda = torch.device("cuda")
    dev, dtype = exporter._verify_placement(tiny_llama, cuda, int(15.5 * GIB))
    assert dev.type == "cpu"
    dev, dtype = exporter._verify_placement(tiny_llama, cuda, 24 * GIB)
    assert dev == cuda and dtype == torch.bfloat16
    dev, dtype = exporter._verify_placement(tiny_llama, cuda, None)
    assert dev == cuda and dtype == torch.float32  # no budget: the card's free memory (139 GiB) decides


def _machine(total_gib: float, free_gib: float, ram_gib: float = 64) -> MachineInfo:
    gpu = GpuInfo(
        index=0,
        name="NVIDIA GeForce RTX 4090",
        total_bytes=int(total_gib * GIB),
        free_bytes=int(free_gib * GIB),
        used_bytes=int((total_gib - free_gib) * GIB),
    )
    return MachineInfo(
        gpus=(gpu,),
        backend="cuda",
        cpu_cores=16,
        ram_total_bytes=int(ram_gib * GIB),
        ram_available_bytes=int(ram_gib * GIB),
    )


def _tiny_run_config(model_dir: Path, tmp_path: Path) -> Any:
    """A RunConfig of ``model_dir`` on a one-line dataset, run folder ``tmp_path/run``."""
    from emloc_engine.data.config import DataConfig
    from emloc_engine.run.config import RunConfig

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello world"}\n')
    return RunConfig(model_dir=model_dir, data=DataConfig(path=data), run_dir=tmp_path / "run")


def _plan_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, dict[str, Any]]:
    code = main(argv)
    return code, json.loads(capsys.readouterr().out)


def test_emloc_plan_defaults_to_the_detected_gpus_free_memory(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import emloc_engine.machine.hardware as hardware

    monkeypatch.setattr(hardware, "detect_machine", lambda *a, **k: _machine(24, 20))
    code, out = _plan_json(capsys, ["plan", "Qwen2.5-14B", "--json"])
    assert out["budget_bytes"] == default_budget_bytes(20 * GIB) == 19 * GIB
    assert code == 0 and out["fits"] and out["stream_original"]  # 28 GiB of weights, trained on a 24 GB card
    assert all(s["peak_bytes"] <= out["budget_bytes"] for s in out["stages"])
    assert out["ram_bytes"] > 0 and out["total_seconds"] > 0
    code, capped = _plan_json(capsys, ["plan", "Qwen2.5-14B", "--gpu-memory", "16", "--json"])
    assert (
        capped["budget_bytes"] == default_budget_bytes(20 * GIB, 16 * GIB) and capped["ratio"] < out["ratio"]
    )
    code, given = _plan_json(capsys, ["plan", "Qwen2.5-14B", "--budget-gib", "12", "--json"])
    assert given["budget_bytes"] == 12 * GIB
    assert main(["plan", "Qwen2.5-14B"]) == 0
    text = capsys.readouterr().out
    assert "streamed" in text and "RAM up to" in text and "runs offloaded here" in text


def test_emloc_plan_says_when_ram_is_too_small(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "Llama-3-70B", "--gpu-gib", "24", "--ram-gib", "4"]) == 3
    text = capsys.readouterr().out
    assert "Cannot train: RAM" in text and "short by" in text


def test_plan_run_budget_defaults_to_free_memory_and_the_cap(tiny_llama: Path, tmp_path: Path) -> None:
    from emloc_engine.run.plan import machine_budget_bytes, plan_config_for

    cfg = _tiny_run_config(tiny_llama, tmp_path)
    machine = _machine(24, 10)
    assert machine_budget_bytes(machine) == int(9.5 * GIB)
    assert plan_config_for(cfg, machine).budget_bytes == int(9.5 * GIB)
    capped = replace(cfg, gpu_memory_bytes=4 * GIB)
    pc = plan_config_for(capped, machine)
    assert pc.budget_bytes == int(3.5 * GIB) and pc.gpu_total_bytes == 4 * GIB
    assert plan_config_for(replace(cfg, budget_bytes=2 * GIB), machine).budget_bytes == 2 * GIB
    cpu = MachineInfo(
        gpus=(), backend="cpu", cpu_cores=2, ram_total_bytes=16 * GIB, ram_available_bytes=12 * GIB
    )
    assert plan_config_for(capped, cpu).budget_bytes == default_budget_bytes(12 * GIB)  # the cap is a GPU cap


def test_every_stage_sets_the_cap_before_it_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from emloc_engine.data.config import DataConfig
    from emloc_engine.run import orchestrator
    from emloc_engine.run.config import RunConfig

    calls: list[tuple[int | None, str, int]] = []
    monkeypatch.setattr(
        orchestrator, "apply_gpu_memory_cap", lambda cap, device, gpus: calls.append((cap, device, gpus))
    )
    cfg = RunConfig(
        model_dir=tmp_path / "m",
        data=DataConfig(path=tmp_path / "d.jsonl"),
        run_dir=tmp_path / "run",
        gpu_memory_bytes=8 * GIB,
        device="cuda:1",
    )
    with orchestrator.open_run(tmp_path / "run") as session:
        session.manifest.config = cfg
        orchestrator.run_stage(
            session, "emulator", lambda: SimpleNamespace(peak_vram_gib=1.0), result_json=lambda r: {}
        )
        orchestrator.run_stage(
            session, "train", lambda: SimpleNamespace(peak_vram_gib=1.0), result_json=lambda r: {}
        )
    assert calls == [(8 * GIB, "cuda:1", 1)] * 2


def test_a_resumed_run_keeps_the_rho_its_emulator_was_built_with(tmp_path: Path) -> None:
    """The default budget follows the free memory, so a resumed run may plan another ρ; the record keeps the built one."""
    from types import SimpleNamespace

    from emloc_engine.run.manifest import Manifest, StageRecord
    from emloc_engine.run.orchestrator import _kept_plan

    m = Manifest(root=tmp_path, plan={"ratio": 0.4})
    plan: Any = SimpleNamespace(record=SimpleNamespace(ratio=0.35))
    assert _kept_plan(m, plan, None) is None  # the emulator is not built yet: today's plan
    m.stages["emulator"] = StageRecord(status="done")
    assert _kept_plan(m, plan, None) == {"ratio": 0.4}
    assert _kept_plan(m, plan, "emulator") is None  # redone: today's plan
    plan.record.ratio = 0.4
    assert _kept_plan(m, plan, None) is None


def test_assess_fit_says_runs_offloaded_with_rho_time_and_ram(tmp_path: Path) -> None:
    from emloc_engine.catalog.discovery import assess_fit
    from tests.app.fakes import reference_model_info

    fit = assess_fit(reference_model_info("Qwen2.5-14B", tmp_path), _machine(24, 23))
    assert fit.inference == "exceeds" and fit.training == "fits"
    assert fit.message.startswith("Runs offloaded here") and "EMLoC trains it at ρ = " in fit.message
    assert "in about" in fit.message and "GiB of RAM" in fit.message
    assert fit.plan.budget_bytes == default_budget_bytes(23 * GIB)


def test_plan_run_refuses_a_machine_whose_ram_is_too_small_saying_by_how_much(
    tiny_llama: Path, tmp_path: Path
) -> None:
    from emloc_engine.core.errors import InsufficientMemory
    from emloc_engine.run.plan import plan_run

    cfg = _tiny_run_config(tiny_llama, tmp_path)
    tiny_ram = MachineInfo(
        gpus=_machine(24, 20).gpus, backend="cuda", cpu_cores=2, ram_total_bytes=GIB, ram_available_bytes=GIB
    )
    with pytest.raises(InsufficientMemory) as exc:
        plan_run(cfg, tiny_ram)
    assert any(p.startswith("RAM:") and "short by" in p for p in exc.value.problems)
    plan = plan_run(cfg, _machine(24, 20))
    assert plan.stream_original is False and plan.record.stream_original is False
    assert plan.export is None or plan.export.memory_budget_bytes == plan.memory.budget_bytes


def test_streamed_planning_and_the_budget_import_no_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from emloc_engine.run.planning import PlanConfig, plan_memory; "
        "from emloc_engine.catalog.model_facts import reference_facts; import emloc_engine.machine.budget; "
        "p = plan_memory(reference_facts('Llama-3-8B'), PlanConfig(gpu_total_bytes=8 * 2**30)); "
        "print(p.stream_original, 'torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["True", "False"]


def test_plan_run_streams_the_original_in_every_stage_that_uses_it_when_the_plan_says_so(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from emloc_engine.run import plan_streaming
    from emloc_engine.run.plan import plan_run

    cfg = _tiny_run_config(tiny_llama, tmp_path)
    resident = plan_run(cfg, _machine(24, 20))
    assert not (
        resident.stream_original or resident.train.stream_original or resident.correct.stream_original
    )
    monkeypatch.setattr(plan_streaming, "decide_streaming", lambda facts, cfg, budget: True)
    streamed = plan_run(cfg, _machine(24, 20))
    assert streamed.stream_original and streamed.record.stream_original and streamed.memory.stream_original
    assert streamed.train.stream_original and streamed.correct.stream_original
    assert streamed.export is not None and streamed.export.stream_original
    assert any(n.startswith("The original does not fit") for n in streamed.notes)


def test_a_per_stage_export_keeps_to_the_budget_and_streaming_the_run_recorded() -> None:
    from emloc_engine.run.plan import recorded_memory

    assert recorded_memory(None) == (None, False)
    assert recorded_memory({"budget_gib": 15.5, "device": "cuda", "stream_original": True}) == (
        int(15.5 * GIB),
        True,
    )
    assert recorded_memory({"budget_gib": 12.0, "device": "cpu"}) == (
        None,
        False,
    )  # a RAM budget binds no GPU


@pytest.mark.parametrize("typed", ["abc", "24GB", "-5", "0", "inf", "nan"])
def test_a_size_in_gib_that_is_not_a_positive_number_is_refused_naming_the_option(
    typed: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError) as err:
        build_config(
            None,
            {"gpu_memory_bytes": typed},
            model_dir=tmp_path / "m",
            data_path=tmp_path / "d.jsonl",
            run_dir=tmp_path / "r",
        )
    assert f"--gpu-memory takes a positive number of GiB, e.g. --gpu-memory 24 (got {typed!r})" in str(
        err.value
    )
    assert "--gpu-memory 24" in err.value.hint
    with pytest.raises(SystemExit):  # emloc plan: argparse's error, same words
        main(["plan", "Llama-3-8B", "--gpu-gib", "24", "--gpu-memory", typed])
    assert "--gpu-memory takes a positive number of GiB" in capsys.readouterr().err


def test_run_config_names_the_option_and_gib_of_a_non_positive_size(tmp_path: Path) -> None:
    from emloc_engine.data.config import DataConfig
    from emloc_engine.run.config import RunConfig

    with pytest.raises(ConfigError) as err:
        RunConfig(
            model_dir=tmp_path,
            data=DataConfig(path=tmp_path / "d.jsonl"),
            run_dir=tmp_path / "r",
            gpu_memory_bytes=-5 * GIB,
            budget_bytes=0,
        )
    assert "the GPU memory cap (--gpu-memory) must be positive (got -5 GiB)" in err.value.problems
    assert "the memory budget (--budget-gib) must be positive (got 0 GiB)" in err.value.problems


def test_plan_run_says_when_the_gpu_memory_cap_is_larger_than_the_card(
    tiny_llama: Path, tmp_path: Path
) -> None:
    from emloc_engine.run.plan import plan_run

    cfg = _tiny_run_config(tiny_llama, tmp_path)
    too_big = plan_run(replace(cfg, gpu_memory_bytes=80 * GIB), _machine(24, 20))
    note = next(n for n in too_big.notes if n.startswith("--gpu-memory"))
    assert "80 GiB" in note and "RTX 4090's 24.0 GiB" in note and "caps nothing" in note
    fine = plan_run(replace(cfg, gpu_memory_bytes=16 * GIB), _machine(24, 20))
    assert not any(n.startswith("--gpu-memory") for n in fine.notes)


def test_a_budget_above_the_device_is_capped_and_says_so(tiny_llama: Path, tmp_path: Path) -> None:
    from emloc_engine.run.plan import plan_run

    cfg = _tiny_run_config(tiny_llama, tmp_path)
    plan = plan_run(replace(cfg, budget_bytes=100 * GIB), _machine(24, 20))
    assert (
        plan.memory.budget_bytes == 24 * GIB
        and plan.budget_note == "user budget, capped at the device's size"
    )
    assert "Budget 100.0 GiB is more than the GPU (24.0 GiB); planning for the GPU instead." in plan.notes
    assert plan_run(replace(cfg, budget_bytes=16 * GIB), _machine(24, 20)).budget_note == "user budget"
