"""The JSON results file: every record, the run info and the verdict, under a versioned schema.

The schema is documented in README.md ("JSON results"). ``schema_version`` changes only when a field is
removed or changes meaning; new fields may appear within a version. :func:`load_results` reads a results file
back (for ``--audit-baseline``) and refuses other schemas and newer versions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmaudit.reports.atomic import write_text_atomic
from lmaudit.reports.records import SCHEMA_VERSION, AuditRecord, RunInfo, counts, to_jsonable, verdict

SCHEMA_NAME = "lmaudit-results"


class ResultsFileError(ValueError):
    """A results file that cannot serve as a baseline: not JSON, another schema, or a newer version."""


def results_document(records: list[AuditRecord], run: RunInfo) -> dict[str, Any]:
    return {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "verdict": verdict(records),
        "counts": counts(records),
        "run": to_jsonable(run),
        "audits": [to_jsonable(r) for r in records],
    }


def write_results_json(path: Path, records: list[AuditRecord], run: RunInfo) -> Path:
    text = json.dumps(results_document(records, run), indent=2, sort_keys=False, allow_nan=False)
    return write_text_atomic(path, text + "\n")


def load_results(path: Path) -> dict[str, Any]:
    """A results document written by :func:`write_results_json` (this schema version or an older one)."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ResultsFileError(f"not a readable JSON file: {exc}") from None
    if not isinstance(document, dict) or document.get("schema") != SCHEMA_NAME:
        raise ResultsFileError(f"not an lmaudit results file (expected \"schema\": \"{SCHEMA_NAME}\")")
    version = document.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ResultsFileError(f"schema_version {version!r} is newer than this lmaudit reads ({SCHEMA_VERSION})")
    audits = document.get("audits")
    if not isinstance(audits, list) or not all(isinstance(a, dict) and "nodeid" in a for a in audits):
        raise ResultsFileError("\"audits\" must be a list of records with a \"nodeid\"")
    return document
