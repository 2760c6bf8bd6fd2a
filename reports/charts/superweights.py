"""Charts of the super-weight audits: detection evidence (every scan's per-layer maxima, spike layers highlighted),
the residual stream in the super activation's channel with and without the candidate zeroed, residual-stream
maxima, Table 1, the scaling curve and the stopword shift. Inputs are the plain-data results of
:mod:`lmaudit.checks.superweights` (no torch here)."""

from __future__ import annotations

import math
from typing import Any

from lmaudit.reports.charts import chart_for
from lmaudit.reports.charts.common import bar_chart, line_chart


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan  # NaN and inf arrive as strings in the JSON-able result


def detection_evidence(detection: dict[str, Any]) -> list[tuple[str, str]]:
    """Per scan: max |down-projection input| and max |residual write| per layer (log scale), spike layers in red."""
    charts = []
    for rnd in detection.get("rounds", []):
        maxima = rnd["maxima"]
        layers = [m["layer"] for m in maxima]
        held = ", ".join(f"L{c[0]}[{c[1]}, {c[2]}]" for c in rnd.get("held_out", [])) or "nothing"
        spikes = [layers.index(s) for s in rnd.get("spike_layers", []) if s in layers]
        for key, what in (("input_max", "down-projection input (neurons)"), ("output_max", "residual write")):
            charts.append((f"Scan {rnd['index']} (held out: {held}): max |{what}| per layer",
                           bar_chart(layers, [_number(m[key]) for m in maxima], xlabel="layer",
                                     ylabel=f"max |{key.split('_')[0]}|", highlight=spikes, log_y=True)))
    return charts


@chart_for("SuperWeightDirectory")
def directory_charts(result: dict[str, Any]) -> list[tuple[str, str]]:
    return causal_tests(result["detection"]) + detection_evidence(result["detection"])


def causal_tests(detection: dict[str, Any]) -> list[tuple[str, str]]:
    """Per causal test: the residual spike before and after zeroing, over the layers it was judged on."""
    tests = detection.get("tests", [])
    if not tests:
        return []
    labels = [f"L{t['layer']}[{t['row']}] ({len(t['zeroed'])} zeroed)" for t in tests]
    confirmed = [i for i, t in enumerate(tests) if t["confirmed"]]
    return [("Causal tests: collapse of the residual spike when the candidate is zeroed (≥ "
             f"{_number(detection['settings']['collapse_factor']):g}× confirms; red = confirmed)",
             bar_chart(labels, [_number(t["collapse"]) for t in tests], ylabel="collapse ×", highlight=confirmed,
                       log_y=True))]


@chart_for("SuperWeightImpact")
def impact_charts(result: dict[str, Any]) -> list[tuple[str, str]]:
    residual = result["residual"]
    layers = list(range(len(residual["original"])))
    charts = [("Max |residual stream| entering each layer, with and without the super weights",
               line_chart(layers, {"original": [_number(v) for v in residual["original"]],
                                   "super weights pruned": [_number(v) for v in residual["pruned"]]},
                          xlabel="layer", ylabel="max |h|", log_y=True))]
    conditions = result["conditions"]
    charts.append(("Perplexity per condition (log scale)",
                   bar_chart([c["name"] for c in conditions], [_number(c["perplexity"]) for c in conditions],
                             ylabel="perplexity", log_y=True, highlight=[1])))
    return charts


@chart_for("SuperWeightScaling")
def scaling_charts(result: dict[str, Any]) -> list[tuple[str, str]]:
    points = result["points"]
    scales = [_number(p["scale"]) for p in points]
    charts = [("Perplexity as the super weights are scaled",
               line_chart(scales, {"perplexity": [_number(p["perplexity"]) for p in points]},
                          xlabel="scale factor", ylabel="perplexity", log_y=True))]
    tasks = sorted({t for p in points for t in p.get("accuracy", {})})
    if tasks:
        series = {t: [_number(p["accuracy"].get(t)) for p in points] for t in tasks}
        charts.append(("Zero-shot accuracy as the super weights are scaled",
                       line_chart(scales, series, xlabel="scale factor", ylabel="accuracy")))
    return charts


@chart_for("StopwordShift")
def stopword_charts(result: dict[str, Any]) -> list[tuple[str, str]]:
    top = result["top_tokens"]
    return [("Top tokens after pruning: probability ratio pruned / original (log scale)",
             bar_chart([repr(t["token"]) for t in top], [_number(t["ratio"]) for t in top], ylabel="ratio",
                       log_y=True))]


@chart_for("PromptInvariance")
def invariance_charts(result: dict[str, Any]) -> list[tuple[str, str]]:
    detections = result["detections"]
    values = [max((abs(_number(sw["activation"])) for sw in d["super_weights"]), default=0.0) for d in detections]
    return [("Super-activation magnitude per prompt", bar_chart(list(range(len(values))), values,
                                                                 xlabel="prompt", ylabel="|super activation|"))]
