"""The GGUF header reader: the file type after keys of every kind (strings, arrays), and no answer (not a crash)
for anything that is not a readable GGUF header."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from lmaudit.checks.core.gguf_info import gguf_file_type


def _write(path: Path, file_type: int | None) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_token_list(["<s>", "</s>", "a", "b"])  # an array of strings before the key
    writer.add_array("test.numbers", [1, 2, 3])
    writer.add_float32("test.float", 0.5)
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.add_tensor("t", np.zeros((2, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_file_type_after_keys_of_every_kind(tmp_path: Path) -> None:
    assert gguf_file_type(_write(tmp_path / "q41.gguf", int(gguf.LlamaFileType.MOSTLY_Q4_1))) == "Q4_1"
    assert gguf_file_type(_write(tmp_path / "qkm.gguf", int(gguf.LlamaFileType.MOSTLY_Q4_K_M))) == "Q4_K_M"


def test_no_file_type_or_not_a_gguf_gives_none(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file at all")
    (tmp_path / "short.gguf").write_bytes(b"GGUF\x03\x00")
    assert gguf_file_type(_write(tmp_path / "none.gguf", None)) is None
    assert gguf_file_type(tmp_path / "x.gguf") is None
    assert gguf_file_type(tmp_path / "short.gguf") is None
    assert gguf_file_type(tmp_path / "missing.gguf") is None
