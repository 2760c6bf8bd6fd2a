"""Thresholds declared in audit files and the one place where a measured value is compared with them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


class Threshold(BaseModel):
    """One declared expectation on one metric. Give any of min/max, or equals, or approx (with rel/abs)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min: float | None = None
    max: float | None = None
    equals: Any = None
    approx: float | None = None
    rel: float | None = None  # relative tolerance for approx (default 1e-6 when neither rel nor abs is given)
    abs: float | None = None  # absolute tolerance for approx

    @model_validator(mode="after")
    def _one_kind(self) -> Threshold:
        kinds = [self.min is not None or self.max is not None, self.equals is not None, self.approx is not None]
        if sum(kinds) != 1:
            raise ValueError("give exactly one of: min and/or max, equals, approx")
        if (self.rel is not None or self.abs is not None) and self.approx is None:
            raise ValueError("rel/abs only go with approx")
        return self

    def describe(self) -> str:
        if self.equals is not None:
            return f"== {self.equals!r}"
        if self.approx is not None:
            tol = [f"rel {self.rel}" if self.rel is not None else "", f"abs {self.abs}" if self.abs is not None else ""]
            return f"≈ {self.approx} ({', '.join(t for t in tol if t) or 'rel 1e-06'})"
        parts = []
        if self.min is not None:
            parts.append(f"≥ {self.min}")
        if self.max is not None:
            parts.append(f"≤ {self.max}")
        return " and ".join(parts)


@dataclass(frozen=True)
class Comparison:
    """A measured value beside its threshold."""

    metric: str
    expected: str
    measured: Any
    passed: bool

    def failure_line(self) -> str:
        return f"{self.metric}: expected {self.expected}, measured {format_value(self.measured)}"


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return repr(value)


def _normalise(value: Any) -> Any:
    """Tuples become lists so YAML lists compare equal to measured tuples."""
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    return value


def compare(metric: str, measured: Any, threshold: Threshold) -> Comparison:
    """``passed`` is True iff ``measured`` satisfies ``threshold``; NaN never satisfies a numeric bound."""
    if threshold.equals is not None:
        passed = _normalise(measured) == _normalise(threshold.equals)
    elif threshold.approx is not None:
        value = float(measured)
        rel = threshold.rel if threshold.rel is not None else (0.0 if threshold.abs is not None else 1e-6)
        passed = math.isclose(value, threshold.approx, rel_tol=rel, abs_tol=threshold.abs or 0.0)
    else:
        value = float(measured)
        passed = not math.isnan(value)
        if threshold.min is not None:
            passed = passed and value >= threshold.min
        if threshold.max is not None:
            passed = passed and value <= threshold.max
    return Comparison(metric, threshold.describe(), measured, passed)
