"""One registry from audit files to code: every ``check:`` name maps to exactly one registered function.

A check is a plain function ``fn(context, params) -> result`` where ``params`` is an instance of the check's
pydantic parameter model (unknown keys are errors) and ``result`` is a frozen dataclass deriving from
:class:`~lmaudit.checks.core.results.CheckResult`, which declares the metrics audit files may put thresholds on.
The registry reads those names from the result class named in the function's return annotation: metrics are
declared once. Checks know nothing about pytest or HTML; the plugin compares their metrics with the declared
thresholds and the report renders their results.

This module is a leaf: it imports no area. :mod:`lmaudit.checks.catalog` imports the areas, whose ``checks``
modules register their checks here; callers load the catalog before looking a name up.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from lmaudit.checks.core.errors import AuditFileError
from lmaudit.checks.core.results import CheckResult

if TYPE_CHECKING:
    from lmaudit.checks.harness.context import AuditContext

AREAS: tuple[str, ...] = ("model", "superweights", "quantization", "arithmetic", "bias")


class CheckParams(BaseModel):
    """Base of every check's parameters: unknown keys are errors, values are validated by type."""

    model_config = ConfigDict(extra="forbid", frozen=True)


CheckFn = Callable[["AuditContext", Any], CheckResult]


@dataclass(frozen=True)
class CheckSpec:
    name: str
    fn: CheckFn
    params: type[CheckParams]
    result: type[CheckResult]
    area: str  # report section: one of AREAS
    summary: str  # first line of the function's docstring

    @property
    def metrics(self) -> tuple[str, ...]:
        """Every metric the result may report; thresholds must name one of these."""
        return self.result.metric_names()

    def run(self, context: AuditContext, params: CheckParams) -> CheckResult:
        return self.fn(context, params)


CHECKS: dict[str, CheckSpec] = {}


def _result_class(name: str, fn: CheckFn) -> type[CheckResult]:
    result = fn.__annotations__.get("return")
    try:  # only the return annotation: parameter annotations may name types imported for type checking only
        if isinstance(result, str):
            result = eval(result, fn.__globals__)  # noqa: S307  (what typing.get_type_hints does)
    except NameError as exc:
        raise TypeError(f"check {name!r}: cannot resolve the return annotation of {fn.__qualname__}: {exc}") from None
    if not (inspect.isclass(result) and issubclass(result, CheckResult)):
        raise TypeError(f"check {name!r}: {fn.__qualname__} must be annotated to return a CheckResult subclass "
                        f"(got {result!r}); its metrics are declared on that class")
    return result


def register_check(name: str, *, params: type[CheckParams], area: str) -> Callable[[CheckFn], CheckFn]:
    """Decorator: register ``fn`` as the check called ``name`` in audit files."""
    if area not in AREAS:
        raise ValueError(f"check {name!r}: unknown area {area!r}; choose one of {', '.join(AREAS)}")

    def decorate(fn: CheckFn) -> CheckFn:
        if name in CHECKS and CHECKS[name].fn is not fn:
            raise ValueError(f"check {name!r} is registered twice ({CHECKS[name].fn} and {fn})")
        doc = inspect.getdoc(fn) or ""
        CHECKS[name] = CheckSpec(name, fn, params, _result_class(name, fn), area,
                                 doc.splitlines()[0] if doc else "")
        return fn

    return decorate


def get_check(name: str) -> CheckSpec:
    """The registered check ``name``; an unknown name fails with a suggestion and the valid names."""
    if name in CHECKS:
        return CHECKS[name]
    close = difflib.get_close_matches(name, CHECKS, n=1)
    hint = f" Did you mean: {close[0]}?" if close else ""
    raise AuditFileError(f"Unknown check {name!r}.{hint} Valid checks: {', '.join(sorted(CHECKS))}")
