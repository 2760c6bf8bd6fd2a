"""The JSON results file: every record, the run info and the verdict, under a versioned schema.

The schema is documented in README.md ("JSON results"). ``schema_version`` changes only when a field is
removed or changes meaning; new fields may appear within a version. :func:`load_results` reads a results file
back (for ``--audit-baseline``), refuses other schemas and newer versions, and checks the shape of every part a
baseline comparison reads, so that a malformed file is rejected before any audit runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmaudit.reports.atomic import write_text_atomic
from lmaudit.reports.records import (
    SCHEMA_VERSION,
    VERDICTS,
    AuditRecord,
    RunInfo,
    claims_checked,
    counts,
    to_jsonable,
    verdict,
)

SCHEMA_NAME = "lmaudit-results"


class ResultsFileError(ValueError):
    """A results file that cannot serve as a baseline: not JSON, another schema, a newer version, a wrong shape."""


def results_document(records: list[AuditRecord], run: RunInfo) -> dict[str, Any]:
    outcome = verdict(records, run)
    return {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "verdict": outcome,
        "verdict_meaning": VERDICTS[outcome],
        "complete": run.complete,
        "claims_checked": claims_checked(records),
        "counts": counts(records),
        "not_run": to_jsonable(run.not_run),
        "run": to_jsonable(run),
        "audits": [to_jsonable(r) for r in records],
    }


def results_text(records: list[AuditRecord], run: RunInfo) -> str:
    return json.dumps(results_document(records, run), indent=2, sort_keys=False, allow_nan=False) + "\n"


def write_results_json(path: Path, records: list[AuditRecord], run: RunInfo) -> Path:
    return write_text_atomic(path, results_text(records, run))


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise ResultsFileError(message)


def load_results(path: Path) -> dict[str, Any]:
    """A results document written by :func:`write_results_json` (this schema version or an older one)."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultsFileError(f"not a readable JSON file: {exc}") from None
    _expect(isinstance(document, dict) and document.get("schema") == SCHEMA_NAME,
            f"not an lmaudit results file (expected \"schema\": \"{SCHEMA_NAME}\")")
    version = document.get("schema_version")
    _expect(isinstance(version, int) and not isinstance(version, bool) and version <= SCHEMA_VERSION,
            f"schema_version {version!r} is newer than this lmaudit reads ({SCHEMA_VERSION})")
    run = document.get("run", {})
    _expect(isinstance(run, dict), f"\"run\" must be a mapping, got {type(run).__name__}")
    _expect(isinstance(run.get("model", {}), dict), "\"run.model\" must be a mapping")
    _expect(isinstance(run.get("started", ""), str), "\"run.started\" must be a string")
    _expect(isinstance(document.get("verdict", ""), str), "\"verdict\" must be a string")
    audits = document.get("audits")
    _expect(isinstance(audits, list) and all(isinstance(a, dict) and isinstance(a.get("nodeid"), str) for a in audits),
            "\"audits\" must be a list of records with a \"nodeid\"")
    for index, audit in enumerate(audits):
        _expect(isinstance(audit.get("metrics", {}), dict), f"audits[{index}].metrics must be a mapping")
        _expect(isinstance(audit.get("key", ""), str), f"audits[{index}].key must be a string")
    if document.get("complete") is False:
        raise ResultsFileError("this is a partial results file (\"complete\": false) from a run that did not finish")
    return document
