"""The generic rendering of a result dict, for result types without their own section partial.

:func:`generic_view` turns plain data into a small tree of :class:`Node` that the ``_macros.html.j2`` macro
``render`` draws: scalars as text, mappings as key/value tables, lists of flat mappings as tables, lists of
numbers as a short preview with a count and range, lists of number lists as a matrix preview. Everything is
truncated so a report stays readable and small: long strings, long lists and deep nesting are cut and the
cut is stated ("showing 50 of 1536").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

MAX_ROWS = 50  # table rows shown
MAX_COLUMNS = 16
MAX_ITEMS = 24  # scalar list items shown
MAX_KEYS = 60
MAX_CHARS = 400
MAX_DEPTH = 4


@dataclass(frozen=True)
class Node:
    """``kind`` is one of: scalar, kv, table, list, nodes, empty."""

    kind: str
    text: str = ""  # scalar text; for list/table/nodes: a note such as "showing 50 of 1536"
    items: list[Any] = field(default_factory=list)  # kv: (key, Node); list: str; nodes: Node
    columns: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)


def fmt(value: Any) -> str:
    """Numbers to 6 significant digits; everything else as text, cut at MAX_CHARS."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    if isinstance(value, int):
        return str(value)
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= MAX_CHARS else f"{text[:MAX_CHARS]}… ({len(text):,} characters)"


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(shown: int, total: int) -> str:
    return f"showing {shown} of {total:,}" if shown < total else ""


def generic_view(value: Any, depth: int = 0) -> Node:
    if _is_scalar(value):
        return Node("scalar", fmt(value))
    if depth >= MAX_DEPTH:
        return Node("scalar", fmt(value))
    if isinstance(value, dict):
        if not value:
            return Node("empty", "(empty)")
        keys = list(value)[:MAX_KEYS]
        return Node("kv", _shown(len(keys), len(value)), [(str(k), generic_view(value[k], depth + 1)) for k in keys])
    if isinstance(value, (list, tuple)):
        return _list_view(list(value), depth)
    return Node("scalar", fmt(str(value)))


def _list_view(values: list[Any], depth: int) -> Node:
    if not values:
        return Node("empty", "(empty list)")
    if all(isinstance(v, dict) and all(_is_scalar(x) for x in v.values()) for v in values):
        columns: list[str] = []
        for row in values:
            columns.extend(str(k) for k in row if str(k) not in columns)
        shown_columns = columns[:MAX_COLUMNS]
        rows = [[fmt(row.get(c, "")) for c in shown_columns] for row in values[:MAX_ROWS]]
        note = "; ".join(n for n in (_shown(len(rows), len(values)),
                                     _shown(len(shown_columns), len(columns)).replace("showing", "columns")) if n)
        return Node("table", note, columns=shown_columns, rows=rows)
    if all(_is_scalar(v) for v in values):
        note = _shown(min(len(values), MAX_ITEMS), len(values))
        numbers = [float(v) for v in values if _is_number(v) and math.isfinite(v)]
        if note and len(numbers) == len(values):
            note += f"; min {min(numbers):.4g}, mean {sum(numbers) / len(numbers):.4g}, max {max(numbers):.4g}"
        return Node("list", note, [fmt(v) for v in values[:MAX_ITEMS]])
    if all(isinstance(v, (list, tuple)) and all(_is_scalar(x) for x in v) for v in values):
        width = max(len(v) for v in values)
        rows = [[fmt(x) for x in v[:MAX_COLUMNS]] for v in values[:MAX_ROWS]]
        note = f"matrix {len(values)} × {width}" + (" (corner shown)" if len(values) > MAX_ROWS or width > MAX_COLUMNS else "")
        return Node("table", note, columns=[], rows=rows)
    shown = values[:MAX_ROWS]
    return Node("nodes", _shown(len(shown), len(values)), [generic_view(v, depth + 1) for v in shown])
