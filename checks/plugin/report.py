"""The end of a session: write the HTML report and the JSON results, and the one-line verdict.

Both files are written atomically (a temporary file, then a rename) whatever the audits' outcome. A session
that ran no audit item writes nothing unless ``--audit-report`` or ``--audit-json`` was given. The exit code
stays pytest's, except that a report that could not be written turns a passing run into an internal error:
CI must never pass without the report reviewers read.
"""

from __future__ import annotations

import pytest

from lmaudit.checks.plugin.session import AuditSession
from lmaudit.reports.records import verdict_line


def _should_write(audit_session: AuditSession) -> bool:
    return bool(audit_session.records) or audit_session.options.wants_report


def write_reports(session: pytest.Session, audit_session: AuditSession, exitstatus: int) -> None:
    if not _should_write(audit_session):
        return
    from lmaudit.reports.html import write_html_report
    from lmaudit.reports.json_results import write_results_json

    options = audit_session.options
    try:
        run = audit_session.run_info(exitstatus)
        if options.report is not None:
            audit_session.written.append(write_html_report(options.report, audit_session.records, run))
        if options.json is not None:
            audit_session.written.append(write_results_json(options.json, audit_session.records, run))
    except Exception as exc:  # noqa: BLE001  (reported on the terminal and in the exit code)
        audit_session.write_errors.append(f"{type(exc).__name__}: {exc}")
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.INTERNAL_ERROR


def terminal_line(audit_session: AuditSession) -> str | None:
    """``lmaudit: FAIL — 1 passed, 1 failed, 0 errors, 0 skipped; report: /abs/audit-report.html``."""
    if not _should_write(audit_session):
        return None
    if audit_session.write_errors:
        return f"lmaudit: {verdict_line(audit_session.records)}; report NOT written: {audit_session.write_errors[0]}"
    options, written = audit_session.options, [p.resolve() for p in audit_session.written]
    parts = [f"{label}: {path.resolve()}" for label, path in (("report", options.report), ("JSON", options.json))
             if path is not None and path.resolve() in written]
    return f"lmaudit: {verdict_line(audit_session.records)}; {'; '.join(parts) or 'no report written'}"
