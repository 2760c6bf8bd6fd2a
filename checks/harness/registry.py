"""One registry from audit files to code: every ``check:`` name maps to exactly one registered function.

A check is a plain function ``fn(context, params) -> result`` where ``params`` is an instance of the check's
pydantic parameter model (unknown keys are errors) and ``result`` is a frozen dataclass with a ``metrics()``
method returning the named values that audit files may put thresholds on. Checks know nothing about pytest or
HTML; the plugin compares their metrics with the declared thresholds and the report renders their results.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict

from lmaudit.checks.core.errors import AuditFileError

if TYPE_CHECKING:
    from lmaudit.checks.harness.context import AuditContext


class CheckParams(BaseModel):
    """Base of every check's parameters: unknown keys are errors, values are validated by type."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class CheckResult(Protocol):
    """What a check returns: a dataclass that exposes its threshold-able values."""

    def metrics(self) -> Mapping[str, Any]: ...


CheckFn = Callable[["AuditContext", Any], CheckResult]


@dataclass(frozen=True)
class CheckSpec:
    name: str
    fn: CheckFn
    params: type[CheckParams]
    metrics: tuple[str, ...]  # every metric name the result may report; thresholds must name one of these
    area: str  # report section: model, superweights, quantization, arithmetic, bias
    summary: str  # first line of the function's docstring

    def run(self, context: AuditContext, params: CheckParams) -> CheckResult:
        return self.fn(context, params)


CHECKS: dict[str, CheckSpec] = {}


def register_check(
    name: str, *, params: type[CheckParams], metrics: tuple[str, ...], area: str
) -> Callable[[CheckFn], CheckFn]:
    """Decorator: register ``fn`` as the check called ``name`` in audit files."""

    def decorate(fn: CheckFn) -> CheckFn:
        if name in CHECKS:
            raise ValueError(f"check {name!r} is registered twice ({CHECKS[name].fn} and {fn})")
        doc = inspect.getdoc(fn) or ""
        CHECKS[name] = CheckSpec(name, fn, params, metrics, area, doc.splitlines()[0] if doc else "")
        return fn

    return decorate


def get_check(name: str) -> CheckSpec:
    """The registered check ``name``; an unknown name fails with a suggestion and the valid names."""
    load_builtin_checks()
    if name in CHECKS:
        return CHECKS[name]
    close = difflib.get_close_matches(name, CHECKS, n=1)
    hint = f" Did you mean: {close[0]}?" if close else ""
    raise AuditFileError(f"Unknown check {name!r}.{hint} Valid checks: {', '.join(sorted(CHECKS))}")


def load_builtin_checks() -> dict[str, CheckSpec]:
    """Import the modules that register lmaudit's own checks (idempotent)."""
    import lmaudit.checks.catalog  # noqa: F401  (registration happens on import)

    return CHECKS
