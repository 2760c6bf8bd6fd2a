"""Charts of the gender-bias audits: r against the share of women; the edit's effects beside its control."""

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
    return [(f"r vs share of women (Pearson {result['correlation']:.3f})", svg), ("r per occupation", bars)]


@chart_for("BiasEditResult")
def edit_effects(result: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Bias reduction and perplexity change of the CNA edit beside the random control."""
    effects = [result["edit"], result["control"]]
    labels = [f"{e['kind']}: bias reduction %" for e in effects]
    labels += [f"{e['kind']}: perplexity Δ%" for e in effects]
    values = [e["bias_reduction_pct"] for e in effects] + [e["perplexity_change_pct"] for e in effects]
    return [(f"Zeroing k={result['k']} neurons: CNA vs random",
             bar_chart(labels, values, highlight=[0, 2], xlabel="%", horizontal=True))]
