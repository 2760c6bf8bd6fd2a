"""Charts for the report, registered per result type; every module in this package is imported on first use.

A chart function takes one audit's result (the check's result dataclass as plain JSON-able data: dicts, lists,
numbers, strings) and returns ``(title, svg)`` pairs. Register it for the result class's ``__name__``::

    # reports/charts/superweights.py   (any module name not starting with "_"; found through pkgutil)
    from lmaudit.reports.charts import chart_for
    from lmaudit.reports.charts.common import bar_chart

    @chart_for("SuperWeightDirectory")
    def evidence(result: dict) -> list[tuple[str, str]]:
        layers = result["layer_maxima"]
        return [("Per-layer max |activation|", bar_chart([str(i) for i in range(len(layers))], layers))]

The SVG must come from :mod:`lmaudit.reports.charts.common` (or any matplotlib figure through
:func:`lmaudit.reports.charts.common.figure_to_svg`); it is checked by :func:`inline_svg` before it is inlined: no
script, no event handler, no foreignObject, no reference outside the document. A chart function that raises,
or returns unsafe SVG, does not break the report: its place shows the error instead.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from markupsafe import Markup

ChartFn = Callable[[Mapping[str, Any]], Iterable[tuple[str, str]]]

_REGISTRY: dict[str, list[ChartFn]] = {}
_LOAD_ERRORS: dict[str, str] = {}
_loaded = False


class UnsafeSvgError(ValueError):
    """An SVG string that would run code or load something from outside the report."""


@dataclass(frozen=True)
class Chart:
    """One rendered chart: a title and inline-safe SVG markup, or the error that replaced it."""

    title: str
    svg: Markup | None
    error: str = ""


def chart_for(*result_types: str) -> Callable[[ChartFn], ChartFn]:
    """Decorator: draw ``fn``'s charts in the section of every audit whose result class is named so."""
    if not result_types or not all(re.fullmatch(r"[A-Za-z_]\w*", t) for t in result_types):
        raise ValueError(f"chart_for needs result class names, got {result_types!r}")

    def register(fn: ChartFn) -> ChartFn:
        for result_type in result_types:
            functions = _REGISTRY.setdefault(result_type, [])
            if fn not in functions:
                functions.append(fn)
        return fn

    return register


def load_chart_modules() -> dict[str, str]:
    """Import every module of this package (idempotent); returns import errors by module name."""
    global _loaded
    if not _loaded:
        _loaded = True
        for module in pkgutil.iter_modules(__path__):
            if module.name.startswith("_") or module.name == "common":
                continue
            try:
                importlib.import_module(f"{__name__}.{module.name}")
            except Exception as exc:  # noqa: BLE001  (one broken chart module must not hide the report)
                _LOAD_ERRORS[module.name] = f"{type(exc).__name__}: {exc}"
    return dict(_LOAD_ERRORS)


def render_charts(result_type: str, result: Mapping[str, Any]) -> list[Chart]:
    """Every registered chart of ``result_type``, each isolated: a failure becomes a Chart with ``error``."""
    load_chart_modules()
    charts: list[Chart] = []
    for fn in _REGISTRY.get(result_type, []):
        name = f"{fn.__module__}.{fn.__qualname__}"
        try:
            for title, svg in fn(result):
                try:
                    charts.append(Chart(str(title), inline_svg(svg)))
                except UnsafeSvgError as exc:
                    charts.append(Chart(str(title), None, f"{name}: {exc}"))
        except Exception as exc:  # noqa: BLE001
            charts.append(Chart(name, None, f"{name} raised {type(exc).__name__}: {exc}"))
    return charts


_STRIP = re.compile(
    r"<\?xml[^>]*\?>|<!DOCTYPE[^>]*>|<!--.*?-->|<metadata>.*?</metadata>|<style[^>]*>.*?</style>", re.S | re.I
)
_XMLNS = re.compile(r'\s+xmlns(:\w+)?="[^"]*"')
_IN_TAG = r"<[^>]*?"  # patterns below only look inside tags: escaped label text cannot open one
_UNSAFE = [
    (re.compile(r"<\s*(script|foreignObject|iframe|object|embed|style)\b", re.I), "forbidden element"),
    (re.compile(_IN_TAG + r"\son\w+\s*=", re.I), "event handler attribute"),
    (re.compile(_IN_TAG + r"href\s*=\s*[\"'](?!#|data:image/png;base64,)", re.I), "reference outside the document"),
    (re.compile(_IN_TAG + r"url\(\s*(?![\"']?#)", re.I), "url() outside the document"),
    (re.compile(_IN_TAG + r"(@import|javascript:)", re.I), "import or javascript: URL"),
]


def inline_svg(svg: str) -> Markup:
    """``svg`` ready to inline in HTML: XML prologue, DOCTYPE, comments, metadata, <style> (it would apply to
    the whole page) and xmlns removed, then checked for anything that could run or fetch. Raises
    :class:`UnsafeSvgError` on a violation."""
    text = _XMLNS.sub("", _STRIP.sub("", str(svg))).strip()
    if not (text.startswith("<svg") and text.endswith("</svg>")):
        raise UnsafeSvgError("not a single <svg> element")
    for pattern, what in _UNSAFE:
        if match := pattern.search(text):
            raise UnsafeSvgError(f"{what}: {match.group(0)!r}")
    return Markup(text)
