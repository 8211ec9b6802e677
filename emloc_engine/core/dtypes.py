"""Tensor dtypes by name and their size in bytes, without torch.

Two spellings name the same dtypes: safetensors headers use codes (``"BF16"``, ``"F32"``), torch
and ``config.json`` use names (``"bfloat16"``, ``"float32"``). :data:`SAFETENSORS_NAMES` maps the
codes to the names and :data:`ELEMENT_BYTES` gives the bytes of each name; :func:`element_bytes`
accepts either spelling. The planner and the model catalog size models from these tables without
importing torch; the torch side builds its ``torch.dtype`` tables from them.
"""

from __future__ import annotations

SAFETENSORS_NAMES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
"""safetensors dtype code -> torch dtype name."""

ELEMENT_BYTES: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
}
"""torch dtype name -> bytes per element."""

FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})
"""safetensors codes of the float formats a model computes in (fp8 is a storage format only)."""

_UNKNOWN_BYTES = 2


def dtype_name(dtype: str) -> str:
    """The torch name of a safetensors code (``"BF16"`` -> ``"bfloat16"``); names pass through.

    An unknown code comes back lower-cased, so it never matches a known name by accident.
    """
    if dtype in ELEMENT_BYTES:
        return dtype
    return SAFETENSORS_NAMES.get(dtype, dtype.lower())


def element_bytes(dtype: str) -> int:
    """Bytes per element of a dtype given as a safetensors code or a torch name.

    An unknown dtype counts as 2 bytes, the size of the 16-bit formats almost every checkpoint is
    stored in: sizes are estimates for planning and progress, never offsets into a file.
    """
    return ELEMENT_BYTES.get(dtype_name(dtype), _UNKNOWN_BYTES)


__all__ = ["ELEMENT_BYTES", "FLOAT_CODES", "SAFETENSORS_NAMES", "dtype_name", "element_bytes"]
