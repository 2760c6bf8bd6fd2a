"""Content hashes of weight files, used as cache keys and printed on the report's model card."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

_CHUNK = 1 << 22  # 4 MiB reads keep memory flat for multi-GB files
_memo: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of one file's bytes, memoized in-process on (path, size, mtime)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _memo:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        _memo[key] = digest.hexdigest()
    return _memo[key]


def files_sha256(paths: Iterable[Path]) -> str:
    """sha256 over the (name, sha256) pairs of several files, in the order given."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()
