"""Thresholds declared in audit files, and the one place where a measured value is compared with them.

Two kinds of expectation exist:

- a :class:`Threshold` on a metric (``expect:`` in YAML): ``{min, max}``, ``{equals}`` or ``{approx, rel, abs}``;
- a :class:`BaselineTolerance` (``baseline:`` in YAML): "no regression versus the baseline results file
  given with ``--audit-baseline``". With ``b`` the baseline value and ``m`` the measured one, the allowed slack
  is ``slack = max(abs, rel * |b|)`` (both default 0) and the condition is

  - ``lower_is_better``:  ``m <= b + slack``
  - ``higher_is_better``: ``m >= b - slack``
  - ``no_change``:        ``|m - b| <= slack`` (non-numeric values must be equal)

A missing baseline value never passes silently (as in pytest-regressions): the comparison fails and says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Direction = Literal["lower_is_better", "higher_is_better", "no_change"]
DIRECTIONS: tuple[str, ...] = ("lower_is_better", "higher_is_better", "no_change")


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
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max}): no value can pass")
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


class BaselineTolerance(BaseModel):
    """"No regression versus the baseline" for one metric: a direction and a slack (rel and/or abs, default 0)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    direction: Direction
    rel: float | None = Field(default=None, ge=0)
    abs: float | None = Field(default=None, ge=0)

    def slack(self, baseline: float) -> float:
        return max(self.abs or 0.0, (self.rel or 0.0) * abs(baseline))

    def describe(self) -> str:
        tol = [f"rel {self.rel:g}" if self.rel is not None else "", f"abs {self.abs:g}" if self.abs is not None else ""]
        return f"{self.direction.replace('_', ' ')} ({', '.join(t for t in tol if t) or 'exact'})"


@dataclass(frozen=True)
class Comparison:
    """A measured value beside its expectation. ``kind`` is "threshold" or "baseline"."""

    metric: str
    expected: str
    measured: Any
    passed: bool
    kind: str = "threshold"
    baseline: Any = None  # the baseline value, for kind "baseline"
    delta: float | None = None  # measured - target, for an approx or numeric equals threshold

    def failure_line(self) -> str:
        what = "regressed vs baseline: " if self.kind == "baseline" else ""
        return f"{self.metric}: {what}expected {self.expected}, measured {format_value(self.measured)}{self.delta_text()}"

    def delta_text(self) -> str:
        """`` (Δ +0.35, +1.77 %)`` beside a value that missed a pinned target, else empty."""
        if self.delta is None:
            return ""
        target = _number(self.measured)
        target = None if target is None else target - self.delta
        rel = f", {100 * self.delta / abs(target):+.3g} %" if target else ""
        return f" (Δ {self.delta:+.6g}{rel})"


@dataclass(frozen=True)
class MetricDelta:
    """One metric of this run beside the same metric of the baseline run (for the report's delta columns)."""

    metric: str
    baseline: Any
    measured: Any
    delta: float | None  # measured - baseline, for numbers
    rel_delta: float | None  # delta / |baseline|, when baseline != 0
    tolerance: str  # the declared tolerance, or "" when none is declared
    regression: bool | None  # None when no tolerance is declared


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


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return float(value)  # "nan"/"inf" strings come from JSON, where non-finite floats are stored as text
    except ValueError:
        return None


def compare(metric: str, measured: Any, threshold: Threshold) -> Comparison:
    """``passed`` is True iff ``measured`` satisfies ``threshold``; NaN never satisfies a numeric bound.

    For ``approx`` and numeric ``equals`` the comparison also carries ``delta = measured - target`` (what a pinned
    value moved by)."""
    delta = None
    value = _number(measured)
    if threshold.equals is not None:
        passed = _normalise(measured) == _normalise(threshold.equals)
        target = _number(threshold.equals)
        if value is not None and target is not None and math.isfinite(value) and math.isfinite(target):
            delta = value - target
    elif value is None or math.isnan(value):
        passed = False
    elif threshold.approx is not None:
        rel = threshold.rel if threshold.rel is not None else (0.0 if threshold.abs is not None else 1e-6)
        passed = math.isclose(value, threshold.approx, rel_tol=rel, abs_tol=threshold.abs or 0.0)
        delta = value - threshold.approx if math.isfinite(value) else None
    else:
        passed = (threshold.min is None or value >= threshold.min) and (
            threshold.max is None or value <= threshold.max
        )
    return Comparison(metric, threshold.describe(), measured, passed, delta=delta)


def compare_to_baseline(metric: str, measured: Any, baseline: Any, tolerance: BaselineTolerance,
                        *, missing: str = "") -> Comparison:
    """The "no regression vs baseline" condition. ``missing`` (non-empty) says why there is no baseline value."""
    if missing:
        return Comparison(metric, f"a baseline value ({missing})", measured, False, "baseline", None)
    b, m = _number(baseline), _number(measured)
    if b is None or m is None:
        passed = tolerance.direction == "no_change" and _normalise(measured) == _normalise(baseline)
        return Comparison(metric, f"== {baseline!r} (baseline)", measured, passed, "baseline", baseline)
    slack = tolerance.slack(b)
    if tolerance.direction == "lower_is_better":
        expected, passed = f"≤ {b + slack:.6g} (baseline {b:.6g} + {slack:.3g})", m <= b + slack
    elif tolerance.direction == "higher_is_better":
        expected, passed = f"≥ {b - slack:.6g} (baseline {b:.6g} − {slack:.3g})", m >= b - slack
    else:
        expected, passed = f"{b:.6g} ± {slack:.3g} (baseline)", abs(m - b) <= slack
    return Comparison(metric, expected, measured, bool(passed) and not math.isnan(m), "baseline", baseline)


def metric_delta(metric: str, measured: Any, baseline: Any, tolerance: BaselineTolerance | None) -> MetricDelta:
    """The delta of one metric against the baseline, with a regression flag when a tolerance is declared."""
    b, m = _number(baseline), _number(measured)
    delta = m - b if b is not None and m is not None else None
    rel = delta / abs(b) if delta is not None and b not in (None, 0.0) else None
    regression = None
    if tolerance is not None:
        regression = not compare_to_baseline(metric, measured, baseline, tolerance).passed
    return MetricDelta(metric, baseline, measured, delta, rel, tolerance.describe() if tolerance else "", regression)
