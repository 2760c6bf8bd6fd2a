"""Plain records of one audit run (what the HTML report and the JSON results are built from), and the verdict.

No torch here: the plugin hands over JSON-able values only (:func:`to_jsonable` turns dataclasses, enums,
numpy and torch scalars or arrays into plain data by duck typing, without importing either library).

The verdict is derived from every selected audit *and* from how the run ended (:func:`verdict`), never from the
rows alone: a run that stopped half way, that checked nothing, or whose model did not load must not read PASS.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1
STATUSES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
CHECKED = ("passed", "failed", "xfailed", "xpassed")  # statuses where a claim was measured against its thresholds

# What each verdict means (the report and README print this table). Precedence, first match wins:
# INCOMPLETE, ERROR, INTERRUPTED, FAIL, EMPTY, PASS (FAIL outranks INTERRUPTED only when pytest itself stopped
# the run after a failure, as with -x).
VERDICTS: dict[str, str] = {
    "PASS": "every selected audit ran, at least one claim was checked, and none failed or errored "
            "(skips and expected deviations do not fail a release)",
    "FAIL": "at least one audit missed its thresholds or its baseline, crashed, or an expected deviation "
            "(strict xfail) did not occur",
    "EMPTY": "no claim was checked: nothing was selected, or every selected audit was skipped "
             "(profile, missing data, missing premise)",
    "ERROR": "the run could not audit the model: it did not load, an audit file did not collect, a report file "
             "could not be written, or pytest hit an internal error",
    "INTERRUPTED": "the run stopped before every selected audit finished (Ctrl-C, a signal, pytest.exit, a crashed "
                   "worker); the audits that did not run are listed",
    "INCOMPLETE": "a partial results file, written while the run was in progress; a run that was killed leaves it so",
}
FAILING_VERDICTS = ("FAIL", "EMPTY", "ERROR", "INTERRUPTED", "INCOMPLETE")  # every one exits non-zero


@dataclass
class AuditRecord:
    """One row of the report: an audit item, its measured values beside its thresholds, and its evidence."""

    nodeid: str
    name: str
    source: str  # the audit file or test module
    status: str  # one of STATUSES
    key: str = ""  # stable identity: the file relative to its audits directory, '::', the entry (baselines, pins)
    check: str | None = None
    claim: str = ""  # the paper claim the entry checks
    corpora: list[str] = field(default_factory=list)  # every corpus the check read, labelled
    area: str = "other"
    description: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    profile: str = ""  # the --audit-profile the params were resolved for
    comparisons: list[dict[str, Any]] = field(default_factory=list)  # metric, expected, measured, passed, kind
    metrics: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)  # the check's result dataclass, as plain data
    result_type: str = ""
    message: str = ""  # failure or error summary, or skip reason
    traceback: str = ""
    duration_s: float = 0.0
    baseline_deltas: list[dict[str, Any]] = field(default_factory=list)  # one per metric also in the baseline
    notes: list[str] = field(default_factory=list)  # e.g. "baseline conditions not checked"
    reused: dict[str, Any] | None = None  # result taken from the result cache or shared in the session
    pin: dict[str, Any] | None = None  # for an entry of a pin file: its header and whether the weights match
    worker: str | None = None  # the pytest-xdist worker that ran it (None in a serial run)


@dataclass
class RunInfo:
    """Everything about the run that is not one audit: model card, environment, corpus, timing, how it ended."""

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
    complete: bool = True  # False in the partial results file written while audits run
    interrupted: bool = False  # the session ended on Ctrl-C, a signal, pytest.exit or a crashed worker
    selected: int = 0  # audits selected to run (collected, after -k/-m deselection)
    not_run: list[dict[str, Any]] = field(default_factory=list)  # selected audits without a result: key, reason
    collection_errors: list[str] = field(default_factory=list)
    write_errors: list[str] = field(default_factory=list)  # report files that could not be written
    precision: dict[str, Any] = field(default_factory=dict)  # dtype, device, device_map the values were measured at
    pins: list[dict[str, Any]] = field(default_factory=list)  # pin files in the run: header, same_weights
    cache: dict[str, Any] = field(default_factory=dict)  # result cache: directory, enabled, reused, stored
    workers: list[str] = field(default_factory=list)  # pytest-xdist workers that ran audits


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


def record_from_dict(data: dict[str, Any]) -> AuditRecord:
    """An :class:`AuditRecord` back from its JSON form (a worker's record, a results file); unknown keys dropped."""
    names = {f.name for f in dataclasses.fields(AuditRecord)}
    return AuditRecord(**{k: v for k, v in data.items() if k in names})


def claims_checked(records: list[AuditRecord]) -> int:
    """Audits whose measured values were compared with their thresholds (passed, failed or a known deviation)."""
    return sum(r.status in CHECKED for r in records)


def verdict(records: list[AuditRecord], run: RunInfo | None = None) -> str:
    """The run's verdict (:data:`VERDICTS`), from the rows and from how the run ended."""
    if run is not None and not run.complete:
        return "INCOMPLETE"
    if run is not None and (run.collection_errors or run.write_errors or run.model.get("load_error")
                            or run.pytest_exit_status in (3, 4)):
        return "ERROR"
    if run is not None and run.interrupted:
        return "INTERRUPTED"
    if any(r.status in ("failed", "error") for r in records):
        return "FAIL"
    if run is not None and run.not_run:
        return "INTERRUPTED"
    return "PASS" if claims_checked(records) else "EMPTY"


def counts(records: list[AuditRecord]) -> dict[str, int]:
    return {status: sum(r.status == status for r in records) for status in STATUSES}


def regressions(records: list[AuditRecord]) -> int:
    """How many metrics regressed beyond their declared tolerance against the baseline."""
    return sum(bool(d.get("regression")) for r in records for d in r.baseline_deltas)


def verdict_line(records: list[AuditRecord], run: RunInfo | None = None) -> str:
    """``PASS — 3 claims checked: 3 passed, 0 failed, 0 errors, 1 skipped`` (the report's and terminal's line)."""
    c = counts(records)
    line = (f"{verdict(records, run)} — {claims_checked(records)} claim{'s' * (claims_checked(records) != 1)} "
            f"checked: {c['passed']} passed, {c['failed']} failed, {c['error']} errors, {c['skipped']} skipped")
    if c["xfailed"] or c["xpassed"]:
        line += f", {c['xfailed']} expected deviations" + (f", {c['xpassed']} unexpectedly agreeing" if c["xpassed"] else "")
    n = regressions(records)
    line += f", {n} baseline regression{'s' * (n != 1)}" if n else ""
    if run is not None and run.not_run:
        line += f", {len(run.not_run)} did not run"
    return line
