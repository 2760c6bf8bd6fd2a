"""``lmaudit checks [NAME]``: every registered check with its area, parameters (with defaults), metrics and the
first line of its docstring, read from the registry itself, so the list cannot drift from what audits can name."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from lmaudit.checks.cli.output import print_json
from lmaudit.checks.cli.params import defaults

if TYPE_CHECKING:
    from lmaudit.checks.cli.commands import Commands
    from lmaudit.checks.harness.registry import CheckSpec


def describe_check(spec: CheckSpec) -> dict[str, Any]:
    return {"name": spec.name, "area": spec.area, "summary": spec.summary, "params": defaults(spec),
            "metrics": list(spec.metrics), "result_type": spec.result.__name__}


def short(value: Any, width: int = 48) -> str:
    """A default as Python writes it, long lists cut to their start and their length (``--json`` has them all)."""
    text = repr(value)
    if len(text) <= width:
        return text
    if isinstance(value, (list, tuple)):
        return f"{text[: width - 12].rsplit(',', 1)[0]}, ... ({len(value)} items)]"
    return text[: width - 3] + "..."


def cmd_checks(args: argparse.Namespace) -> int:
    """List every registered check: area, parameters with defaults, metrics, summary."""
    from lmaudit.checks.catalog import load_checks
    from lmaudit.checks.harness.registry import AREAS, get_check

    registry = load_checks()
    if args.name:
        specs = [get_check(args.name)]  # an unknown name fails with a suggestion
    else:
        specs = sorted(registry.values(), key=lambda s: (AREAS.index(s.area), s.name))
    rows = [describe_check(spec) for spec in specs]
    if args.json:
        print_json(rows)
        return 0
    for row in rows:
        print(f"{row['name']}  [{row['area']}]  -> {row['result_type']}")
        print(f"    {row['summary']}")
        params = ", ".join(f"{k}={short(v)}" for k, v in row["params"].items()) or "none"
        print(f"    params: {params}")
        print(f"    metrics: {', '.join(row['metrics'])}")
    return 0


def register(commands: Commands) -> None:
    parser = commands.plain("checks", cmd_checks)
    parser.add_argument("name", nargs="?", default=None, help="one check (default: all)")
