"""Cache entries built once, atomically, under a lock, with a manifest that every use checks.

An entry is a directory ``<root>/<key>/`` whose files a ``build(staging)`` callback writes (the dequantized GGUF
model of :mod:`~lmaudit.checks.core.loading`, the merged fine-tune of :mod:`~lmaudit.checks.core.finetune`).
:func:`cached_build` wraps the callback so that the entry is:

- **atomic**: ``build`` writes into ``<root>/.<key>.staging-<pid>-<random>/``; the manifest is written last, every
  file is fsynced, and the directory is renamed to ``<root>/<key>`` in one step. An entry is complete or absent.
  A staging (or discarded) directory that a killed process left behind is removed by the next call under
  ``root``, once its key's lock shows that nobody is building it.
- **built once**: building or repairing ``key`` holds ``<root>/<key>.lock`` (:class:`filelock.FileLock`) and looks
  at the entry again after taking it, so processes that ask for the same missing entry at once build it once.
- **checked on every use**: the manifest (:data:`MANIFEST`) records each file's size, mtime, sha256 and the
  sha256 of :data:`N_SAMPLES` blocks of :data:`SAMPLE_BYTES` bytes at fixed offsets, evenly spread from the first
  byte to the last. Every use runs the *cheap check* (sizes, mtimes, sampled blocks: at most 1 MiB read per
  file). The *full check* (every file's sha256) runs on the first use of an entry, recorded in :data:`STAMP`,
  and whenever the caller asks (``verify=True``). A file whose mtime alone changed (copied without ``-p``,
  touched) gets the full check, and when its bytes are intact the manifest takes the new mtime.
- **repaired once**: an entry that fails a check (no manifest, a missing file, another size, a changed block or
  hash) is rebuilt beside it and swapped in, with a one-line :class:`CacheEntryWarning`. When that is impossible
  (the build fails, the old entry cannot be moved, the new one fails its own check),
  :class:`~lmaudit.checks.core.errors.CacheEntryError` names the path to delete.
- **readable like any file**: files get ``0666 & ~umask`` (0644 under the usual umask) and directories
  ``0777 & ~umask``, whatever mode the builder's library chose (safetensors writes 0600, mkstemp-style).

A sampled block catches a zeroed or overwritten region only when it overlaps one; a change that keeps the size
and mtime and misses every block is caught by the full check alone. That is the price of a check that reads
~1 MiB instead of the whole entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock, Timeout

from lmaudit.checks.core.errors import CacheEntryError, LmAuditError
from lmaudit.checks.core.hashing import sha256_file
from lmaudit.reports.atomic import write_text_atomic

MANIFEST = "lmaudit-manifest.json"  # written last: its presence marks a complete entry
STAMP = "lmaudit-verified.json"  # written after a full check passes: later uses need only the cheap one
FORMAT = 1
N_SAMPLES = 16
SAMPLE_BYTES = 1 << 16  # 16 x 64 KiB = 1 MiB read per file by the cheap check
_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_LEFTOVER = re.compile(r"^\.(?P<key>[A-Za-z0-9_-]{1,128})\.(staging|discarded)-")
_OWN_FILES = (MANIFEST, STAMP)

Check = Literal["cheap", "full"]


class CacheEntryWarning(UserWarning):
    """A cache entry failed its check and was rebuilt (the message says which entry and why)."""


@dataclass(frozen=True)
class CacheEntry:
    """The outcome of :func:`cached_build`."""

    path: Path
    hit: bool  # the entry existed and passed its checks; False when this call built it
    check: Check  # the strongest check the entry passed in this call
    repaired: str | None = None  # why an existing entry was rebuilt, when it was


class _Damaged(Exception):  # noqa: N818 - internal signal, never escapes this module
    """An entry failed a check; the message says how."""


# --------------------------------------------------------------------------------------------- public entry point


def cached_build(
    root: Path,
    key: str,
    build: Callable[[Path], None],
    *,
    what: str,
    info: Mapping[str, Any] | None = None,
    verify: bool = False,
    rebuild: bool = False,
) -> CacheEntry:
    """The entry ``root/key``, checked (see the module docstring), built by ``build(staging_dir)`` when missing
    and rebuilt once when it fails a check.

    ``what`` names the entry in warnings and errors ("dequantized GGUF model.gguf"); ``info`` (JSON-able) is
    stored in the manifest. ``verify=True`` runs the full check even on an entry that passed it before;
    ``rebuild=True`` builds a fresh entry and swaps it in whatever the state of the old one.
    """
    if not _KEY.match(key):
        raise LmAuditError(f"cache key {key!r} for {what}: use 1-128 letters, digits, '-' or '_'")
    root.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(root)
    entry = root / key
    if not rebuild:
        try:
            check = _use(entry, full=verify)
            if check is not None:
                return CacheEntry(entry, hit=True, check=check)
        except _Damaged:
            pass  # repaired below, under the lock, if it is still damaged then
    with FileLock(root / f"{key}.lock"):
        damage: str | None = None
        if not rebuild:
            try:  # another process may have built or repaired the entry while this one waited
                check = _use(entry, full=verify)
                if check is not None:
                    return CacheEntry(entry, hit=True, check=check)
            except _Damaged as exc:
                damage = str(exc)
        _build_and_swap(root, key, build, info=info or {}, what=what, damage=damage)
    try:
        check = _use(entry, full=True)  # the first use of a new entry: its full check
    except _Damaged as exc:
        raise CacheEntryError(
            f"{what}: the cache entry {entry} failed its check right after it was built ({exc}); "
            f"delete {entry} and run again, and check the disk if it happens twice"
        ) from exc
    if check is None:  # someone deleted it between the swap and this check
        raise CacheEntryError(f"{what}: the cache entry {entry} vanished right after it was built; run again")
    return CacheEntry(entry, hit=False, check=check, repaired=damage)


def sweep_leftovers(root: Path) -> list[Path]:
    """Remove staging and discarded directories under ``root`` whose key nobody holds the lock of (a process was
    killed mid-build); returns what was removed. A build in progress holds its key's lock and is left alone."""
    removed: list[Path] = []
    try:
        children = list(root.iterdir())
    except FileNotFoundError:
        return removed
    for child in children:
        match = _LEFTOVER.match(child.name)
        if match is None or not child.is_dir():
            continue
        try:
            with FileLock(root / f"{match['key']}.lock", timeout=0):
                shutil.rmtree(child, ignore_errors=True)
        except Timeout:
            continue  # a live build owns it
        if not child.exists():
            removed.append(child)
    return removed


# -------------------------------------------------------------------------------------------------- the checks


def _use(entry: Path, *, full: bool) -> Check | None:
    """``None`` when the entry is absent; else the check it passed. Raises :class:`_Damaged`, also when a file
    vanishes mid-check (another process is moving a damaged entry aside: the caller then waits on the lock)."""
    if not entry.is_dir():
        return None
    try:
        return _check(entry, full=full)
    except OSError as exc:
        raise _Damaged(f"unreadable: {exc}") from None
    except (KeyError, TypeError, AttributeError) as exc:
        raise _Damaged(f"malformed {MANIFEST}: {type(exc).__name__}: {exc}") from None


def _check(entry: Path, *, full: bool) -> Check:
    manifest_path = entry / MANIFEST
    try:
        raw = manifest_path.read_bytes()
        manifest = json.loads(raw)
        files: dict[str, dict[str, Any]] = manifest["files"]
        if manifest.get("format") != FORMAT:
            raise _Damaged(f"manifest format {manifest.get('format')!r}, expected {FORMAT}")
    except FileNotFoundError:
        raise _Damaged(f"incomplete: no {MANIFEST} (an interrupted build, or one from before manifests)") from None
    except ValueError as exc:
        raise _Damaged(f"unreadable {MANIFEST}: {exc}") from None
    moved = _cheap_check(entry, files)
    stamped = _stamp_matches(entry, raw)
    if not (full or moved or not stamped):
        return "cheap"
    for name, record in files.items():
        if sha256_file(entry / name) != record["sha256"]:
            raise _Damaged(f"{name}: sha256 differs from the manifest")
    # Bookkeeping writes may fail on a read-only cache: the entry is still good, and gets the full check next time.
    with suppress(OSError):
        if moved:  # same bytes, new mtimes: record them so the next cheap check passes
            for name in moved:
                files[name]["mtime_ns"] = (entry / name).stat().st_mtime_ns
            text = _manifest_text(manifest)
            write_text_atomic(manifest_path, text)
            raw = text.encode()
        if moved or not stamped:
            stamp = {"manifest_sha256": hashlib.sha256(raw).hexdigest(), "verified_at": time.time()}
            write_text_atomic(entry / STAMP, json.dumps(stamp))
    return "full"


def _cheap_check(entry: Path, files: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Raise :class:`_Damaged` on a missing file, another size or a changed sampled block; return the files whose
    mtime alone differs (their bytes need the full check)."""
    moved = []
    for name, record in files.items():
        path = entry / name
        try:
            info = path.stat()
        except FileNotFoundError:
            raise _Damaged(f"{name} is missing") from None
        if info.st_size != record["size"]:
            raise _Damaged(f"{name} has {info.st_size} bytes, the manifest says {record['size']}")
        expected = record["samples"]
        changed = [offset for (offset, _), digest in zip(_spans(info.st_size), _sample_digests(path), strict=True)
                   if digest != expected.get(str(offset))]
        if changed:
            raise _Damaged(f"{name}: the block at byte {changed[0]} differs from the manifest")
        if info.st_mtime_ns != record["mtime_ns"]:
            moved.append(name)
    return moved


def _stamp_matches(entry: Path, manifest_raw: bytes) -> bool:
    try:
        stamp = json.loads((entry / STAMP).read_bytes())
    except (FileNotFoundError, ValueError):
        return False
    return isinstance(stamp, dict) and stamp.get("manifest_sha256") == hashlib.sha256(manifest_raw).hexdigest()


def _spans(size: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of the sampled blocks: the whole file when it is small, else :data:`N_SAMPLES` blocks
    from byte 0 to the last byte, evenly spaced (fixed by the size alone, so a check reads the same blocks)."""
    if size <= N_SAMPLES * SAMPLE_BYTES:
        return [(0, size)]
    step = (size - SAMPLE_BYTES) / (N_SAMPLES - 1)
    return [(round(i * step), SAMPLE_BYTES) for i in range(N_SAMPLES)]


def _sample_digests(path: Path) -> list[str]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return [hashlib.sha256(os.pread(fd, length, offset)).hexdigest()
                for offset, length in _spans(os.fstat(fd).st_size)]
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------ building an entry


def _build_and_swap(root: Path, key: str, build: Callable[[Path], None], *, info: Mapping[str, Any], what: str,
                    damage: str | None) -> None:
    """Build into a staging directory and move it to ``root/key`` (the old entry, if any, moved aside first).
    Runs under the key's lock."""
    entry = root / key
    with _staging(root, key) as staging:
        try:
            build(staging)
        except LmAuditError as exc:
            if damage is None:
                raise
            raise CacheEntryError(f"{what}: the cache entry {entry} is damaged ({damage}) and rebuilding it failed: "
                                  f"{exc}. Delete {entry} and run again.") from exc
        _seal(staging, info)
        if damage is not None:
            warnings.warn(f"lmaudit: cache entry {entry} ({what}) was damaged ({damage}); rebuilt it",
                          CacheEntryWarning, stacklevel=4)
        _discard(entry, root, key, what)  # a damaged entry, or a sound one the caller asked to rebuild
        try:
            os.rename(staging, entry)
        except OSError as exc:
            raise CacheEntryError(f"{what}: cannot move the new cache entry into {entry} ({exc}); "
                                  f"delete {entry} and run again") from exc
    _fsync_dir(root)


@contextmanager
def _staging(root: Path, key: str) -> Iterator[Path]:
    """A fresh staging directory, created with mode 0777 so the umask applies; removed unless renamed away."""
    staging = root / f".{key}.staging-{os.getpid()}-{secrets.token_hex(4)}"
    os.mkdir(staging, 0o777)
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _seal(staging: Path, info: Mapping[str, Any]) -> None:
    """Give every file ordinary permissions, fsync it, and write the manifest last."""
    dir_mode = stat.S_IMODE(staging.stat().st_mode)  # 0777 & ~umask, from os.mkdir
    file_mode = dir_mode & 0o666
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(staging.rglob("*")):
        if path.is_dir():
            os.chmod(path, dir_mode)
            continue
        name = path.relative_to(staging).as_posix()
        if name in _OWN_FILES:
            continue
        os.chmod(path, file_mode)
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
        size = path.stat().st_size
        samples = {str(offset): digest for (offset, _), digest in zip(_spans(size), _sample_digests(path),
                                                                       strict=True)}
        files[name] = {"size": size, "mtime_ns": path.stat().st_mtime_ns, "sha256": sha256_file(path),
                       "samples": samples}
    if not files:
        raise LmAuditError(f"the build of cache entry {staging.name} wrote no files")
    manifest = {"format": FORMAT, "created": time.time(), "info": dict(info), "files": files}
    write_text_atomic(staging / MANIFEST, _manifest_text(manifest))
    _fsync_dir(staging)


def _manifest_text(manifest: Mapping[str, Any]) -> str:
    return json.dumps(manifest, indent=1, sort_keys=True, default=str)


def _discard(entry: Path, root: Path, key: str, what: str) -> None:
    """Move a damaged entry out of the way (one rename), then delete it; a reader that has its files open keeps
    them. Raises :class:`CacheEntryError` naming the entry when it cannot be moved."""
    if not entry.exists():
        return
    aside = root / f".{key}.discarded-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.rename(entry, aside)
    except OSError as exc:
        raise CacheEntryError(f"{what}: the cache entry {entry} is damaged and cannot be moved aside ({exc}); "
                              f"delete {entry} and run again") from exc
    shutil.rmtree(aside, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

