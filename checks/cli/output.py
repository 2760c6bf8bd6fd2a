"""What commands print: with ``--json`` one strict JSON document on stdout, else readable text.

The JSON document of a model command has the shape of an entry of the audits' results file, so a script reads
both the same way::

    {"schema": "lmaudit-cli", "schema_version": 1, "command": "quantize",
     "model": {...the model card: spec, architecture, parameters, dtype, content_hash, device...}, "seed": 0,
     "results": [{"check": "quantization_recovery", "area": "quantization", "params": {...}, "metrics": {...},
                  "result_type": "QuantizationRecovery", "result": {...}, "corpora": [...], "duration_s": 12.3}]}

``check`` is ``null`` for a science result outside the registry (one prompt's CNA). Non-finite numbers are
strings (``"nan"``, ``"inf"``), as in the results file.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmaudit.checks.cli.session import Outcome, Session

SCHEMA = "lmaudit-cli"
SCHEMA_VERSION = 1


def print_json(data: object) -> None:
    """``data`` as strict JSON on stdout (dataclasses, enums and tensors become plain values)."""
    from lmaudit.reports.records import to_jsonable

    json.dump(to_jsonable(data), sys.stdout, indent=2, allow_nan=False)
    sys.stdout.write("\n")
    sys.stdout.flush()


def outcome_record(outcome: Outcome) -> dict[str, Any]:
    record: dict[str, Any] = {"check": outcome.check, "area": outcome.area, "params": outcome.params}
    if outcome.skipped is not None:
        return {**record, "status": "skipped", "reason": f"{type(outcome.skipped).__name__}: {outcome.skipped}"}
    metrics = outcome.result.metrics() if hasattr(outcome.result, "metrics") else {}
    return {**record, "status": "measured", "metrics": metrics, "result_type": type(outcome.result).__name__,
            "result": outcome.result, "corpora": outcome.corpora, "duration_s": round(outcome.seconds, 3)}


def print_document(command: str, session: Session, outcomes: Sequence[Outcome]) -> None:
    """The command's JSON document (module docstring) on stdout."""
    print_json({"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "command": command,
                "model": session.model.card(), "seed": session.options.seed,
                "results": [outcome_record(o) for o in outcomes]})


def finish(command: str, session: Session, outcomes: Sequence[Outcome], *, as_json: bool,
           render: Callable[[list[Outcome]], None]) -> int:
    """Print the outcomes (the JSON document, or ``render`` of the measured ones), then, when a check was
    skipped, raise its reason: one line on stderr and exit status 2, never a silent partial answer."""
    measured = [o for o in outcomes if o.skipped is None]
    if as_json:
        print_document(command, session, outcomes)
    elif measured:
        render(measured)
    for outcome in outcomes:
        if outcome.skipped is not None:
            sys.stdout.flush()
            raise outcome.skipped
    return 0


# ------------------------------------------------------------------------------------------------ text


def fmt(value: object, pattern: str = "{:.4g}") -> str:
    """A number for a table: ``n/a`` for None and NaN, ``pattern`` for other floats."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return pattern.format(value)
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[object]], *, indent: str = "") -> str:
    """Left-aligned columns as wide as their widest cell."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(indent + line for line in lines)


def print_metrics(outcome: Outcome) -> None:
    """Every metric of a check's result, one per line (what an audit file may gate)."""
    print(f"{outcome.check}: metrics ({outcome.seconds:.1f} s)")
    for name, value in outcome.result.metrics().items():
        print(f"  {name:<40} {fmt(value, '{:.6g}')}")


def print_header(session: Session, what: str) -> None:
    card = session.model.card()
    print(f"{card['spec']} ({card['architecture']}, {card['parameters']:,} parameters, {card['dtype']}, "
          f"{card['device']}): {what}")
