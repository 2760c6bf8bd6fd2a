"""The lmaudit pytest plugin (entry point ``pytest11: lmaudit``).

It adds the audit options, collects audit YAML files as items, gives Python audits the same session-scoped model
through fixtures, and ends every session that selected an audit with a verdict, the HTML report and the JSON
results, also when audits failed or the run was interrupted. It is the only part of ``checks`` that knows about
pytest, and it imports no torch until a session collects an audit. Modules: ``options`` (options, validated
before anything runs), ``items`` (YAML items), ``session`` (models, baseline, selected audits, records),
``lifecycle`` (the session's hooks from collection to the verdict), ``records`` (one report row per item),
``report`` (verdict, exit status, writing), ``workers`` (pytest-xdist).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import pytest

from lmaudit.checks.core.errors import AuditFileError
from lmaudit.checks.core.loading import LoadedModel, cache_root
from lmaudit.checks.harness.context import AuditContext
from lmaudit.checks.harness.result_cache import ResultCache
from lmaudit.checks.harness.thresholds import BaselineTolerance, Threshold, compare
from lmaudit.checks.plugin import lifecycle, pins, workers
from lmaudit.checks.plugin.items import AUDIT_SESSION_KEY, MEASURED_KEY, AuditYamlFile, Measured
from lmaudit.checks.plugin.options import AuditOptions, add_options
from lmaudit.checks.plugin.records import AREAS, item_key
from lmaudit.checks.plugin.session import AuditSession
from lmaudit.reports.records import to_jsonable


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


@pytest.hookimpl(wrapper=True)
def pytest_cmdline_main(config: pytest.Config) -> Generator[None, Any, Any]:
    workers.prefer_loadgroup(config)  # before pytest-xdist (itself tryfirst) turns "no --dist" into "load"
    return (yield)


def pytest_configure(config: pytest.Config) -> None:
    # Only lmaudit's own markers: the plugin loads in every pytest session where lmaudit is installed, so it
    # registers nothing else global (no hypothesis profile, no generic marker) and imports no torch here.
    config.addinivalue_line("markers", "audit: an lmaudit audit item")
    config.addinivalue_line("markers", f"audit_area(name): report section of a Python audit ({', '.join(AREAS)})")
    session = AuditSession(AuditOptions.from_config(config), invocation=list(config.invocation_params.args),
                           worker=workers.worker_id(config), n_workers=workers.worker_count(config))
    session.load_baseline()
    session.result_cache = ResultCache(None if session.options.no_cache else cache_root() / "results")
    lifecycle.register(config, session)


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    """YAML files in an ``audits`` directory (and its ``pins``), named ``audit_*``, or named on the command line
    (a pin may have any name)."""
    if file_path.suffix in (".yaml", ".yml") and (
        file_path.parent.name == "audits" or file_path.name.startswith("audit_")
        or (file_path.parent.name == pins.PINS_DIR and file_path.parent.parent.name == "audits")
        or file_path.resolve() in {Path(a.split("::")[0]).resolve() for a in parent.config.args}
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
            session.baseline_condition(item_key(request.node), metric, measured, tolerance)
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
