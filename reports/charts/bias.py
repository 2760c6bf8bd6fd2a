"""Charts of the gender-bias audits: r against the share of women; the edit's reduction beside its random draws."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lmaudit.reports.charts import chart_for
from lmaudit.reports.charts.common import bar_chart, scatter


@chart_for("BiasScores")
def bias_vs_share(result: Mapping[str, Any]) -> list[tuple[str, str]]:
    """r_o = log P(o | female) − log P(o | male) against the US share of women in the occupation."""
    rows = result["occupations"]
    svg = scatter([100 * row["share_women"] for row in rows], [row["r"] for row in rows],
                  labels=[row["occupation"] for row in rows], xlabel="women among US workers (%, BLS)",
                  ylabel="r = log P(o|female) − log P(o|male)", max_labels=16)
    ordered = sorted(rows, key=lambda row: row["r"])
    bars = bar_chart([row["occupation"] for row in ordered], [row["r"] for row in ordered],
                     highlight=[i for i, row in enumerate(ordered) if row["share_women"] > 0.5],
                     xlabel="occupation (red: mostly women)", ylabel="r")
    title = f"r vs share of women (Pearson {result['correlation']:.3f}, permutation p {result['correlation_p']:.3g})"
    return [(title, svg), ("r per occupation", bars)]


def _reduction(base: Mapping[str, Any], edited: Mapping[str, Any]) -> float:
    before, after = base["total_bias"], edited["total_bias"]
    return 100.0 * (before - after) / before if before else float("nan")


@chart_for("BiasEditResult")
def edit_against_draws(result: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The CNA edit's held-out (and in-sample) bias reduction beside every random draw and the control's bound."""
    control = result["control"]
    upper = control["mean"] + result["confidence_z"] * control["std"]
    draws = sorted(result["control_reductions"], reverse=True)
    labels = ["CNA, held-out", "CNA, in-sample", "control bound", *(f"random {i + 1}" for i in range(len(draws)))]
    values = [_reduction(result["baseline"], result["edited"]),
              _reduction(result["in_sample_baseline"], result["in_sample_edited"]), upper, *draws]
    return [(f"Bias reduction (%) zeroing k={result['k']} neurons: CNA vs {control['n']} random draws",
             bar_chart(labels, values, highlight=[0, 1], xlabel="total-bias reduction %", horizontal=True))]
