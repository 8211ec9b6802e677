"""One device rule for every stage: auto = CUDA, then MPS, then CPU; fp32 on MPS and CPU."""

from __future__ import annotations

import pytest
import torch

from emloc_engine.core.errors import ConfigError
from emloc_engine.machine import devices


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "mps_available", lambda: False)


def test_auto_prefers_cuda_then_mps_then_cpu(no_gpu: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert devices.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(devices, "mps_available", lambda: True)
    assert devices.resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.resolve_device("auto") == torch.device("cuda")


def test_a_named_device_that_is_missing_is_a_config_error(no_gpu: None) -> None:
    assert devices.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="cuda:1 was requested") as err:
        devices.resolve_device("cuda:1")
    assert "--device cpu" in err.value.hint
    with pytest.raises(ConfigError, match="Metal"):
        devices.resolve_device("mps")


def test_compute_dtype_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert devices.compute_dtype(torch.device("cpu")) == torch.float32
    assert devices.compute_dtype(torch.device("mps")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert devices.compute_dtype(torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert devices.compute_dtype(torch.device("cuda:1")) == torch.float16
    assert devices.compute_dtype(torch.device("cpu"), "bfloat16") == torch.bfloat16
    with pytest.raises(ConfigError, match="int8"):
        devices.compute_dtype(torch.device("cpu"), "int8")


def test_float64_linear_algebra_leaves_mps_for_the_cpu() -> None:
    assert devices.linalg_device(torch.device("mps")) == torch.device("cpu")
    assert devices.linalg_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert devices.linalg_device(torch.device("cpu")) == torch.device("cpu")
