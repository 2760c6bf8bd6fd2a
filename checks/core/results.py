"""Check results declare their metrics once, on the result class.

A check returns a frozen dataclass that derives from :class:`CheckResult`. Its *metrics*, the values an audit
file may put thresholds on, are declared on the class, in one of three ways:

- a dataclass field marked with :func:`metric_field` (``n_tokens: int = metric_field()``);
- a property marked with :class:`metric` (``@metric def perplexity_ratio(self) -> float: ...``);
- a :class:`metric_group` for a family of names known when the class is defined
  (``@metric_group(*(f"perplexity_{c}" for c in CONDITIONS))``), returning a dict with exactly those keys.

:meth:`CheckResult.metric_names` reads the declarations (the registry validates audit files against it before
any model runs) and :meth:`CheckResult.metrics` evaluates them on an instance, so the names an audit file may
use and the values a run reports cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar, overload

T = TypeVar("T")


class metric(Generic[T]):  # noqa: N801  (used as a decorator, like property)
    """A read-only property that is also a declared metric of its result class."""

    def __init__(self, fn: Callable[[Any], T]) -> None:
        self.fn = fn
        self.name = fn.__name__
        self.__doc__ = fn.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type) -> metric[T]: ...

    @overload
    def __get__(self, obj: object, owner: type) -> T: ...

    def __get__(self, obj: object | None, owner: type) -> metric[T] | T:
        return self if obj is None else self.fn(obj)


class metric_group:  # noqa: N801
    """Several metrics computed together: ``fn(self)`` returns a dict whose keys are exactly ``names``."""

    def __init__(self, *names: str) -> None:
        if not names or len(set(names)) != len(names):
            raise ValueError(f"metric_group needs distinct names, got {names!r}")
        self.names = names
        self.fn: Callable[[Any], dict[str, Any]] | None = None

    def __call__(self, fn: Callable[[Any], dict[str, Any]]) -> metric_group:
        self.fn = fn
        return self

    def values(self, obj: object) -> dict[str, Any]:
        assert self.fn is not None, "metric_group used without a function"
        out = self.fn(obj)
        if set(out) != set(self.names):
            raise ValueError(f"{type(obj).__name__}: metric group returned {sorted(out)}, declared "
                             f"{sorted(self.names)}")
        return out


def metric_field(**kwargs: Any) -> Any:
    """A dataclass field that is also a declared metric (``dataclasses.field`` keywords pass through)."""
    metadata = {**kwargs.pop("metadata", {}), "metric": True}
    return dataclasses.field(metadata=metadata, **kwargs)


class CheckResult:
    """Base of every check's result dataclass: the metrics are declared on the class (module docstring)."""

    _metric_cache: ClassVar[dict[type, tuple[str, ...]]] = {}

    @classmethod
    def metric_names(cls) -> tuple[str, ...]:
        """Every declared metric, in declaration order (fields first, then properties and groups)."""
        if cls not in CheckResult._metric_cache:
            names: list[str] = []
            if dataclasses.is_dataclass(cls):
                names += [f.name for f in dataclasses.fields(cls) if f.metadata.get("metric")]
            for klass in reversed(cls.__mro__):
                for attr in vars(klass).values():
                    if isinstance(attr, metric):
                        names.append(attr.name)
                    elif isinstance(attr, metric_group):
                        names += attr.names
            CheckResult._metric_cache[cls] = tuple(dict.fromkeys(names))
        return CheckResult._metric_cache[cls]

    def metrics(self) -> dict[str, Any]:
        """The declared metrics' values on this result."""
        out: dict[str, Any] = {}
        for klass in reversed(type(self).__mro__):
            for attr in vars(klass).values():
                if isinstance(attr, metric_group):
                    out.update(attr.values(self))
        for name in self.metric_names():
            if name not in out:
                out[name] = getattr(self, name)
        return {name: out[name] for name in self.metric_names()}
