"""Hand the export to Ollama: ``RUN/Modelfile``, and the ``ollama create`` command (never run here).

What the Modelfile says, and why:

* ``FROM``: the user's own base GGUF when the run started from one (Ollama's blob or LM Studio's file,
  by absolute path; it is only read) with ``ADAPTER ./adapter.gguf`` on top, so Ollama keeps the
  quantized weights the user already runs and adds the small corrected adapter; otherwise the merged
  ``./model.gguf``. Relative paths are resolved by Ollama against the Modelfile's folder.
* ``TEMPLATE``: Ollama runs Go templates, not the Jinja chat template of the tokenizer. The common
  families are recognised by their markers and written as the Go template Ollama's own library uses
  for them (ChatML ``<|im_start|>``: Qwen, SmolLM…; Llama 3 ``<|start_header_id|>``; Mistral
  ``[INST]``; Gemma ``<start_of_turn>``; Phi-3 ``<|user|>``/``<|end|>``). Any other template is left out
  and said so in a comment: Ollama then derives the template from the GGUF's ``tokenizer.chat_template``
  (its documented behaviour for GGUF imports), which the merged file and the base file both carry.
* ``PARAMETER stop``: the family's turn markers plus the tokenizer's end-of-sequence token.
* ``PARAMETER temperature/top_p/top_k/repeat_penalty``: the base's ``generation_config.json`` defaults.

:func:`ollama_command` gives ``ollama create NAME -f RUN/Modelfile`` only when an ``ollama`` program is
on ``PATH``; the CLI prints it and the app runs it when the user clicks "Add to Ollama".
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emloc_engine.core.atomic import write_text_atomic
from emloc_engine.core.json_files import read_json_object

_CHATML = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
           "<|im_start|>assistant\n")
_LLAMA3 = ("{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
           "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n")
_MISTRAL = ("{{- range .Messages }}{{ if eq .Role \"assistant\" }} {{ .Content }}</s>"
            "{{ else }}[INST] {{ .Content }}[/INST]{{ end }}{{ end }}")
_GEMMA = ("{{- range .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}user{{ end }}\n"
          "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n")
_PHI3 = "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n"

# (family, marker in the Jinja template, Go template, stop strings), first match wins.
CHAT_FAMILIES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("llama3", "<|start_header_id|>", _LLAMA3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    ("chatml", "<|im_start|>", _CHATML, ("<|im_start|>", "<|im_end|>")),
    ("gemma", "<start_of_turn>", _GEMMA, ("<start_of_turn>", "<end_of_turn>")),
    ("phi3", "<|end|>", _PHI3, ("<|end|>", "<|user|>", "<|assistant|>")),
    ("mistral", "[INST]", _MISTRAL, ("[INST]", "[/INST]")),
)
_GEN_PARAMS = (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
               ("repetition_penalty", "repeat_penalty"))


@dataclass(frozen=True)
class ChatSettings:
    """What the base's tokenizer and generation config say about chatting with it."""

    family: str | None  # a key of CHAT_FAMILIES, None when the template is not recognised
    template: str | None  # the Go template
    stops: tuple[str, ...]
    parameters: tuple[tuple[str, float], ...]


def base_gguf_of(model_dir: Path) -> Path | None:
    """The user's GGUF a run started from: the model path itself, or the file a GGUF model view (its
    ``emloc_gguf.json`` marker) or an older import folder (``emloc_import.json``) names."""
    from emloc_engine.weights.gguf_source import GGUF_VIEW_MARKER

    p = Path(model_dir)
    if p.is_file() and p.suffix == ".gguf":
        return p
    for marker in (GGUF_VIEW_MARKER, "emloc_import.json"):
        src = read_json_object(p / marker).get("source")
        if src and Path(src).is_file():
            return Path(src)
    return None


def chat_template_of(model_dir: Path) -> str:
    """The Jinja chat template of a model folder (or a GGUF's ``tokenizer.chat_template``); "" if none."""
    p = Path(model_dir)
    if p.is_file():
        import gguf

        field = gguf.GGUFReader(str(p)).fields.get("tokenizer.chat_template")
        return str(field.contents()) if field is not None else ""
    if (p / "chat_template.jinja").is_file():
        return (p / "chat_template.jinja").read_text(encoding="utf-8")
    tmpl = read_json_object(p / "tokenizer_config.json").get("chat_template") or ""
    if isinstance(tmpl, list):  # named templates: the default one
        tmpl = next((t.get("template", "") for t in tmpl if t.get("name") == "default"), "")
    return str(tmpl)


def _gguf_eos(path: Path) -> str | None:
    """The end-of-sequence token of a GGUF (``tokenizer.ggml.eos_token_id`` into its token list)."""
    import gguf

    fields = gguf.GGUFReader(str(path)).fields
    eos, tokens = fields.get("tokenizer.ggml.eos_token_id"), fields.get("tokenizer.ggml.tokens")
    if eos is None or tokens is None:
        return None
    values = tokens.contents()
    i = int(eos.contents())
    return str(values[i]) if isinstance(values, list) and 0 <= i < len(values) else None


def chat_settings(model_dir: Path) -> ChatSettings:
    """Ollama's template, stops and defaults for a base model folder (or a GGUF file: its metadata)."""
    jinja = chat_template_of(model_dir)
    family = next((f for f in CHAT_FAMILIES if f[1] in jinja), None)
    stops = list(family[3]) if family else []
    p = Path(model_dir)
    eos = read_json_object(p / "tokenizer_config.json").get("eos_token") if p.is_dir() else _gguf_eos(p)
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if isinstance(eos, str) and eos and eos not in stops:
        stops.append(eos)
    gen = read_json_object(p / "generation_config.json") if p.is_dir() else {}
    params = tuple((name, float(gen[key])) for key, name in _GEN_PARAMS if isinstance(gen.get(key), int | float))
    return ChatSettings(family[0] if family else None, family[2] if family else None, tuple(stops), params)


def _quote(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def render_modelfile(from_path: str, adapter_path: str | None, chat: ChatSettings, header: str = "") -> str:
    """The Modelfile text (``from_path``/``adapter_path`` as Ollama should read them)."""
    lines = [f"# {line}" for line in header.splitlines()] if header else []
    lines.append(f"FROM {from_path}")
    if adapter_path:
        lines.append(f"ADAPTER {adapter_path}")
    if chat.template is not None:
        lines.append(f'TEMPLATE """{chat.template}"""')
    else:
        lines.append("# No TEMPLATE: the chat template was not one of the known families, so Ollama derives "
                     "it from the GGUF's tokenizer.chat_template.")
    lines += [f"PARAMETER stop {_quote(s)}" for s in chat.stops]
    lines += [f"PARAMETER {name} {value:g}" for name, value in chat.parameters]
    return "\n".join(lines) + "\n"


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """``[(INSTRUCTION, argument)]`` of a Modelfile (comments dropped, ``\"\"\"`` blocks and quotes undone)."""
    out: list[tuple[str, str]] = []
    i, lines = 0, text.splitlines()
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        instr, _, arg = line.partition(" ")
        arg = arg.strip()
        if arg.startswith('"""'):
            body = arg[3:]
            while not body.endswith('"""') and i < len(lines):
                body += "\n" + lines[i]
                i += 1
            arg = body[:-3]
        elif instr.upper() == "PARAMETER":
            key, _, value = arg.partition(" ")
            arg = f"{key} {json.loads(value) if value.startswith(chr(34)) else value}"
        out.append((instr.upper(), arg))
    return out


def ollama_name(base_name: str, wanted: str = "") -> str:
    """A name ``ollama create`` accepts: lower case letters, digits, ``.``, ``_``, ``-``."""
    name = wanted or f"{base_name}-emloc"
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.") or "emloc-model"


def ollama_command(modelfile: Path, name: str) -> tuple[str, ...] | None:
    """``("ollama", "create", NAME, "-f", MODELFILE)`` when an ``ollama`` program is on PATH, else None."""
    if shutil.which("ollama") is None:
        return None
    return ("ollama", "create", name, "-f", str(modelfile))


def command_text(cmd: tuple[str, ...]) -> str:
    return shlex.join(cmd)


def write_modelfile(run_dir: Path, model_dir: Path, *, merged_gguf: Path | None, adapter_gguf: Path | None,
                    name: str) -> Path:
    """Write ``RUN/Modelfile``: the base GGUF + ``./adapter.gguf`` when both exist, else ``./model.gguf``."""
    run_dir = Path(run_dir)
    base = base_gguf_of(model_dir)
    if base is not None and adapter_gguf is not None:
        from_path, adapter = str(base.resolve()), f"./{adapter_gguf.relative_to(run_dir).as_posix()}"
    elif merged_gguf is not None:
        from_path, adapter = f"./{merged_gguf.relative_to(run_dir).as_posix()}", None
    else:
        raise ValueError("a Modelfile needs the merged GGUF, or a base GGUF and the adapter GGUF")
    header = (f"Written by EMLoC Studio for {Path(model_dir).name}.\n"
              f"Add it to Ollama with: ollama create {name} -f {run_dir / 'Modelfile'}")
    path = run_dir / "Modelfile"
    write_text_atomic(path, render_modelfile(from_path, adapter, chat_settings(model_dir), header))
    return path


def add_to_ollama(cmd: tuple[str, ...], progress: Any = None) -> str:
    """Run an ``ollama create`` command the user asked for (the app's "Add to Ollama" button).

    Returns:
        Ollama's last output line.

    Raises:
        MissingTool: ``ollama`` is no longer on PATH.
        MergeError: ``ollama create`` failed (its last output lines are listed).
    """
    import subprocess

    from emloc_engine.core.errors import MergeError, MissingTool

    if progress is not None:
        progress.update(0.0, "ollama create…")
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise MissingTool("Ollama is not on PATH any more.", hint="Install Ollama from https://ollama.com.") from exc
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    if done.returncode != 0:
        raise MergeError(f"`{command_text(cmd)}` failed (exit code {done.returncode}).", problems=lines[-8:],
                         hint="Is the Ollama server running (`ollama serve`)?")
    if progress is not None:
        progress.update(1.0, "Added to Ollama")
    return lines[-1] if lines else "success"
