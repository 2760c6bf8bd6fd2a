"""Charts of the quantization audits: perplexity against block size, naive vs super-outlier-aware."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lmaudit.reports.charts import chart_for
from lmaudit.reports.charts.common import line_chart


def _number(value: Any) -> float:
    try:
        return float(value)  # "nan" / "inf" strings from the JSON conversion become floats again
    except (TypeError, ValueError):
        return float("nan")


@chart_for("BlockSizeSweep")
def ppl_vs_block_size(result: Mapping[str, Any]) -> list[tuple[str, str]]:
    """One chart per corpus: PPL against block size B (log-log), one naive and one aware line per bit width
    (plus a hold-out-only line where the aware scheme clipped), the full-precision perplexity as a dashed line
    (Yu et al. 2024, Figure 7)."""
    points = list(result.get("points", []))
    charts = []
    for corpus in sorted({p["corpus"] for p in points}):
        mine = [p for p in points if p["corpus"] == corpus]
        blocks = sorted({int(p["block_size"]) for p in mine})
        series: dict[str, list[float]] = {}
        for bits in sorted({int(p["bits"]) for p in mine}):
            by_block = {int(p["block_size"]): p for p in mine if int(p["bits"]) == bits}
            series[f"W{bits} naive"] = [_number(by_block[b]["ppl_naive"]) if b in by_block else float("nan")
                                        for b in blocks]
            series[f"W{bits} aware"] = [_number(by_block[b]["ppl_aware"]) if b in by_block else float("nan")
                                        for b in blocks]
            hold = [_number(by_block[b].get("ppl_hold_out", "nan")) if b in by_block else float("nan")
                    for b in blocks]
            if any(not math.isnan(h) and h != a for h, a in zip(hold, series[f"W{bits} aware"], strict=True)):
                series[f"W{bits} hold-out only"] = hold  # differs from aware where the search clipped
        fp = _number(mine[0]["ppl_fp"]) if mine else None
        svg = line_chart(blocks, series, xlabel="block size B (elements)", ylabel="perplexity", log_x=True,
                         log_y=True, hline=fp, title=f"{corpus}: perplexity vs block size (dashed: full precision)")
        charts.append((f"Perplexity vs block size on {corpus}", svg))
    return charts
