"""The bias results render in the HTML report: section partials (scores, edit, benchmarks) and charts."""

from __future__ import annotations

import torch

from lmaudit.checks.bias.benchmarks import BiasBenchmarks, PairCounts, TaskScore
from lmaudit.checks.bias.editing import BiasEditResult, DataSplit, NeuronRanking, RankingPair, SideEffects
from lmaudit.checks.bias.occupations import TEMPLATES, occupation_table
from lmaudit.checks.bias.scores import BiasStatistics, bias_from_logprobs
from lmaudit.checks.core.stats import Spread
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
    return bias_from_logprobs(logprobs, TEMPLATES[:2], occupations, n_permutations=500)


def edit_result() -> BiasEditResult:
    base, edited = BiasStatistics(0.5, 0.4, 0.6, 0.7), BiasStatistics(0.2, 0.3, 0.3, 0.5)
    ranking = NeuronRanking((RankingPair(TEMPLATES[1].text, "nurse", 1), RankingPair(TEMPLATES[1].text, "plumber", -1)),
                            (0.1, -0.2), (26, 29), ((26, 1262), (29, 269)), (0.17, 0.15))
    split = DataSplit((TEMPLATES[1].text,), (TEMPLATES[0].text,), ("nurse", "plumber"), ("teacher", "chef"))
    reductions = (1.0, -2.0, 3.0)
    effects = SideEffects("pydoc", 256, 4, 26, 17.8, 18.4, 40, 0.4, 0.35)
    return BiasEditResult(split, ranking, base, edited, base, BiasStatistics(0.1, 0.1, 0.1, 0.2), reductions,
                          (3000, 3001, 3002), Spread.of(reductions), 1.645, effects, 0.76, 1e-4, k=2)


def test_bias_sections_and_charts_render():
    benchmarks = BiasBenchmarks((TaskScore("winobias_pro", "acc", 0.55, 100),), ("crows_pairs",), {}, 0.25,
                                winobias_pairs=PairCounts(100, 40, 12, 8, 40))
    html = render_html([record("occupation_bias", scores()), record("bias_editing", edit_result()),
                        record("bias_benchmarks", benchmarks)], RunInfo())
    assert "section template for" not in html and "chart failed" not in html.lower()
    assert "woman bias (mean r" in html and "permutation p" in html
    assert "CNA reduction beyond that bound" in html and "L26.1262" in html and "in-sample (ranking)" in html
    assert "Evaluation occupations: teacher, chef" in html and "one-digit additions" in html
    assert "only the pro-stereotyped one 12" in html and "Not available here (skipped): crows_pairs" in html
    assert html.count("<svg") >= 3
