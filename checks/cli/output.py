"""What every command prints: JSON on stdout for ``--json``."""

from __future__ import annotations

import json
import sys


def print_json(data: object) -> None:
    """``data`` as strict JSON on stdout (dataclasses, enums and tensors become plain values)."""
    from lmaudit.reports.records import to_jsonable

    json.dump(to_jsonable(data), sys.stdout, indent=2)
    sys.stdout.write("\n")
