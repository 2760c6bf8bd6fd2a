"""The end of a session: the verdict, its exit status, the HTML report, the JSON results, the terminal line.

- The JSON results are also rewritten (atomically, marked ``"complete": false``, verdict ``INCOMPLETE``) each time
  an audit finishes, so a run that is killed outright still leaves every finished audit's result.
- At the end, the HTML report and the JSON results are written independently: if one cannot be written, the other
  still is, says so, and the verdict is ``ERROR``. Each file is written atomically (a temporary file, then a
  rename).
- The exit status is pytest's, made non-zero whenever the verdict is not PASS: CI must never pass a run that
  checked nothing, stopped half way, lost its report or could not load the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import pytest

from lmaudit.checks.plugin.session import AuditSession
from lmaudit.reports.records import AuditRecord, RunInfo, verdict, verdict_line

EXIT_FOR_VERDICT = {
    "FAIL": pytest.ExitCode.TESTS_FAILED,
    "EMPTY": pytest.ExitCode.NO_TESTS_COLLECTED,
    "ERROR": pytest.ExitCode.INTERNAL_ERROR,
    "INTERRUPTED": pytest.ExitCode.INTERRUPTED,
}


def should_report(audit_session: AuditSession) -> bool:
    """A session that selected an audit, or was asked for a report, gets one (and a verdict)."""
    return bool(audit_session.records or audit_session.selected or audit_session.collection_errors
                or audit_session.options.wants_report)


def write_partial(audit_session: AuditSession) -> None:
    """Rewrite the JSON results with every audit finished so far (verdict INCOMPLETE). Best effort: a failure
    here is not fatal, the final write reports its own."""
    path = audit_session.options.json
    if path is None:
        return
    from lmaudit.reports.json_results import write_results_json

    with contextlib.suppress(Exception):  # the final write reports its own error
        write_results_json(path, audit_session.ordered_records(), audit_session.run_info(None, complete=False))


def _targets(audit_session: AuditSession) -> list[tuple[Path, Callable[[Path, list[AuditRecord], RunInfo], Path]]]:
    from lmaudit.reports.html import write_html_report
    from lmaudit.reports.json_results import write_results_json

    options = audit_session.options
    targets: list[tuple[Path, Callable[[Path, list[AuditRecord], RunInfo], Path]]] = []
    if options.json is not None:
        targets.append((options.json, write_results_json))
    if options.report is not None:
        targets.append((options.report, write_html_report))
    return targets


def write_reports(session: pytest.Session, audit_session: AuditSession, exitstatus: int) -> str | None:
    """Write every report file, each on its own; set the exit status from the verdict. Returns the verdict."""
    if not should_report(audit_session):
        return None
    records = audit_session.ordered_records()
    targets = _targets(audit_session)
    failed: set[Path] = set()
    for path, write in targets:
        try:
            write(path, records, audit_session.run_info(exitstatus))
        except Exception as exc:  # noqa: BLE001  (reported on the terminal, in the other file and the exit code)
            failed.add(path)
            audit_session.write_errors.append(f"{path}: {type(exc).__name__}: {exc}")
    if failed:  # the files that were written must say which one was not (and carry the ERROR verdict)
        for path, write in targets:
            if path not in failed:
                try:
                    write(path, records, audit_session.run_info(exitstatus))
                except Exception as exc:  # noqa: BLE001
                    failed.add(path)
                    audit_session.write_errors.append(f"{path}: {type(exc).__name__}: {exc}")
    audit_session.written = [path for path, _ in targets if path not in failed]
    audit_session.final_run = audit_session.run_info(exitstatus)
    outcome = verdict(records, audit_session.final_run)
    if outcome in EXIT_FOR_VERDICT and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = EXIT_FOR_VERDICT[outcome]
    return outcome


def terminal_lines(audit_session: AuditSession) -> list[str]:
    """``lmaudit: FAIL — 2 claims checked: 1 passed, 1 failed, ...; report: /abs/audit-report.html``, then the
    audits that did not run and the files that could not be written."""
    if not should_report(audit_session):
        return []
    records = audit_session.ordered_records()
    run = audit_session.final_run or audit_session.run_info(None)
    options = audit_session.options
    written = {p.resolve() for p in audit_session.written}
    parts = [f"{label}: {path.resolve()}" for label, path in (("report", options.report), ("JSON", options.json))
             if path is not None and path.resolve() in written]
    lines = [f"lmaudit: {verdict_line(records, run)}; {'; '.join(parts) or 'no report written'}"]
    lines += [f"lmaudit: did not run ({a['reason']}): {a['key']}" for a in run.not_run]
    lines += [f"lmaudit: NOT written: {error}" for error in audit_session.write_errors]
    reused = run.cache.get("reused", 0) + run.cache.get("shared", 0)
    if reused:
        lines.append(f"lmaudit: {reused} result{'s' * (reused != 1)} reused ({run.cache.get('reused', 0)} from the "
                     f"result cache, {run.cache.get('shared', 0)} shared within the session); --audit-no-cache "
                     "recomputes")
    lines += [f"lmaudit: {note}" for note in audit_session.terminal_notes]
    return lines
