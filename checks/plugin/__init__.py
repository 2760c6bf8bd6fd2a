"""The lmaudit pytest plugin (entry point ``pytest11: lmaudit``).

It adds the audit options, collects ``audits/*.yaml`` files as items, gives Python audits the same
session-scoped model through fixtures, and renders the HTML report (and JSON results) at the end of every
session that ran an audit. It is the only part of ``checks`` that knows about pytest.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import pytest

from checks.context import AuditContext
from checks.errors import AuditFileError, LmAuditError
from checks.loading import DEFAULT_MODEL, LoadedModel
from checks.plugin.audit_file import PROFILES
from checks.plugin.items import (
    AUDIT_SESSION_KEY,
    MEASURED_KEY,
    AuditFailure,
    AuditItem,
    AuditYamlFile,
    Measured,
)
from checks.plugin.session import AuditOptions, AuditSession
from checks.thresholds import Threshold, compare
from reports.records import AuditRecord, to_jsonable

_PHASES_KEY = pytest.StashKey[dict[str, pytest.TestReport]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lmaudit", "lmaudit: audits of language-model internals")
    group.addoption("--model", dest="audit_model", default=None,
                    help=f"model under audit: alias, HF directory, .gguf file or hub id (default {DEFAULT_MODEL})")
    group.addoption("--compare-model", dest="compare_model", default=None,
                    help="a second model (e.g. a fine-tune) for invariance and comparison audits")
    group.addoption("--audit-report", dest="audit_report", default=None,
                    help="where to write the HTML report (default audit-report.html)")
    group.addoption("--audit-json", dest="audit_json", default=None, help="also write the results as JSON here")
    group.addoption("--audit-profile", dest="audit_profile", default="full", choices=PROFILES,
                    help="quick: the cheap subset for pre-merge CI; full: everything (default)")
    group.addoption("--corpus", dest="audit_corpus", default="pydoc",
                    help="perplexity corpus: wikitext2, pydoc (default) or a text file path")
    group.addoption("--corpus-path", dest="corpus_path", default=None,
                    help="where the named corpus lives (e.g. the wikitext-2 directory)")
    group.addoption("--audit-dtype", dest="audit_dtype", default="float32", choices=("float32", "bfloat16"))
    group.addoption("--audit-seed", dest="audit_seed", default=0, type=int)
    group.addoption("--trust-remote-code", dest="trust_remote_code", action="store_true", default=False,
                    help="allow model repositories to run their own code (off by default)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: needs a real model or a long sweep")
    config.addinivalue_line("markers", "audit: an lmaudit audit item")
    config.stash[AUDIT_SESSION_KEY] = AuditSession(AuditOptions.from_config(config))
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if file_path.suffix in (".yaml", ".yml") and (
        file_path.parent.name == "audits" or file_path.name.startswith("audit_")
    ):
        return _CleanErrorYamlFile.from_parent(parent, path=file_path)
    return None


class _CleanErrorYamlFile(AuditYamlFile):
    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:  # type: ignore[override]
        if isinstance(excinfo.value, AuditFileError):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def audit_context(pytestconfig: pytest.Config) -> AuditContext:
    """The session's audit context: the model under audit (loaded once) and the run's options."""
    return pytestconfig.stash[AUDIT_SESSION_KEY].context()


@pytest.fixture(scope="session")
def audit_model(audit_context: AuditContext) -> LoadedModel:
    """The model under audit, loaded once per session."""
    return audit_context.model


@pytest.fixture
def audit_expect(request: pytest.FixtureRequest) -> Callable[..., None]:
    """For Python audits: ``audit_expect("perplexity", value, max=60)`` records and asserts a threshold."""
    measured = request.node.stash.setdefault(MEASURED_KEY, Measured())

    def expect(metric: str, value: Any, **threshold: Any) -> None:
        comparison = compare(metric, to_jsonable(value), Threshold(**threshold))
        measured.metrics[metric] = to_jsonable(value)
        measured.comparisons.append(comparison)
        assert comparison.passed, comparison.failure_line()

    return expect


# ---------------------------------------------------------------------------------------------- records


def _is_audit(item: pytest.Item) -> bool:
    if isinstance(item, AuditItem):
        return True
    names = getattr(item, "fixturenames", ())
    return "audit_context" in names or "audit_model" in names or item.path.parent.name == "audits"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    if _is_audit(item):
        item.stash.setdefault(_PHASES_KEY, {})[report.when] = report
        if report.when == "teardown":
            item.config.stash[AUDIT_SESSION_KEY].records.append(_record(item))
        elif report.when == "call" and call.excinfo is not None:
            item.stash.setdefault(MEASURED_KEY, Measured())
            item.stash[_EXC_KEY] = call.excinfo
    return report


_EXC_KEY = pytest.StashKey[pytest.ExceptionInfo[BaseException]]()


def _record(item: pytest.Item) -> AuditRecord:
    phases = item.stash[_PHASES_KEY]
    measured = item.stash.get(MEASURED_KEY, Measured())
    audit = getattr(item, "audit", None)
    record = AuditRecord(
        nodeid=item.nodeid,
        name=audit.entry.name if audit else item.name,
        source=str(Path(item.path).relative_to(item.config.rootpath)) if item.path.is_relative_to(item.config.rootpath) else str(item.path),
        status="passed",
        check=audit.spec.name if audit else None,
        area=audit.spec.area if audit else "other",
        description=(audit.entry.description or audit.spec.summary) if audit else (item.function.__doc__ or "").strip() if hasattr(item, "function") else "",
        params=to_jsonable(audit.params.model_dump()) if audit else {},
        comparisons=[to_jsonable(c) for c in measured.comparisons],
        metrics=measured.metrics,
        result=to_jsonable(measured.result) if measured.result is not None else {},
        result_type=type(measured.result).__name__ if measured.result is not None else "",
        duration_s=measured.duration_s or sum(r.duration for r in phases.values()),
    )
    setup, call, teardown = phases.get("setup"), phases.get("call"), phases.get("teardown")
    if setup is not None and setup.skipped or call is not None and call.skipped:
        record.status = "skipped"
        longrepr = (setup if setup.skipped else call).longrepr
        record.message = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    elif setup is not None and setup.failed:
        record.status, record.message, record.traceback = "error", "setup failed", str(setup.longrepr)
    elif call is not None and call.failed:
        excinfo = item.stash.get(_EXC_KEY, None)
        exc = excinfo.value if excinfo is not None else None
        is_failure = isinstance(exc, AssertionError)
        record.status = "failed" if is_failure else "error"
        record.message = str(exc) if exc is not None else "failed"
        if not isinstance(exc, (AuditFailure, LmAuditError)) and excinfo is not None:
            record.traceback = "".join(traceback.format_exception(exc)) if exc else str(call.longrepr)
            if not is_failure:
                record.message = f"{type(exc).__name__}: {exc}"
    elif teardown is not None and teardown.failed:
        record.status, record.message, record.traceback = "error", "teardown failed", str(teardown.longrepr)
    return record


# ---------------------------------------------------------------------------------------------- report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    audit_session = session.config.stash.get(AUDIT_SESSION_KEY, None)
    if audit_session is None or not (audit_session.records or audit_session.options.report_explicit):
        return
    from reports.html import write_html_report
    from reports.json_results import write_results_json

    run = audit_session.run_info(int(exitstatus))
    options = audit_session.options
    if options.report is not None:
        write_html_report(options.report, audit_session.records, run)
    if options.json is not None:
        write_results_json(options.json, audit_session.records, run)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    audit_session = config.stash.get(AUDIT_SESSION_KEY, None)
    if audit_session is None or not (audit_session.records or audit_session.options.report_explicit):
        return
    from reports.records import counts, verdict

    c = counts(audit_session.records)
    where = audit_session.options.report.resolve() if audit_session.options.report else "(no report)"
    terminalreporter.write_line(
        f"lmaudit: {verdict(audit_session.records)} — {c['passed']} passed, {c['failed']} failed, "
        f"{c['error']} errors, {c['skipped']} skipped; report: {where}"
    )
