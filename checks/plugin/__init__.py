"""The lmaudit pytest plugin (entry point ``pytest11: lmaudit``).

It adds the audit options, collects ``audits/*.yaml`` files as items, gives Python audits the same
session-scoped model through fixtures, and renders the HTML report (and JSON results) at the end of every
session that ran an audit, also when audits failed; the exit code stays pytest's. It is the only part of
``checks`` that knows about pytest. Modules: ``audit_file`` (the YAML schema), ``items`` (YAML items),
``session`` (options, models, baseline), ``records`` (one report row per item), ``report`` (writing).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import pytest

from lmaudit.checks.core.errors import AuditFileError
from lmaudit.checks.core.loading import DEFAULT_MODEL, LoadedModel
from lmaudit.checks.harness.audit_file import PROFILES
from lmaudit.checks.harness.context import AuditContext
from lmaudit.checks.harness.thresholds import BaselineTolerance, Threshold, compare
from lmaudit.checks.plugin.items import AUDIT_SESSION_KEY, MEASURED_KEY, AuditYamlFile, Measured
from lmaudit.checks.plugin.records import AREAS, EXCINFO_KEY, PHASES_KEY, build_record, is_audit
from lmaudit.checks.plugin.report import terminal_line, write_reports
from lmaudit.checks.plugin.session import AuditOptions, AuditSession
from lmaudit.reports.records import to_jsonable


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lmaudit", "lmaudit: audits of language-model internals")
    group.addoption("--model", dest="audit_model", default=None,
                    help=f"model under audit: alias, HF directory, .gguf file or hub id (default {DEFAULT_MODEL})")
    group.addoption("--compare-model", dest="compare_model", default=None,
                    help="a second model (e.g. a fine-tune) for invariance and comparison audits")
    group.addoption("--audit-report", dest="audit_report", default=None,
                    help="where to write the HTML report (default audit-report.html)")
    group.addoption("--audit-json", dest="audit_json", default=None, help="also write the results as JSON here")
    group.addoption("--audit-baseline", dest="audit_baseline", default=None,
                    help="an earlier --audit-json file: show deltas, and check audits' 'baseline:' conditions")
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
    # Only lmaudit's own markers: the plugin loads in every pytest session where lmaudit is installed, so it
    # registers nothing else global (no hypothesis profile, no generic marker) and imports no torch here.
    config.addinivalue_line("markers", "audit: an lmaudit audit item")
    config.addinivalue_line("markers", f"audit_area(name): report section of a Python audit ({', '.join(AREAS)})")
    session = AuditSession(AuditOptions.from_config(config), invocation=list(config.invocation_params.args))
    session.load_baseline()
    config.stash[AUDIT_SESSION_KEY] = session


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if file_path.suffix in (".yaml", ".yml") and (
        file_path.parent.name == "audits" or file_path.name.startswith("audit_")
    ):
        from lmaudit.checks.catalog import load_checks

        load_checks()  # imports the areas (and torch) only in a session that collects an audit file
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
    """For Python audits: ``audit_expect("perplexity", value, max=60)`` records a metric and asserts a threshold.

    Without threshold keywords the metric is only recorded. ``baseline={"direction": "lower_is_better",
    "rel": 0.05}`` adds the "no regression vs --audit-baseline" condition, as the YAML ``baseline:`` key does.
    """
    measured = request.node.stash.setdefault(MEASURED_KEY, Measured())
    session: AuditSession = request.config.stash[AUDIT_SESSION_KEY]

    def expect(metric: str, value: Any, *, baseline: dict[str, Any] | BaselineTolerance | None = None,
               **threshold: Any) -> None:
        measured.metrics[metric] = to_jsonable(value)
        if threshold:
            measured.comparisons.append(compare(metric, measured.metrics[metric], Threshold(**threshold)))
        if baseline is not None:
            tolerance = baseline if isinstance(baseline, BaselineTolerance) else BaselineTolerance(**baseline)
            session.baseline_condition(request.node.nodeid, metric, measured, tolerance)
        failed = [c for c in measured.comparisons if c.metric == metric and not c.passed]
        assert not failed, "\n".join(c.failure_line() for c in failed)

    return expect


@pytest.fixture
def audit_evidence(request: pytest.FixtureRequest) -> Callable[[Any], None]:
    """For Python audits: ``audit_evidence(result)`` attaches a result dataclass to the report row, where it is
    rendered like a YAML check's result (its section partial and charts, keyed by the class name)."""
    measured = request.node.stash.setdefault(MEASURED_KEY, Measured())

    def attach(result: Any) -> None:
        measured.result = result

    return attach


# ---------------------------------------------------------------------------------------------- records


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    if is_audit(item):
        item.stash.setdefault(PHASES_KEY, {})[report.when] = report
        if report.when == "call" and call.excinfo is not None:
            item.stash[EXCINFO_KEY] = call.excinfo
        if report.when == "teardown":
            session = item.config.stash[AUDIT_SESSION_KEY]
            session.records.append(build_record(item, session))
    return report


# ---------------------------------------------------------------------------------------------- report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    audit_session = session.config.stash.get(AUDIT_SESSION_KEY, None)
    if audit_session is not None:
        write_reports(session, audit_session, int(exitstatus))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    audit_session = config.stash.get(AUDIT_SESSION_KEY, None)
    line = terminal_line(audit_session) if audit_session is not None else None
    if line is not None:
        terminalreporter.write_line(line)
