"""Charts of the arithmetic audit: per-operation heatmaps of the head sweep, the top heads, CNA bars."""

from __future__ import annotations

import math
from typing import Any

from lmaudit.reports.charts import chart_for
from lmaudit.reports.charts.common import bar_chart, heatmap

OP_TITLES = {"+": "addition", "-": "subtraction", "*": "multiplication", "/": "division"}


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan  # NaN arrives as the string "nan" in the JSON-able result


def drop_points(sweep: dict[str, Any]) -> list[list[list[float]]]:
    """``drop[L][h][j]`` in points (baseline − accuracy) × 100; NaN for layers not swept."""
    baseline = [_number(b) for b in sweep["baseline"]]
    return [[[100 * (b - _number(a)) for a, b in zip(head, baseline, strict=True)] for head in layer]
            for layer in sweep["accuracy"]]


def top_heads(sweep: dict[str, Any], k: int = 15) -> list[tuple[str, float]]:
    drops = drop_points(sweep)
    rows = [(f"L{layer}.H{head}", max(values)) for layer, heads in enumerate(drops)
            for head, values in enumerate(heads) if not any(math.isnan(v) for v in values)]
    return sorted(rows, key=lambda row: -row[1])[:k]


@chart_for("HeadSweepAudit", "HeadSweepResult")
def head_sweep_charts(result: dict[str, Any]) -> list[tuple[str, str]]:
    sweep = result.get("sweep", result)
    drops = drop_points(sweep)
    charts = []
    for j, op in enumerate(sweep["ops"]):
        matrix = [[head[j] for head in layer] for layer in drops]
        charts.append((f"Accuracy drop (points) per head, {OP_TITLES.get(op, op)} "
                       f"(baseline {100 * _number(sweep['baseline'][j]):.1f}%)",
                       heatmap(matrix, xlabel="head", ylabel="layer", colorbar_label="drop (points)",
                               cmap="RdBu_r", center_zero=True)))
    top = top_heads(sweep)
    threshold = _number(sweep["threshold_points"])
    charts.append((f"Top heads by largest drop over operations (critical: ≥ {threshold:g} points)",
                   bar_chart([name for name, _ in top], [drop for _, drop in top], ylabel="max drop (points)",
                             highlight=[i for i, (_, drop) in enumerate(top) if drop >= threshold])))
    return charts


@chart_for("InterventionCheck")
def intervention_chart(result: dict[str, Any]) -> list[tuple[str, str]]:
    random = [_number(v) for v in result["random_zeroed"]]
    labels = ["clean", f"top-{result['k']} zeroed"] + [f"random draw {i}" for i in range(len(random))]
    values = [100 * _number(result["baseline"]), 100 * _number(result["top_zeroed"])] + [100 * v for v in random]
    return [("Accuracy (%) with CNA top neurons vs random neurons zeroed",
             bar_chart(labels, values, ylabel="accuracy (%)", highlight=[1]))]


@chart_for("PruningResult")
def pruning_chart(result: dict[str, Any]) -> list[tuple[str, str]]:
    labels = ["clean", f"keep top {result['keep']}", f"keep random {result['keep']}"]
    values = [100 * _number(result[key]) for key in ("baseline", "pruned", "random_pruned")]
    return [("Accuracy (%) after pruning the chosen layers", bar_chart(labels, values, ylabel="accuracy (%)"))]
