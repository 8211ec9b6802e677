"""Stage 2: LoRA on the emulator, a standard adapter for the original model, exact resume, cancel."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from emloc_engine.core.architectures import arch_spec
from emloc_engine.core.errors import Cancelled, ConfigError, InsufficientMemory
from emloc_engine.core.progress import RecordingProgress
from emloc_engine.data import DataConfig, Example
from emloc_engine.stages.training.batches import collate, label_tokens, micro_batch_indices
from emloc_engine.stages.training.lora_layers import (
    LowRankLoraLinear,
    attach_lora,
    lora_config,
    lora_modules,
    resolve_targets,
)
from emloc_engine.stages.training.trainer import (
    TrainConfig,
    list_checkpoints,
    lm_loss_sum,
    train_lora,
    train_on_examples,
)
from emloc_engine.weights.checkpoint import Checkpoint
from emloc_engine.weights.headers import load_config
from emloc_engine.weights.lowrank import LowRankLinear, load_emulator
from tests.emulator_factory import write_svd_emulator

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = ("the cat sat on the mat.", "a bird in the hand.", "to be or not to be.", "all that glitters.",
         "the quick brown fox.", "jumps over the dog.")


Ex = Example


def examples(model_dir: Path, texts: tuple[str, ...] = TEXTS) -> list[Ex]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for t in texts:
        ids = (*tok(t)["input_ids"], 3)
        out.append(Ex(ids, (-100,) * 4 + ids[4:]))  # no loss on the first tokens, like a prompt
    return out


def make_dense(emu_dir: Path, model_dir: Path, module: str) -> None:
    """Turn one compressed module of an emulator back into the dense original layer."""
    path = emu_dir / "model.safetensors"
    tensors = load_file(str(path))
    del tensors[f"{module}.u.weight"], tensors[f"{module}.v.weight"]
    tensors[f"{module}.weight"] = Checkpoint(model_dir).get(f"{module}.weight")
    save_file(tensors, str(path), metadata={"format": "pt"})
    meta = json.loads((emu_dir / "emloc.json").read_text())
    del meta["modules"][module]
    (emu_dir / "emloc.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def llama_run(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(original model dir, emulator dir) of the tiny Llama at ρ = 0.5, down_proj of block 1 kept dense."""
    emu = write_svd_emulator(tiny_llama, tmp_path_factory.mktemp("emu") / "emulator", ratio=0.5)
    make_dense(emu, tiny_llama, "model.layers.1.mlp.down_proj")
    return tiny_llama, emu


def cfg_for(run_dir: Path, emu: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(rank=4, alpha=8.0, dropout=0.1, steps=8, lr=5e-3, batch_size=2, grad_accum=2,
                                warmup_steps=2, eval_every=4, save_every=3, grad_checkpointing=True, device="cpu")
    base.update(kw)
    return TrainConfig(run_dir=run_dir, data=DataConfig(path=run_dir / "unused.jsonl"), emulator_dir=emu, **base)


# ---------------------------------------------------------------------------------------------
# The adapter is a standard adapter of the original model.


def test_adapter_keys_match_original_and_load(tiny_model_dir: Path, tmp_path: Path) -> None:
    emu = load_emulator(write_svd_emulator(tiny_model_dir, tmp_path / "emu", ratio=0.4))
    spec = arch_spec(load_config(tiny_model_dir))
    targets = resolve_targets(emu, (), spec.short_names)
    pm = attach_lora(emu, lora_config(4, 8.0, 0.0, targets, False, str(tiny_model_dir)))
    wrapped = lora_modules(pm)
    assert len(wrapped) == 2 * len(spec.linear_modules)
    assert all(isinstance(m, LowRankLoraLinear) for m in wrapped.values())
    pm.save_pretrained(tmp_path / "adapter")

    ref = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                         LoraConfig(r=4, lora_alpha=8, target_modules=list(spec.short_names), task_type="CAUSAL_LM"))
    shapes = {k: tuple(v.shape) for k, v in pm.state_dict().items() if "lora_" in k}
    assert shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items() if "lora_" in k}

    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    assert sorted(config["target_modules"]) == sorted(spec.short_names)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # peft warns about missing/unexpected adapter keys
        loaded = PeftModel.from_pretrained(original, tmp_path / "adapter")
    result = loaded.load_adapter(tmp_path / "adapter", adapter_name="again")
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k and ".again." in k]
    state = loaded.state_dict()
    for key, value in saved.items():
        assert torch.equal(state[key.replace(".weight", ".default.weight")], value), key


def test_lora_forward_is_composite_plus_scaled_update(llama_run: tuple[Path, Path]) -> None:
    _, emu_dir = llama_run
    for rslora, scale in ((False, 12.0 / 4), (True, 12.0 / 2)):
        emu = load_emulator(emu_dir, dtype=torch.float64)
        pm = attach_lora(emu, lora_config(4, 12.0, 0.0, ("q_proj", "down_proj"), rslora))
        mods = lora_modules(pm)
        layer = mods["model.layers.0.self_attn.q_proj"]
        assert isinstance(layer.base_layer, LowRankLinear) and layer.scaling["default"] == pytest.approx(scale)
        torch.nn.init.normal_(layer.lora_B["default"].weight)
        a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        u, v = layer.base_layer.u.weight, layer.base_layer.v.weight
        x = torch.randn(3, 5, 32, dtype=torch.float64)
        expected = (x @ v.T) @ u.T + scale * ((x @ a.T) @ b.T)
        assert torch.allclose(layer(x), expected, atol=1e-12)
        assert torch.allclose(layer.base_layer.weight, u @ v)  # the attach-time shortcut is undone
        dense = mods["model.layers.1.mlp.down_proj"]  # kept dense in the emulator: ordinary peft LoRA
        assert isinstance(dense.base_layer, torch.nn.Linear) and not isinstance(dense, LowRankLoraLinear)


def test_bad_targets_are_named(llama_run: tuple[Path, Path]) -> None:
    emu = load_emulator(llama_run[1])
    with pytest.raises(ConfigError) as err:
        resolve_targets(emu, ("q_proj", "u", "nonsense", "*_proj"), ())
    text = str(err.value)
    assert "'u'" in text and "'nonsense'" in text and "'*_proj'" in text and "'q_proj'" not in text
    assert "Choose among" in text and "gate_proj" in text


# ---------------------------------------------------------------------------------------------
# Pieces of the loop.


def test_loss_matches_model_loss_and_gradients(llama_run: tuple[Path, Path]) -> None:
    model_dir = llama_run[0]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    batch = collate(examples(model_dir)[:3], pad_id=0)
    assert label_tokens(batch) == int((batch["labels"][:, 1:] != -100).sum()) > 0
    ours = lm_loss_sum(model, batch, chunk_tokens=7)
    g_ours = torch.autograd.grad(ours, model.lm_head.weight)[0]
    ref = model(**batch).loss * label_tokens(batch)
    g_ref = torch.autograd.grad(ref, model.lm_head.weight)[0]
    assert ours.item() == pytest.approx(ref.item(), rel=1e-10)
    assert torch.allclose(g_ours, g_ref, atol=1e-10)


def test_collate_pads_with_pad_id_and_masks_labels() -> None:
    b = collate([Ex((5, 6, 7), (-100, 6, 7)), Ex((8,), (8,))], pad_id=9)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_data_order_is_a_seeded_permutation_per_epoch() -> None:
    epoch0 = [i for m in range(4) for i in micro_batch_indices(7, 2, 0, m)]
    epoch1 = [i for m in range(4, 8) for i in micro_batch_indices(7, 2, 0, m)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(7))
    assert epoch0 != epoch1
    assert micro_batch_indices(7, 2, 0, 5) == micro_batch_indices(7, 2, 0, 5)
    assert [i for m in range(4) for i in micro_batch_indices(7, 2, 1, m)] != epoch0


def test_settings_are_validated_all_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        cfg_for(tmp_path, tmp_path, rank=0, lr=-1.0, schedule="step", device="tpu", dtype="int8")
    assert len(err.value.problems) == 5
    assert cfg_for(tmp_path, tmp_path, steps=5, warmup_steps=10).effective_warmup() == 0
    with pytest.raises(ConfigError, match="CPU"):
        train_on_examples(cfg_for(tmp_path, tmp_path, dtype="bfloat16"), [Ex((1, 2), (1, 2))], [])


# ---------------------------------------------------------------------------------------------
# Training, resume, cancel.


def write_chat_data(path: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w} {w}!"}]}
            for w in ("apple", "river", "stone", "cloud", "tiger", "lemon", "piano")]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_training_memorises_and_writes_standard_adapter(llama_run: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, emu = llama_run
    run_dir = tmp_path / "run"
    shutil.copytree(emu, run_dir / "emulator")  # the default place: RUN_DIR/emulator
    progress = RecordingProgress()
    cfg = TrainConfig(run_dir=run_dir, data=DataConfig(path=write_chat_data(tmp_path / "chat.jsonl"), max_length=64),
                      steps=30, lr=2e-2, dropout=0.0, warmup_steps=3, eval_every=15, save_every=15, batch_size=3,
                      rank=8, alpha=16.0, use_rslora=True, grad_checkpointing=False, device="cpu")
    result = train_lora(cfg, progress)
    losses = [v for _, v in result.loss_history]
    assert [s for s, _ in result.loss_history] == list(range(1, 31))
    assert losses[-1] < 0.5 * losses[0], losses
    assert [s for s, _ in result.eval_history] == [15, 30] and result.final_eval_loss == result.eval_history[-1][1]
    assert result.peak_vram_gib == 0.0 and result.tokens_per_s > 0 and result.resumed_from_step is None
    lrs = [v for _, v in result.lr_history]
    assert lrs[0] == pytest.approx(2e-2 / 3) and max(lrs) == pytest.approx(2e-2) and lrs[-1] < 1e-3
    for name in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/loss", "gpu/peak_gib"):
        assert progress.values(name), name
    assert progress.updates[-1][0] == 1.0 and progress.updates[-1][1].startswith("step 30/30 · loss ")
    assert "tok/s · ETA" in progress.updates[-1][1]
    assert progress.checks == 30

    adapter = result.adapter_dir
    assert adapter == run_dir / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "emloc_training.json"} <= {
        p.name for p in adapter.iterdir()}
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(model_dir) and config["use_rslora"] is True
    assert [s for s, _ in list_checkpoints(run_dir / "checkpoints")] == [15, 30]
    # The trained adapter changes the ORIGINAL model's predictions once loaded on it.
    original = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([examples(model_dir)[0].input_ids])
    with torch.no_grad():
        base = original(ids).logits
        tuned = PeftModel.from_pretrained(original, adapter)(ids).logits
    assert (tuned - base).abs().max() > 1e-2


def _run(cfg: TrainConfig, data: list[Ex], progress: Any = None) -> Any:
    return train_on_examples(cfg, data, data[:2], progress or RecordingProgress(), pad_id=0)


class CrashAfter(RecordingProgress):
    """Simulates a crash (not a cancel) right after step ``n`` finished."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def update(self, fraction: float, message: str = "") -> None:
        super().update(fraction, message)
        if message.startswith(f"step {self.n}/"):
            raise RuntimeError("simulated crash")


def test_resume_after_crash_matches_uninterrupted_run(llama_run: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, emu = llama_run
    data = examples(model_dir)
    full = _run(cfg_for(tmp_path / "a", emu), data)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(cfg_for(tmp_path / "b", emu), data, CrashAfter(5))
    assert [s for s, _ in list_checkpoints(tmp_path / "b" / "checkpoints")] == [3]
    assert not (tmp_path / "b" / "adapter").exists()
    resumed = _run(cfg_for(tmp_path / "b", emu), data)
    assert resumed.resumed_from_step == 3 and resumed.steps_done == 8
    assert [s for s, _ in resumed.loss_history] == list(range(1, 9))
    for (_, x), (_, y) in zip(full.loss_history, resumed.loss_history):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-6)
    assert [s for s, _ in resumed.eval_history] == [s for s, _ in full.eval_history] == [4, 8]
    assert [v for _, v in resumed.eval_history] == pytest.approx([v for _, v in full.eval_history], rel=1e-5)
    a = load_file(str(full.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # A finished run resumed again does no work and keeps its result.
    again = _run(cfg_for(tmp_path / "b", emu), data)
    assert again.resumed_from_step == 8 and again.loss_history == resumed.loss_history


class _Payload:
    """Unpickling this runs code (writes ``marker``): what a hostile or foreign checkpoint could hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').write('unpickled')",)


def _spoil(state: Path, how: str, marker: Path) -> None:
    if how == "empty":
        state.write_bytes(b"")
    elif how == "truncated":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    else:  # "untrusted": a pickle that torch.load(weights_only=True) refuses
        torch.save({"step": 6, "payload": _Payload(marker)}, state)


@pytest.mark.parametrize("how", ["empty", "truncated", "untrusted"])
def test_unusable_newest_checkpoint_falls_back_to_the_previous_one(
        llama_run: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str) -> None:
    model_dir, emu = llama_run
    data = examples(model_dir)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(cfg_for(run, emu), data, CrashAfter(7))
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [3, 6]
    marker = tmp_path / "MARKER"
    _spoil(run / "checkpoints" / "step-6" / "training_state.pt", how, marker)
    with caplog.at_level("WARNING", logger="emloc_engine.stages.training.trainer"):
        resumed = _run(cfg_for(run, emu), data)
    assert resumed.resumed_from_step == 3 and resumed.steps_done == 8
    assert [s for s, _ in resumed.loss_history] == list(range(1, 9))
    assert "step-6" in caplog.text and "Trying the previous one" in caplog.text
    assert {"empty": "is empty", "truncated": "truncated or corrupt",
            "untrusted": "corrupt or untrusted"}[how] in caplog.text
    assert "weights_only=False" not in caplog.text and not marker.exists()
    assert (run / "checkpoints" / "step-6.unusable").is_dir()  # kept for inspection, out of resume's way


def test_no_usable_checkpoint_starts_from_scratch_and_says_so(
        llama_run: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model_dir, emu = llama_run
    data = examples(model_dir)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(cfg_for(tmp_path, emu), data, CrashAfter(4))
    marker = tmp_path / "MARKER"
    _spoil(tmp_path / "checkpoints" / "step-3" / "training_state.pt", "untrusted", marker)
    with caplog.at_level("WARNING", logger="emloc_engine.stages.training.trainer"):
        fresh = _run(cfg_for(tmp_path, emu), data)
    assert fresh.resumed_from_step is None and [s for s, _ in fresh.loss_history] == list(range(1, 9))
    assert "No usable training checkpoint" in caplog.text and "starts from step 0" in caplog.text
    assert "weights_only=False" not in caplog.text and not marker.exists()


def test_cancel_leaves_resumable_checkpoint(llama_run: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, emu = llama_run
    data = examples(model_dir)
    progress = RecordingProgress(cancel_after_updates=3)  # "loading" + steps 1, 2 -> stop before step 3
    with pytest.raises(Cancelled):
        _run(cfg_for(tmp_path, emu, save_every=0), data, progress)
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [2]
    assert not list((tmp_path / "checkpoints").glob("*.partial"))
    resumed = _run(cfg_for(tmp_path, emu, save_every=0), data)
    assert resumed.resumed_from_step == 2 and resumed.steps_done == 8


def test_changed_settings_refuse_resume_unless_restarted(llama_run: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, emu = llama_run
    data = examples(model_dir)
    _run(cfg_for(tmp_path, emu, steps=3), data)
    with pytest.raises(ConfigError) as err:
        _run(cfg_for(tmp_path, emu, steps=3, lr=1e-3), data)
    assert "lr: checkpoint has 0.005, now 0.001" in str(err.value)
    fresh = _run(cfg_for(tmp_path, emu, steps=3, lr=1e-3, resume=False), data)
    assert fresh.resumed_from_step is None and len(fresh.loss_history) == 3
    assert math.isfinite(fresh.loss_history[-1][1])


def test_out_of_memory_names_the_settings_to_lower(llama_run: tuple[Path, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import emloc_engine.stages.training.trainer as training

    def oom(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(training, "lm_loss_sum", oom)
    with pytest.raises(InsufficientMemory) as err:
        _run(cfg_for(tmp_path, llama_run[1], batch_size=3), examples(llama_run[0]))
    assert "batch size 3" in str(err.value) and "--batch-size" in err.value.hint and "--max-length" in err.value.hint


@pytest.mark.gpu
def test_cuda_training_uses_bf16_weights_fp32_adapter(llama_run: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, emu = llama_run
    result = _run(cfg_for(tmp_path, emu, device="cuda", steps=3), examples(model_dir))
    assert result.peak_vram_gib > 0 and all(math.isfinite(v) for _, v in result.loss_history)
    saved = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert all(t.dtype == torch.float32 for t in saved.values())
