"""The session's hooks, from collection to the verdict, as one object registered per pytest config.

Several hooks carry no ``config`` (``pytest_collectreport``, ``pytest_runtest_logstart``,
``pytest_runtest_logreport``), so they are methods of an object bound to its :class:`AuditSession`: two pytest
sessions in one process (pytester) never share state.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from lmaudit.checks.harness.baseline import audit_key, strip_group_suffix
from lmaudit.checks.plugin import pins, workers
from lmaudit.checks.plugin.items import AUDIT_SESSION_KEY, MEASURED_KEY, AuditItem, Measured, source_of
from lmaudit.checks.plugin.records import EXCINFO_KEY, PHASES_KEY, build_record, is_audit, item_key
from lmaudit.checks.plugin.report import terminal_lines, write_partial, write_reports
from lmaudit.checks.plugin.session import AuditSession, SelectedAudit


def _short(longrepr: Any) -> str:
    """The last ``E`` line of a failure (else its first line), as a one-line reason."""
    lines = [line for line in str(longrepr).splitlines() if line.strip()]
    errors = [line[1:].strip() for line in lines if line.startswith("E ")]
    return (errors[-1] if errors else lines[0] if lines else "collection failed")[:500]


class SessionHooks:
    def __init__(self, session: AuditSession) -> None:
        self.session = session

    # ------------------------------------------------------------------ collection

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        """An audit file (YAML, or a Python module in an ``audits`` directory) that does not collect makes the
        verdict ERROR; other modules' collection errors are pytest's business."""
        path = Path(report.nodeid.split("::")[0])
        if report.failed and (path.suffix in (".yaml", ".yml") or path.parent.name == "audits"):
            self.session.collection_errors.append(f"{report.nodeid}: {_short(report.longrepr)}")

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        workers.add_group_marks(items, is_audit)  # before pytest-xdist's worker reads the marks
        pins.apply_deviations(items, self.session)

    def pytest_ignore_collect(self, collection_path: Path, config: pytest.Config) -> bool | None:
        return pins.ignore_pins(collection_path, config)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.session.selected = [
            SelectedAudit(strip_group_suffix(item.nodeid), item_key(item),
                          item.audit.entry.name if hasattr(item, "audit") else item.name, source_of(item))
            for item in session.items if is_audit(item)]

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        workers.tell_worker(node)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> Any:
        return workers.make_scheduler(config, log) if config.getvalue("dist") == "loadgroup" else None

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        """On the controller: the selected audits from the ids a worker collected, until a worker's first report
        brings its exact list (a Python audit outside ``audits/`` is recognised by its fixtures only there)."""
        if self.session.selected:
            return
        for nodeid in map(strip_group_suffix, ids):
            file, _, rest = nodeid.partition("::")
            path = Path(file)
            if path.suffix in (".yaml", ".yml") or path.parent.name == "audits":
                self.session.selected.append(SelectedAudit(nodeid, audit_key(path, rest), rest, file))

    # ------------------------------------------------------------------ running

    def pytest_runtest_logstart(self, nodeid: str) -> None:
        """Remember what is running, so an interrupted run names the audit it stopped in."""
        self.session.running[strip_group_suffix(nodeid)] = ""

    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        if is_audit(item) and not isinstance(item, AuditItem) and self.session.has_context:
            self.session.context().begin_check()  # label the corpora this Python audit reads

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
        report = yield
        if (is_audit(item) and report.when == "teardown" and not isinstance(item, AuditItem)
                and self.session.has_context):
            item.stash.setdefault(MEASURED_KEY, Measured()).corpora = self.session.context().corpora_used()
        if is_audit(item):
            item.stash.setdefault(PHASES_KEY, {})[report.when] = report
            if report.when == "call" and call.excinfo is not None:
                item.stash[EXCINFO_KEY] = call.excinfo
            if report.when == "teardown":
                session = self.session
                selected, facts = None, None
                if session.worker is not None:  # a pytest-xdist worker: the controller needs these too
                    facts = session.local_facts()
                    if not session.sent_selection:
                        selected, session.sent_selection = [vars(a) for a in session.selected], True
                workers.attach(report, build_record(item, session), facts, selected)
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Serial run or pytest-xdist controller: keep the record a teardown report carries; rewrite the partial
        JSON."""
        session = self.session
        record, facts, selected = workers.received(report)
        if selected is not None and session.worker is None:
            session.selected = [SelectedAudit(**a) for a in selected]
        if facts is not None and facts.get("worker"):
            session.remote_facts[facts["worker"]] = facts
        if record is None and report.when == "???":  # pytest-xdist: a worker died while running this audit
            nodeid = strip_group_suffix(report.nodeid)
            match = next((a for a in session.selected if a.nodeid == nodeid), None)
            if match is not None:
                record = workers.crash_record(report, match.name, match.key, match.source)
        if record is None:
            return
        session.add_record(record)
        if session.worker is None:
            write_partial(session)

    # ------------------------------------------------------------------ the end

    def pytest_keyboard_interrupt(self) -> None:
        self.session.interrupted = True

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.session.worker is not None or session.config.option.collectonly:
            return
        if int(exitstatus) == pytest.ExitCode.INTERRUPTED and not self.session.collection_errors:
            self.session.interrupted = True
        pins.write_pin(self.session, int(exitstatus))
        write_reports(session, self.session, int(exitstatus))

    def pytest_terminal_summary(self, terminalreporter: Any, config: pytest.Config) -> None:
        if self.session.worker is not None or config.option.collectonly:
            return
        for line in terminal_lines(self.session):
            terminalreporter.write_line(line)


def register(config: pytest.Config, session: AuditSession) -> None:
    config.stash[AUDIT_SESSION_KEY] = session
    workers.configure_worker(config)
    pins.add_pin_args(config, session.options.pins)
    config.pluginmanager.register(SessionHooks(session), "lmaudit-session")
