"""Tiny random models of every supported family, saved like the Hugging Face hub cache.

``build_tiny_model("llama", cache_dir)`` writes
``cache_dir/models--emloc-test--tiny-llama/snapshots/<rev>/`` with ``config.json``, safetensors
weights (deterministic: seeded per architecture), ``generation_config.json`` and a byte-level
tokenizer (a ``tokenizers`` byte-level BPE with no merges: needs no files or network) carrying a ChatML
chat template, plus
``refs/main``. It returns the snapshot folder.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ARCHS = ("llama", "qwen2", "mistral", "gemma", "phi3")
VOCAB = 320  # tokenizer: 4 specials + 256 byte symbols; the rest of the rows are unused
SPECIALS = ("<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")
PAD_ID, EOS_ID = 0, 3
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TEXT_CONFIG: dict[str, Any] = dict(  # the decoder every tiny model shares (tests/tiny_vlms.py's language models too)
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=3,
    pad_token_id=0,
)


def tiny_config(arch: str, **overrides: Any) -> Any:
    """A ``PretrainedConfig`` of the given family: 2 blocks, width 32 (48 for Phi-3's fused projections)."""
    from transformers import AutoConfig

    kw = dict(TEXT_CONFIG)
    if arch == "gemma":
        kw.update(head_dim=8, tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh")
    if arch == "phi3":
        kw.update(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4)
    if arch == "mistral":
        kw.update(sliding_window=None)
    kw.update(overrides)
    return AutoConfig.for_model(arch, **kw)


def make_tokenizer(extra_specials: tuple[str, ...] = (), *, named: dict[str, str] | None = None,
                   chat_template: str = CHAT_TEMPLATE) -> Any:
    """A byte-level tokenizer that needs no files, with a ChatML template (``<|im_end|>`` ends a turn).

    ``extra_specials`` (a VLM's image tokens) get the ids after :data:`SPECIALS`; ``named`` gives some of them
    attribute names (``image_token``...) as a processor expects.
    """
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    specials = (*SPECIALS, *extra_specials)
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    assert len(vocab) <= VOCAB
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(list(specials))
    extra: dict[str, Any] = {"extra_special_tokens": named} if named else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<|im_end|>", **extra)
    tok.chat_template = chat_template
    return tok


def save_in_hub_cache(cache_dir: Path, org: str, name: str, rev: str, save: Callable[[Path], object]) -> Path:
    """Run ``save(folder)`` on ``cache_dir/models--ORG--NAME/snapshots/REV``, then point ``refs/main`` at REV
    (the hub cache's layout; tests/tiny_pipelines.py saves its pipelines so too); returns the snapshot folder."""
    repo = Path(cache_dir) / f"models--{org}--{name}"
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True, exist_ok=True)
    save(snap)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    return snap


def write_snapshot(model: Any, cache_dir: Path, org: str, name: str, rev: str, *, max_new_tokens: int) -> Path:
    """Save ``model`` and its generation config in the hub cache (:func:`save_in_hub_cache`); returns the
    snapshot folder (the caller adds its tokenizer)."""
    from transformers import GenerationConfig

    def save(snap: Path) -> None:
        model.save_pretrained(snap)
        GenerationConfig(eos_token_id=EOS_ID, pad_token_id=PAD_ID, max_new_tokens=max_new_tokens).save_pretrained(snap)

    return save_in_hub_cache(cache_dir, org, name, rev, save)


def build_tiny_model(arch: str, cache_dir: Path, *, org: str = "emloc-test", name: str | None = None,
                     seed: int | None = None, dtype: torch.dtype = torch.float32, weight_std: float = 0.2,
                     **overrides: Any) -> Path:
    """Create a tiny model of family ``arch`` in an HF-cache-shaped folder; return its snapshot folder.

    ``weight_std``: the spread of every matrix; larger values give sharper attention and larger
    activations, i.e. a model whose logits react more to rounding of its weights.
    """
    from transformers import AutoModelForCausalLM

    name = name or f"tiny-{arch}"
    config = tiny_config(arch, **overrides)
    seed = seed if seed is not None else int(hashlib.sha256(arch.encode()).hexdigest()[:8], 16)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():  # deterministic, not too small, so low-rank effects are visible
            if p.dim() >= 2:
                p.normal_(0.0, weight_std)
            else:
                p.uniform_(0.8, 1.2) if p.numel() == config.hidden_size else p.normal_(0.0, 0.05)
    model = model.to(dtype)
    rev = hashlib.sha1(f"{arch}-{seed}-{weight_std}-{sorted(overrides.items())}".encode()).hexdigest()
    snap = write_snapshot(model, cache_dir, org, name, rev, max_new_tokens=16)
    make_tokenizer().save_pretrained(snap)
    return snap
