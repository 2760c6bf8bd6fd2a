"""The JSON results file: every record, the run info and the verdict, under a versioned schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reports.atomic import write_text_atomic
from reports.records import SCHEMA_VERSION, AuditRecord, RunInfo, counts, to_jsonable, verdict


def results_document(records: list[AuditRecord], run: RunInfo) -> dict[str, Any]:
    return {
        "schema": "lmaudit-results",
        "schema_version": SCHEMA_VERSION,
        "verdict": verdict(records),
        "counts": counts(records),
        "run": to_jsonable(run),
        "audits": [to_jsonable(r) for r in records],
    }


def write_results_json(path: Path, records: list[AuditRecord], run: RunInfo) -> Path:
    text = json.dumps(results_document(records, run), indent=2, sort_keys=False, allow_nan=False)
    return write_text_atomic(path, text + "\n")
