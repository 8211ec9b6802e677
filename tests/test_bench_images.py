"""The image GPU benchmark's code path on a tiny FLUX pipeline on the CPU (the lead runs the real shapes):
one call and the same run split over four calls, as the device scripts split FLUX.1-dev, give every stage."""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks import bench_images

BASE = ["--model", "tiny-flux", "--device", "cpu", "--resolution", "32", "--steps", "2", "--ratio", "0.65"]
MEASURED = {"cache", "inference", "emulator", "train", "correct", "train_anchored", "plain_lora"}


def _stages(path: Path) -> dict[str, dict]:
    return {k: v for k, v in json.loads(path.read_text()).items() if k in MEASURED}


def test_one_call_and_four_calls_measure_every_stage(tmp_path: Path) -> None:
    one = tmp_path / "one.json"
    bench_images.main([*BASE, "--anchor", "--work", str(tmp_path / "w1"), "--out", str(one)])
    whole = _stages(one)
    assert set(whole) == MEASURED
    assert json.loads(one.read_text())["predicted_gib"].keys() >= {"train", "train_anchored"}
    for name in ("train", "train_anchored"):
        assert len(whole[name]["losses"]) == 2 and all(math.isfinite(x) for x in whole[name]["losses"])
    # the anchored run trains another model (the emulator anchored to the original), so another loss
    assert whole["train_anchored"]["losses"] != whole["train"]["losses"]

    w2, split = str(tmp_path / "w2"), tmp_path / "split.json"
    bench_images.main([*BASE, "--work", w2, "--last-stage", "inference"])
    bench_images.main([*BASE, "--work", w2, "--from-stage", "emulator", "--last-stage", "emulator"])
    built = (Path(w2) / "run-tiny-flux" / "emulator" / "emloc.json").stat().st_mtime_ns
    bench_images.main([*BASE, "--work", w2, "--from-stage", "train", "--last-stage", "correct"])
    bench_images.main([*BASE, "--anchor", "--work", w2, "--from-stage", "plain_lora", "--out", str(split)])
    # the later calls reopen the emulator the second call built, they do not rebuild it
    assert (Path(w2) / "run-tiny-flux" / "emulator" / "emloc.json").stat().st_mtime_ns == built
    parts = _stages(split)
    assert set(parts) == MEASURED
    assert parts["train"]["losses"] == whole["train"]["losses"]  # the same seeds, data and emulator
    assert parts["emulator"]["params_kept"] == whole["emulator"]["params_kept"]
    # measured again on the same work folder, training starts over instead of resuming its finished checkpoint
    again = tmp_path / "again.json"
    bench_images.main([*BASE, "--anchor", "--work", w2, "--from-stage", "train", "--skip", "correct", "plain_lora",
                       "--out", str(again)])
    for name in ("train", "train_anchored"):
        assert _stages(again)[name]["resumed_from"] == 0
        assert _stages(again)[name]["losses"] == whole[name]["losses"]


def test_skipped_stages_are_not_measured(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    bench_images.main([*BASE, "--work", str(tmp_path / "w"), "--skip", "correct", "plain_lora",
                       "--last-stage", "train", "--out", str(out)])
    assert set(_stages(out)) == {"cache", "inference", "emulator", "train"}


def test_a_failed_training_is_recorded_and_probed(tmp_path: Path, monkeypatch) -> None:
    """A training stage stopped by a non-finite loss is recorded (the later stages still run) and, with --probe,
    the block magnitudes of emulator and original and the non-finite gradients are recorded beside it."""
    from emloc_engine.core.errors import ConfigError

    def diverged(*_a, **_k):
        raise ConfigError("The training loss became nan at step 2.", hint="Lower the learning rate.")

    monkeypatch.setattr(bench_images, "train_image_lora", diverged)
    out = tmp_path / "r.json"
    bench_images.main([*BASE, "--work", str(tmp_path / "w"), "--probe", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["train"]["peak_gib"] == "error" and "nan at step 2" in res["train"]["error"]
    assert "correct" not in res  # no adapter to correct
    assert math.isfinite(res["plain_lora"]["last_loss"])  # the stages after the failure still ran
    probe = res["train"]["probe"]
    n = len(probe["blocks"])
    assert n > 0 and len(probe["emulator"]["block_amax"]) == n == len(probe["original"]["block_amax"])
    assert all(math.isfinite(x) and x > 0 for x in probe["emulator"]["block_amax"] + probe["original"]["block_amax"])
    assert math.isfinite(probe["emulator"]["loss"]) and math.isfinite(probe["original"]["loss"])
    assert probe["emulator"]["nonfinite_grads"] == 0


def test_the_flux_depth_stand_in_trains_both_ways_in_bf16(tmp_path: Path) -> None:
    """flux_depth_standin at two blocks of width 128: bf16, checkpointing, the original streamed by copies; both
    trainings finite, the anchored one a different model, the probe's magnitudes recorded for every block."""
    import torch

    from benchmarks import flux_depth_standin
    from emloc_engine.images import placement
    from emloc_engine.machine import devices

    transfer = placement._transfer
    out = flux_depth_standin.main(["--work", str(tmp_path), "--width", "128", "--double", "1", "--single", "1",
                                   "--steps", "2", "--out", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(out))
    for anchor in ("none", "blocks"):
        assert len(out[f"losses_{anchor}"]) == 2 and all(math.isfinite(x) for x in out[f"losses_{anchor}"])
    assert out["losses_blocks"] != out["losses_none"]
    assert len(out["probe"]["emulator"]["block_amax"]) == 2 and out["probe"]["emulator"]["nonfinite_grads"] == 0
    # what it replaced to run as on a GPU is put back (the rest of the suite runs in this process)
    assert devices.compute_dtype(torch.device("cpu")) == torch.float32 and placement._transfer is transfer


def test_the_stand_in_names_a_width_it_cannot_build(tmp_path: Path, capsys) -> None:
    import pytest

    from benchmarks import flux_depth_standin

    with pytest.raises(SystemExit) as exc:
        flux_depth_standin.main(["--work", str(tmp_path), "--width", "200"])
    assert exc.value.code == 2
    assert "--width must be a positive multiple of 128" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written
