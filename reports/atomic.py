"""Write files atomically: a temporary file in the same directory, then a rename."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> Path:
    """Readers see the old file or the new one, never half of it.

    The temporary file is created with mode 0666 filtered by the process umask, like any file ``open`` creates: a
    report is for reviewers (``tempfile.mkstemp`` would make it 0600), and reading the umask would mean setting it,
    which races with other threads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
