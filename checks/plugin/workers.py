"""pytest-xdist: audits spread over workers, one report written by the controller.

- ``-n N`` without ``--dist`` runs with ``--dist loadgroup``, and every audit gets an ``xdist_group`` mark naming
  its audit file: the entries of one file share session artifacts (a super-weight detection, a fine-tune), so
  they run in one worker and compute them once. Each worker loads the model once; with ``--device auto`` on a
  multi-GPU host, worker ``gwN`` takes GPU ``N`` modulo the count (:meth:`AuditSession.device`), and on the CPU
  each worker takes its share of the cores (:meth:`AuditSession.threads`).
- The grouping itself is lmaudit's scheduler (:func:`make_scheduler`): pytest-xdist's ``loadgroup`` works by
  suffixing each item's node id with ``@group``, which pytest 9.2 no longer lets a plugin do (node ids moved to
  ``Node._id``; xdist 3.8 still writes ``_nodeid``). lmaudit's scheduler groups an audit by the suffix when there
  is one, else by its audit file (exactly what the automatic marks say), and leaves every other test ungrouped,
  so a plain test suite run with ``-n`` is still load-balanced test by test.
- A worker builds each audit's record where the item ran and attaches it, as JSON, to the item's teardown report,
  with the worker's model-side facts (model card, corpus, precision, cache counts) and, on its first report, the
  list of audits it selected. pytest-xdist ships test reports to the controller with their extra attributes, so
  the controller receives them in ``pytest_runtest_logreport`` exactly as a serial run does, orders the records
  by collection order, and writes ONE HTML report and ONE JSON file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lmaudit.checks.harness.baseline import relative_to_audits, strip_group_suffix
from lmaudit.reports.records import AuditRecord, record_from_dict, to_jsonable

RECORD_ATTR = "lmaudit_record"
FACTS_ATTR = "lmaudit_facts"
SELECTED_ATTR = "lmaudit_selected"
GROUP_PREFIX = "lmaudit:"
LOADGROUP_KEY = "lmaudit_loadgroup"


def worker_id(config: pytest.Config) -> str | None:
    """This process's worker id (``gw0``) when it is a pytest-xdist worker."""
    workerinput = getattr(config, "workerinput", None)
    return None if workerinput is None else str(workerinput.get("workerid"))


def worker_count(config: pytest.Config) -> int:
    workerinput = getattr(config, "workerinput", None)
    return 0 if workerinput is None else int(workerinput.get("workercount", 0))


def prefer_loadgroup(config: pytest.Config) -> None:
    """``-n N`` with no ``--dist`` given: group audits by file (``loadgroup``) instead of xdist's ``load``."""
    option = config.option
    if getattr(option, "numprocesses", None) and getattr(option, "dist", None) == "no":
        option.dist = "loadgroup"


def tell_worker(node: Any) -> None:
    """Controller, for each new worker: a worker re-parses the original command line, where ``--dist`` was not
    given, so it would not know that the controller groups by ``xdist_group``; say so in its ``workerinput``."""
    node.workerinput[LOADGROUP_KEY] = node.config.getvalue("dist") == "loadgroup"


def configure_worker(config: pytest.Config) -> None:
    """Worker: group node ids by ``xdist_group`` (pytest-xdist suffixes them) when the controller does."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and workerinput.get(LOADGROUP_KEY):
        config.option.loadgroup = True


def _audit_file(nodeid: str) -> str | None:
    """The audit file of an audit's node id (a YAML file, or a module in an ``audits`` directory), else None."""
    file = nodeid.split("::")[0]
    path = Path(file)
    return file if path.suffix in (".yaml", ".yml") or path.parent.name == "audits" else None


def make_scheduler(config: pytest.Config, log: Any) -> Any:
    """The ``loadgroup`` scheduler: audits grouped as their ``xdist_group`` marks say, other tests one by one."""
    from xdist.scheduler import LoadScopeScheduling

    class AuditGroupScheduling(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.rfind("@") > nodeid.rfind("]"):  # xdist's own suffix, when pytest lets it set one
                return nodeid.rsplit("@", 1)[1]
            file = _audit_file(nodeid)
            return GROUP_PREFIX + relative_to_audits(Path(file)) if file is not None else nodeid

    return AuditGroupScheduling(config, log)


def add_group_marks(items: list[pytest.Item], is_audit: Any) -> None:
    """Every audit without an ``xdist_group`` mark gets one naming its audit file (relative to ``audits/``)."""
    for item in items:
        if is_audit(item) and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(GROUP_PREFIX + relative_to_audits(item.path)))


def attach(report: pytest.TestReport, record: AuditRecord, facts: dict[str, Any] | None,
           selected: list[dict[str, str]] | None) -> None:
    """Put the record (and the worker's facts and selection) on the report, as JSON strings that survive xdist."""
    setattr(report, RECORD_ATTR, json.dumps(to_jsonable(record), allow_nan=False))
    if facts is not None:
        setattr(report, FACTS_ATTR, json.dumps(to_jsonable(facts), allow_nan=False))
    if selected is not None:
        setattr(report, SELECTED_ATTR, json.dumps(selected))


def received(report: pytest.TestReport) -> tuple[AuditRecord | None, dict[str, Any] | None, list[dict[str, str]] | None]:
    """What :func:`attach` put on a report (each part ``None`` when absent)."""
    record = getattr(report, RECORD_ATTR, None)
    facts = getattr(report, FACTS_ATTR, None)
    selected = getattr(report, SELECTED_ATTR, None)
    return (record_from_dict(json.loads(record)) if record else None,
            json.loads(facts) if facts else None,
            json.loads(selected) if selected else None)


def crash_record(report: pytest.TestReport, name: str, key: str, source: str) -> AuditRecord:
    """The error row of an audit whose worker died while running it (xdist reports the crash, not a record)."""
    node = getattr(report, "node", None)
    gateway = getattr(node, "gateway", None)
    return AuditRecord(nodeid=strip_group_suffix(report.nodeid), key=key, name=name, source=source, status="error",
                       message=str(report.longrepr), worker=getattr(gateway, "id", None))
