"""Audit files as pytest items: one ``AuditItem`` per entry of an audit file.

The item runs its registered check on the session's model, compares every declared threshold and baseline
tolerance in one place (:mod:`lmaudit.checks.harness.thresholds`) and leaves what it measured in ``item.stash`` for
the report.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from lmaudit.checks.core.errors import DataUnavailableError, LmAuditError, PremiseMissing
from lmaudit.checks.harness.audit_file import ParsedAudit, parse_audit_file
from lmaudit.checks.harness.baseline import audit_key
from lmaudit.checks.harness.result_cache import StoredResult
from lmaudit.checks.harness.thresholds import BaselineTolerance, Comparison, compare
from lmaudit.reports.records import to_jsonable

if TYPE_CHECKING:
    from lmaudit.checks.plugin.session import AuditSession

AUDIT_SESSION_KEY = pytest.StashKey["AuditSession"]()


@dataclass
class Measured:
    """What an item measured, stashed for the report."""

    comparisons: list[Comparison] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    result: Any = None  # the result object, or its plain-data form when reused
    result_type: str = ""  # set when ``result`` is plain data (reused); else the result's class name
    duration_s: float = 0.0
    tolerances: dict[str, BaselineTolerance] = field(default_factory=dict)  # declared "no regression" metrics
    notes: list[str] = field(default_factory=list)
    corpora: list[str] = field(default_factory=list)  # every corpus the check read, labelled
    reused: dict[str, Any] | None = None  # where a reused result came from


MEASURED_KEY = pytest.StashKey[Measured]()


class AuditFailure(AssertionError):
    """Raised by an item whose measured values miss a declared threshold."""

    def __init__(self, audit: ParsedAudit, failed: list[Comparison]) -> None:
        self.audit = audit
        self.failed = failed
        lines = "\n".join(f"  {c.failure_line()}" for c in failed)
        what = "its thresholds" if any(c.kind == "threshold" for c in failed) else "its baseline"
        claim = f"\n  claim: {audit.entry.claim}" if audit.entry.claim else ""
        super().__init__(f"audit {audit.entry.name!r} ({audit.spec.name}) missed {what}:{claim}\n{lines}")


def source_of(item: pytest.Item | pytest.File) -> str:
    """The node's file relative to where pytest was started (else to the rootdir, else absolute)."""
    path = Path(item.path)
    for root in (item.config.invocation_params.dir, item.config.rootpath):
        if path.is_relative_to(root):
            return str(path.relative_to(root))
    return str(path)


class AuditYamlFile(pytest.File):
    def collect(self) -> Iterator[AuditItem]:
        audits = parse_audit_file(self.path)
        if audits and audits[0].pinned is not None:  # a pin: the session applies its deviations
            self.config.stash[AUDIT_SESSION_KEY].pin_headers[source_of(self)] = audits[0].pinned
        for audit in audits:
            yield AuditItem.from_parent(self, name=audit.entry.name, audit=audit)


def nonfinite_guard(context: Any) -> contextlib.AbstractContextManager[Any]:
    """:func:`lmaudit.checks.core.hooks.nonfinite_guard` on the model under audit: a NaN or inf in any layer's
    output raises :class:`NonFiniteOutputError` naming the first such module, so the row is an error that says
    where, instead of a threshold compared with a NaN. A no-op when the adapter does not know the architecture
    (the check then reports that itself)."""
    from lmaudit.checks.core import hooks

    try:
        return hooks.nonfinite_guard(context.model.adapter)
    except LmAuditError:
        return contextlib.nullcontext()


class AuditItem(pytest.Item):
    def __init__(self, *, audit: ParsedAudit, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.audit = audit
        self.key = audit_key(self.path, audit.entry.name)
        self.add_marker(pytest.mark.audit)
        if audit.entry.xfail is not None:
            self.expect_deviation(audit.entry.xfail.reason, strict=audit.entry.xfail.strict)

    def expect_deviation(self, reason: str, *, strict: bool = True) -> None:
        """Only a missed threshold is the expected deviation; a crash is still an error."""
        self.add_marker(pytest.mark.xfail(reason=reason, strict=strict, raises=AuditFailure))

    def setup(self) -> None:
        session = self.config.stash[AUDIT_SESSION_KEY]
        profile = session.options.profile
        if self.audit.resolve(profile) is None and self.audit.pinned is not None:
            pytest.skip(f"the pin holds values for profile {', '.join(self.audit.profiles)} only: re-pin with "
                        f"--audit-profile {profile} --audit-pin <the pin file> to add {profile!r}")
        if self.audit.resolve(profile) is None:
            pytest.skip(f"not in profile {session.options.profile!r} (runs in {', '.join(self.audit.profiles)})")

    def runtest(self) -> None:
        session = self.config.stash[AUDIT_SESSION_KEY]
        measured = Measured()
        self.stash[MEASURED_KEY] = measured
        resolved = self.audit.resolve(session.options.profile)
        assert resolved is not None, "setup skips entries outside the profile"
        context = session.context()
        self._measure(session, context, resolved.params, measured)
        for metric, threshold in resolved.expect.items():
            if metric not in measured.metrics:
                raise LmAuditError(f"check {self.audit.spec.name!r} did not report metric {metric!r}")
            measured.comparisons.append(compare(metric, measured.metrics[metric], threshold))
        measured.tolerances = dict(self.audit.entry.baseline)
        for metric, tolerance in self.audit.entry.baseline.items():
            if metric not in measured.metrics:
                raise LmAuditError(f"check {self.audit.spec.name!r} did not report metric {metric!r}")
            session.baseline_condition(self.key, metric, measured, tolerance)
        failed = [c for c in measured.comparisons if not c.passed]
        if failed:
            raise AuditFailure(self.audit, failed)

    def _measure(self, session: AuditSession, context: Any, params: Any, measured: Measured) -> None:
        """The check's result and metrics: reused when the result cache holds this exact run (same weights,
        check, parameters, seed, corpus, precision, versions and sources), else computed (seeded, inside the
        non-finite guard) and stored."""
        cache = session.result_cache
        key = None
        if cache is not None:
            from lmaudit.checks.harness.result_cache import cache_key

            key = cache_key(check=self.audit.spec.name, check_fn=self.audit.spec.fn,
                            params=to_jsonable(params.model_dump(mode="json")), run=session.cache_material())
            if (hit := cache.lookup(key)) is not None:
                stored, measured.reused = hit
                if stored.premise_missing is not None:
                    pytest.skip(f"premise missing: {stored.premise_missing}")
                measured.result, measured.result_type = stored.result, stored.result_type
                measured.metrics, measured.corpora = dict(stored.metrics), list(stored.corpora)
                return
        import torch

        torch.manual_seed(context.seed)
        started = time.perf_counter()
        context.begin_check()
        try:
            with nonfinite_guard(context):
                result = self.audit.spec.run(context, params)
        except DataUnavailableError as exc:  # optional data absent: skipped, so a fresh clone still passes
            pytest.skip(f"data unavailable: {exc}")
        except PremiseMissing as exc:  # the claim does not apply to this model: skipped with the reason
            if cache is not None and key is not None:
                cache.store(key, StoredResult(premise_missing=str(exc), duration_s=time.perf_counter() - started,
                                              corpora=context.corpora_used()), self.nodeid)
            pytest.skip(f"premise missing: {exc}")
        finally:
            measured.duration_s = time.perf_counter() - started
            measured.corpora = context.corpora_used()
        measured.result = result
        measured.metrics = dict(to_jsonable(result.metrics()))
        if cache is not None and key is not None:
            cache.store(key, StoredResult(type(result).__name__, to_jsonable(result), measured.metrics,
                                          measured.corpora, measured.duration_s), self.nodeid)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, (AuditFailure, LmAuditError)):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"audit {self.audit.entry.name} ({self.audit.spec.name})"
