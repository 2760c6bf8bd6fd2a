"""Reusing a check's result: across runs (on disk) and between entries of one session (in memory).

A result is reused only when everything that determines it is the same. The **key** is the sha256 of this
material (plain JSON, sorted keys):

- the model: :attr:`LoadedModel.content_hash` (the loaded tensors), and the ``--compare-model``'s when one is given;
- the check's name and its resolved parameters (after the profile's overrides), the profile, the seed;
- the session corpus: its name and the sha256 of its text (or why it is unavailable), and the optional-data root
  that named corpora and benchmarks are read from (its path: the data files themselves are not hashed);
- the precision: dtype, device or device map;
- the versions of lmaudit, torch, transformers, lm-eval and peft;
- the sha256 of lmaudit's ``checks`` sources (every ``.py`` file but the plugin's and the command line's, which
  do not shape a measured value), and of the source file of the check function when it lives elsewhere (a team's
  own check in its conftest).

Thresholds are not in the key, so a threshold-only change to an audit file re-runs in seconds.

**What is stored, and why not pickle.** A cache file may come from anywhere that can write to
``~/.cache/lmaudit/results`` (or ``$LMAUDIT_CACHE/results``), and unpickling runs code. So an entry is the plain JSON
of what the report and the thresholds need: the result as JSON data (what the report renders anyway), its class
name (which picks the report's section partial and charts), the metrics (what thresholds compare), the corpora it
read, and its original duration; or the reason a premise was missing. Nothing is rebuilt into the result class:
thresholds compare the JSON metrics exactly as they compare a fresh run's (which are made JSON-able first too), so
a reused row and a fresh one are judged identically. A file that is not valid JSON, has another schema, holds other
key material (a collision or a hand-edited file) or has wrongly typed fields is ignored and recomputed. Files are
written atomically (a temporary file, then a rename); errors and missing data are never stored.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lmaudit.reports.atomic import write_text_atomic

SCHEMA = "lmaudit-result-cache"
SCHEMA_VERSION = 1
_CHECKS_ROOT = Path(__file__).resolve().parent.parent  # the lmaudit.checks package
_NOT_SHAPING = ("plugin", "cli")  # subpackages that never shape a measured value


def _hash_files(paths: list[Path], root: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


@functools.cache
def checks_sources_hash() -> str:
    """sha256 of lmaudit's ``checks`` sources that can shape a result (relative path and bytes, sorted)."""
    files = sorted(p for p in _CHECKS_ROOT.rglob("*.py")
                   if p.relative_to(_CHECKS_ROOT).parts[0] not in _NOT_SHAPING and "__pycache__" not in p.parts)
    return _hash_files(files, _CHECKS_ROOT)


def function_source_hash(fn: Any) -> str:
    """sha256 of the file defining ``fn`` when it is outside lmaudit's checks ("" inside: already hashed)."""
    try:
        path = Path(inspect.getsourcefile(fn) or "").resolve()
    except TypeError:
        return ""
    if not path.is_file() or _CHECKS_ROOT in path.parents:
        return ""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class CacheKey:
    material: dict[str, Any]
    digest: str

    @classmethod
    def of(cls, material: dict[str, Any]) -> CacheKey:
        text = json.dumps(material, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return cls(material, hashlib.sha256(text.encode()).hexdigest())


def cache_key(*, check: str, check_fn: Any, params: dict[str, Any], run: dict[str, Any]) -> CacheKey:
    """The key of one check run: ``params`` are the resolved parameters as JSON, ``run`` the session's part of
    the material (model and compare-model hashes, corpus, data root, precision, seed, profile, versions)."""
    return CacheKey.of({"check": check, "params": params, "check_source": function_source_hash(check_fn),
                        "checks_sources": checks_sources_hash(), **run})


@dataclass(frozen=True)
class StoredResult:
    """What a reused result brings back: plain JSON only."""

    result_type: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    corpora: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    created: str = ""
    premise_missing: str | None = None

    @classmethod
    def from_json(cls, data: Any) -> StoredResult | None:
        """The stored result, or ``None`` when any field has the wrong type."""
        if not isinstance(data, dict):
            return None
        checks = [
            isinstance(data.get("result_type"), str),
            isinstance(data.get("result"), dict),
            isinstance(data.get("metrics"), dict),
            isinstance(data.get("corpora"), list) and all(isinstance(c, str) for c in data["corpora"]),
            isinstance(data.get("duration_s"), (int, float)) and not isinstance(data.get("duration_s"), bool),
            isinstance(data.get("created"), str),
            data.get("premise_missing") is None or isinstance(data.get("premise_missing"), str),
        ]
        if not all(checks):
            return None
        return cls(data["result_type"], data["result"], data["metrics"], list(data["corpora"]),
                   float(data["duration_s"]), data["created"], data.get("premise_missing"))


@dataclass
class ResultCache:
    """Disk entries under ``directory`` (``None``: no disk, ``--audit-no-cache``) plus this session's results."""

    directory: Path | None
    reused: int = 0  # results read from disk
    shared: int = 0  # results computed earlier in this session by an entry with the same key
    stored: int = 0  # results written to disk
    ignored: list[str] = field(default_factory=list)  # unreadable or mismatching files (recomputed)
    _session: dict[str, tuple[StoredResult, str]] = field(default_factory=dict)

    def path(self, key: CacheKey) -> Path | None:
        return None if self.directory is None else self.directory / key.digest[:2] / f"{key.digest}.json"

    def lookup(self, key: CacheKey) -> tuple[StoredResult, dict[str, Any]] | None:
        """The stored result and where it came from (for the report), or ``None``."""
        if key.digest in self._session:
            stored, first = self._session[key.digest]
            self.shared += 1
            return stored, {"from": "session", "key": key.digest[:16], "first": first,
                            "created": stored.created, "original_duration_s": stored.duration_s}
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        stored = self._read(path, key)
        if stored is None:
            return None
        self.reused += 1
        return stored, {"from": "cache", "key": key.digest[:16], "file": str(path), "created": stored.created,
                        "original_duration_s": stored.duration_s}

    def _read(self, path: Path, key: CacheKey) -> StoredResult | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            self.ignored.append(f"{path}: {type(exc).__name__}")
            return None
        if not (isinstance(data, dict) and data.get("schema") == SCHEMA and data.get("schema_version") == SCHEMA_VERSION
                and data.get("key") == key.material):
            self.ignored.append(f"{path}: another schema or other key material")
            return None
        stored = StoredResult.from_json(data.get("entry"))
        if stored is None:
            self.ignored.append(f"{path}: malformed entry")
        return stored

    def store(self, key: CacheKey, stored: StoredResult, nodeid: str) -> None:
        """Remember ``stored`` for this session and, unless the disk cache is off, write it atomically."""
        stored = StoredResult(**{**asdict(stored), "created": stored.created or _now()})
        self._session[key.digest] = (stored, nodeid)
        path = self.path(key)
        if path is None:
            return
        document = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "key": key.material, "entry": asdict(stored)}
        try:
            write_text_atomic(path, json.dumps(document, allow_nan=False) + "\n")  # metric order kept
        except (OSError, ValueError) as exc:  # a read-only cache must not fail the audit
            self.ignored.append(f"{path}: not written: {type(exc).__name__}: {exc}")
            return
        self.stored += 1

    def summary(self) -> dict[str, Any]:
        return {"enabled": self.directory is not None, "directory": str(self.directory) if self.directory else None,
                "reused": self.reused, "shared": self.shared, "stored": self.stored, "ignored": list(self.ignored)}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
