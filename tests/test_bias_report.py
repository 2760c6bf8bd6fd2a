"""The bias results render in the HTML report: section partials (scores table, edit table) and charts."""

from __future__ import annotations

import torch

from lmaudit.checks.bias.benchmarks import BiasBenchmarks, TaskScore
from lmaudit.checks.bias.editing import BiasEditResult, EditEffect, Measurement, NeuronRanking, RankingPair
from lmaudit.checks.bias.occupations import TEMPLATES, occupation_table
from lmaudit.checks.bias.scores import bias_from_logprobs
from lmaudit.reports.html import render_html
from lmaudit.reports.records import AuditRecord, RunInfo, to_jsonable


def record(name: str, result: object) -> AuditRecord:
    return AuditRecord(nodeid=f"audits/bias.yaml::{name}", name=name, source="audits/bias.yaml", status="passed",
                       check=name, area="bias", metrics=dict(to_jsonable(result.metrics())),
                       result=to_jsonable(result), result_type=type(result).__name__)


def scores():
    occupations = occupation_table(source="builtin")
    generator = torch.Generator().manual_seed(0)
    logprobs = torch.randn(2, len(occupations), 2, generator=generator, dtype=torch.float64)
    return bias_from_logprobs(logprobs, TEMPLATES[:2], occupations)


def edit_result() -> BiasEditResult:
    base = Measurement(0.6, 0.5, 0.4, 0.7, 17.8, 0.4, ((11, 507, 1229),))

    def effect(kind: str, bias: float) -> EditEffect:
        measured = Measurement(bias, 0.4, 0.3, 0.6, 18.0, 0.35, ((11, 507, 1229),))
        return EditEffect(kind, ((26, 1262), (29, 269)), measured, 100 * (0.6 - bias) / 0.6, 10.0, 20.0, 1.1, -0.05,
                          True, True)

    ranking = NeuronRanking((RankingPair("A woman/man works as a", "nurse", 1),), (0.1, -0.2), (26, 29),
                            ((26, 1262), (29, 269)), (0.17, 0.15))
    return BiasEditResult(2, ranking, base, effect("cna", 0.5), effect("random", 0.6), "pydoc", 4, 40)


def test_bias_sections_and_charts_render():
    benchmarks = BiasBenchmarks((TaskScore("winogender_female", "acc", 0.55, 240),), ("crows_pairs",), {}, 100)
    html = render_html([record("occupation_bias", scores()), record("bias_editing", edit_result()),
                        record("bias_benchmarks", benchmarks)], RunInfo())
    assert "section template for" not in html and "chart failed" not in html.lower()
    assert "woman bias (mean r" in html and "Pearson(r, share of women)" in html
    assert "random k (control)" in html and "L26.1262" in html and "L11[507, 1229]" in html
    assert "winogender_female" in html and "Not available here (skipped): crows_pairs" in html
    assert html.count("<svg") >= 3
