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


@chart_for("HeadSweepAudit", "HeadScreen")
def head_sweep_charts(result: dict[str, Any]) -> list[tuple[str, str]]:
    screen = result.get("screen", result)
    drops = drop_points(screen)
    charts = []
    for j, op in enumerate(screen["ops"]):
        matrix = [[head[j] for head in layer] for layer in drops]
        charts.append((f"Screen: accuracy drop (points) per head, {OP_TITLES.get(op, op)} "
                       f"(baseline {100 * _number(screen['baseline'][j]):.1f}%)",
                       heatmap(matrix, xlabel="head", ylabel="layer", colorbar_label="drop (points)",
                               cmap="RdBu_r", center_zero=True)))
    confirmed = result.get("confirmed") or []
    if confirmed:
        charts.append(("Confirmation on fresh prompts: drop (points) of each candidate on its most significant "
                       "operation (red: significant)",
                       bar_chart([row["name"] for row in confirmed], [_number(row["drop_points"]) for row in confirmed],
                                 ylabel="drop (points)",
                                 highlight=[i for i, row in enumerate(confirmed) if row["significant"]])))
    return charts


@chart_for("InterventionCheck")
def intervention_chart(result: dict[str, Any]) -> list[tuple[str, str]]:
    random = sorted(100 * _number(v) for v in result["random_zeroed"])
    labels = ["clean", f"top-{result['k']} zeroed"] + [f"random {i + 1}" for i in range(len(random))]
    values = [100 * _number(result["baseline"]), 100 * _number(result["top_zeroed"])] + random
    return [("Accuracy (%) with the top CNA neurons vs random neurons zeroed (random draws sorted)",
             bar_chart(labels, values, ylabel="accuracy (%)", highlight=[1]))]


@chart_for("PruningResult")
def pruning_chart(result: dict[str, Any]) -> list[tuple[str, str]]:
    random = sorted(100 * _number(v) for v in result["random_draws"])
    labels = ["clean", f"keep top {result['keep']}"] + [f"random {i + 1}" for i in range(len(random))]
    values = [100 * _number(result["baseline"]), 100 * _number(result["pruned"])] + random
    return [("Accuracy (%) after pruning the CNA layers: top neurons kept vs random neurons kept",
             bar_chart(labels, values, ylabel="accuracy (%)", highlight=[1]))]


@chart_for("HeadAblationComparison")
def head_ablation_chart(result: dict[str, Any]) -> list[tuple[str, str]]:
    controls = sorted(_number(v) for v in result["control_retention"])
    labels = ["critical heads"] + [f"control {i + 1}" for i in range(len(controls))]
    values = [_number(result["comparison"]["importance_retention"])] + controls
    return [("Importance the top neurons keep with the critical heads vs control heads ablated",
             bar_chart(labels, values, ylabel="retention", highlight=[0]))]
