"""What a GGUF file says about its own quantization, read from its header alone (no tensor data).

``gguf.GGUFReader`` maps the whole file and builds every tensor's description (seconds for a large model); the
audit only needs ``general.file_type`` (e.g. ``MOSTLY_Q4_1``), which sits among the first key/value pairs. This
reads the header sequentially (GGUF v2/v3: magic, version, tensor count, key/value count, then the pairs) and
stops at that key.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

# GGUF value types -> struct format of one scalar (8: string, 9: array are handled apart).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_MAX_KEYS = 4096  # a header with more pairs than this before general.file_type is not worth reading on


def _read(handle: BinaryIO, fmt: str) -> int | float | bool:
    size = struct.calcsize(fmt)
    data = handle.read(size)
    if len(data) != size:
        raise EOFError("truncated GGUF header")
    return struct.unpack(fmt, data)[0]


def _string(handle: BinaryIO) -> str:
    length = int(_read(handle, "<Q"))
    return handle.read(length).decode("utf-8", errors="replace")


def _skip_value(handle: BinaryIO, kind: int) -> None:
    if kind == 8:
        handle.seek(int(_read(handle, "<Q")), 1)
    elif kind == 9:
        item, count = int(_read(handle, "<I")), int(_read(handle, "<Q"))
        if item in _SCALARS:
            handle.seek(struct.calcsize(_SCALARS[item]) * count, 1)
        else:
            for _ in range(count):
                _skip_value(handle, item)
    elif kind in _SCALARS:
        handle.seek(struct.calcsize(_SCALARS[kind]), 1)
    else:
        raise ValueError(f"unknown GGUF value type {kind}")


def gguf_file_type(path: Path) -> str | None:
    """The file's ``general.file_type`` as llama.cpp names it without ``MOSTLY_`` (``"Q4_1"``, ``"Q4_K_M"``,
    ``"F16"``), or ``None`` when the header does not say or cannot be read."""
    try:
        with Path(path).open("rb") as handle:
            if handle.read(4) != b"GGUF":
                return None
            version = int(_read(handle, "<I"))
            if version < 2:
                return None
            _read(handle, "<Q")  # tensor count
            n_pairs = int(_read(handle, "<Q"))
            for _ in range(min(n_pairs, _MAX_KEYS)):
                key = _string(handle)
                kind = int(_read(handle, "<I"))
                if key == "general.file_type" and kind in _SCALARS:
                    return _file_type_name(int(_read(handle, _SCALARS[kind])))
                _skip_value(handle, kind)
    except (OSError, EOFError, ValueError, struct.error):
        return None
    return None


def _file_type_name(value: int) -> str:
    try:
        from gguf import LlamaFileType

        return LlamaFileType(value).name.removeprefix("MOSTLY_")
    except (ImportError, ValueError):
        return f"file_type {value}"
