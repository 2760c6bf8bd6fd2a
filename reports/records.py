"""Plain records of one audit run (what the HTML report and the JSON results are built from).

No torch here: the plugin hands over JSON-able values only (:func:`to_jsonable` turns dataclasses, enums,
numpy and torch scalars or arrays into plain data by duck typing, without importing either library).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1
STATUSES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")


@dataclass
class AuditRecord:
    """One row of the report: an audit item, its measured values beside its thresholds, and its evidence."""

    nodeid: str
    name: str
    source: str  # the audit file or test module
    status: str  # one of STATUSES
    check: str | None = None
    claim: str = ""  # the paper claim the entry checks
    corpora: list[str] = field(default_factory=list)  # every corpus the check read, labelled
    area: str = "other"
    description: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    comparisons: list[dict[str, Any]] = field(default_factory=list)  # metric, expected, measured, passed, kind
    metrics: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)  # the check's result dataclass, as plain data
    result_type: str = ""
    message: str = ""  # failure or error summary, or skip reason
    traceback: str = ""
    duration_s: float = 0.0
    baseline_deltas: list[dict[str, Any]] = field(default_factory=list)  # one per metric also in the baseline
    notes: list[str] = field(default_factory=list)  # e.g. "baseline conditions not checked"


@dataclass
class RunInfo:
    """Everything about the run that is not one audit: model card, environment, corpus, timing."""

    model: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    profile: str = "full"
    seed: int = 0
    corpus: str = ""
    perplexity_definition: str = ""
    started: str = ""
    duration_s: float = 0.0
    pytest_exit_status: int | None = None
    invocation: list[str] = field(default_factory=list)  # pytest's command-line arguments
    compare_model: str | None = None
    baseline: dict[str, Any] | None = None  # path, started, verdict, model, content_hash, same_weights
    notes: list[str] = field(default_factory=list)


def to_jsonable(value: Any) -> Any:
    """Dataclasses, enums, tuples and numpy/torch scalars to JSON types; non-finite floats to strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return to_jsonable(value.tolist())
    if hasattr(value, "item"):
        return to_jsonable(value.item())
    return str(value)


def verdict(records: list[AuditRecord]) -> str:
    """PASS when nothing failed or errored (skips do not fail a release), else FAIL."""
    bad = [r for r in records if r.status in ("failed", "error")]
    return "FAIL" if bad else ("PASS" if records else "EMPTY")


def counts(records: list[AuditRecord]) -> dict[str, int]:
    return {status: sum(r.status == status for r in records) for status in STATUSES}


def regressions(records: list[AuditRecord]) -> int:
    """How many metrics regressed beyond their declared tolerance against the baseline."""
    return sum(bool(d.get("regression")) for r in records for d in r.baseline_deltas)


def verdict_line(records: list[AuditRecord]) -> str:
    """``PASS — 3 passed, 0 failed, 0 errors, 1 skipped`` (the report's top line and the terminal's last)."""
    c = counts(records)
    line = f"{verdict(records)} — {c['passed']} passed, {c['failed']} failed, {c['error']} errors, {c['skipped']} skipped"
    if c["xfailed"] or c["xpassed"]:
        line += f", {c['xfailed']} expected deviations" + (f", {c['xpassed']} unexpectedly agreeing" if c["xpassed"] else "")
    n = regressions(records)
    return line + (f", {n} baseline regression{'s' * (n != 1)}" if n else "")
