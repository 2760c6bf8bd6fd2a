"""One :class:`lmaudit.reports.records.AuditRecord` per audit item, built from its setup/call/teardown reports.

Status: ``skipped`` when setup or call skipped; ``error`` when setup or teardown failed or the call raised
anything but an ``AssertionError``; ``failed`` when the call raised an ``AssertionError`` (a missed threshold,
a baseline regression, or a plain ``assert`` in a Python audit); else ``passed``. An item that crashed keeps
its row: the error message and the full traceback (folded in the report).
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from lmaudit.checks.core.errors import LmAuditError
from lmaudit.checks.harness.baseline import audit_key, strip_group_suffix
from lmaudit.checks.plugin.items import MEASURED_KEY, AuditFailure, AuditItem, Measured, source_of
from lmaudit.reports.records import AuditRecord, to_jsonable

if TYPE_CHECKING:
    from lmaudit.checks.plugin.session import AuditSession

PHASES_KEY = pytest.StashKey[dict[str, pytest.TestReport]]()
EXCINFO_KEY = pytest.StashKey[pytest.ExceptionInfo[BaseException]]()
AREAS: tuple[str, ...] = ("model", "superweights", "quantization", "arithmetic", "bias", "other")


def is_audit(item: pytest.Item) -> bool:
    """YAML audit items, and Python tests that use an audit fixture or live in an ``audits/`` directory."""
    if isinstance(item, AuditItem):
        return True
    names = getattr(item, "fixturenames", ())
    return any(n in names for n in ("audit_context", "audit_model", "audit_expect")) or item.path.parent.name == "audits"


def _python_area(item: pytest.Item) -> str:
    marker = item.get_closest_marker("audit_area")
    area = str(marker.args[0]) if marker is not None and marker.args else "other"
    return area if area in AREAS else "other"


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def item_key(item: pytest.Item) -> str:
    """The stable key of an audit item (:mod:`lmaudit.checks.harness.baseline`)."""
    if isinstance(item, AuditItem):
        return item.key
    return audit_key(Path(item.path), strip_group_suffix(item.nodeid).partition("::")[2])


def build_record(item: pytest.Item, session: AuditSession) -> AuditRecord:
    phases = item.stash.get(PHASES_KEY, {})
    measured = item.stash.get(MEASURED_KEY, Measured())
    audit = item.audit if isinstance(item, AuditItem) else None
    claim, profile = "", ""
    if audit is not None:
        name, check, area, claim = audit.entry.name, audit.spec.name, audit.spec.area, audit.entry.claim
        description = audit.entry.description or audit.spec.summary
        resolved = audit.resolve(session.options.profile)
        params: Any = to_jsonable(resolved.params.model_dump()) if resolved is not None else {}
        profile = session.options.profile if resolved is not None else ""
    else:
        function = getattr(item, "function", None)
        doc = (function.__doc__ or "").strip() if function is not None else ""
        name, check, area, description, params = item.name, None, _python_area(item), doc, {}
    result = measured.result
    record = AuditRecord(
        nodeid=strip_group_suffix(item.nodeid),
        key=item_key(item),
        name=name,
        source=source_of(item),
        status="passed",
        claim=claim,
        corpora=list(measured.corpora),
        check=check,
        area=area if area in AREAS else "other",
        description=description,
        params=params,
        profile=profile,
        comparisons=[to_jsonable(c) for c in measured.comparisons],
        metrics=dict(to_jsonable(measured.metrics)),
        result=to_jsonable(result) if result is not None else {},
        result_type=measured.result_type or (type(result).__name__ if result is not None else ""),
        duration_s=measured.duration_s or sum(r.duration for r in phases.values()),
        notes=list(measured.notes),
        reused=measured.reused,
        worker=session.worker,
    )
    if audit is not None and audit.pinned is not None:
        from lmaudit.checks.plugin.pins import pin_notes

        record.pin = session.pin_info(record.source)
        record.notes += pin_notes(record.pin, session.model.content_hash if session.model is not None else None)
    _set_status(record, item, phases)
    if session.baseline is not None:
        record.baseline_deltas = [to_jsonable(d) for d in
                                  session.baseline.deltas(record.key, record.metrics, measured.tolerances)]
    return record


def _set_status(record: AuditRecord, item: pytest.Item, phases: dict[str, pytest.TestReport]) -> None:
    setup, call, teardown = phases.get("setup"), phases.get("call"), phases.get("teardown")
    skipped = next((r for r in (setup, call) if r is not None and r.skipped), None)
    xfail = next((r for r in (setup, call) if r is not None and hasattr(r, "wasxfail")), None)
    if xfail is not None and xfail.skipped:  # the known deviation happened: expected, reported as such
        excinfo = item.stash.get(EXCINFO_KEY, None)
        measured = str(excinfo.value) if excinfo is not None else ""
        record.status, record.message = "xfailed", f"expected deviation: {xfail.wasxfail}" + (
            f"\n{measured}" if measured else "")
    elif xfail is not None and xfail.passed:  # non-strict xfail that passed
        record.status, record.message = "xpassed", f"the model now agrees with the paper: {xfail.wasxfail}"
    elif call is not None and call.failed and "XPASS(strict)" in str(call.longrepr):
        record.status = "failed"
        record.message = ("expected deviation did not occur: the model now agrees with the paper's claim "
                          f"({str(call.longrepr).removeprefix('[XPASS(strict)]').strip()}); "
                          "remove the xfail or regenerate the pin")
    elif skipped is not None:
        record.status, record.message = "skipped", _skip_reason(skipped)
    elif setup is not None and setup.failed:
        record.status, record.message = "error", "setup failed: " + _last_line(setup)
        record.traceback = str(setup.longrepr)
    elif call is not None and call.failed:
        excinfo = item.stash.get(EXCINFO_KEY, None)
        exc = excinfo.value if excinfo is not None else None
        if isinstance(exc, AssertionError):
            record.status, record.message = "failed", str(exc) or "assertion failed"
            if not isinstance(exc, AuditFailure):
                record.traceback = str(call.longrepr)
        else:
            record.status = "error"
            record.message = f"{type(exc).__name__}: {exc}" if exc is not None else _last_line(call)
            if isinstance(exc, LmAuditError):
                record.message = str(exc)
            record.traceback = "".join(traceback.format_exception(exc)) if exc is not None else str(call.longrepr)
    elif teardown is not None and teardown.failed:
        record.status, record.message = "error", "teardown failed: " + _last_line(teardown)
        record.traceback = str(teardown.longrepr)


def _last_line(report: pytest.TestReport) -> str:
    lines = [line for line in str(report.longrepr).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E ")]
    return (errors[-1][1:].strip() if errors else lines[-1].strip()) if lines else "no details"
