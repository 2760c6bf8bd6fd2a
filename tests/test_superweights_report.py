"""The super-weight results render in the HTML report: every section partial and chart, on results measured on
tiny planted models (one with a late canceller, so the massive-activation table is filled)."""

from __future__ import annotations

import pytest

from lmaudit.checks.core.corpora import Corpus
from lmaudit.checks.superweights.detect import SuperWeightDirectory, detect
from lmaudit.checks.superweights.impact import superweight_impact
from lmaudit.checks.superweights.invariance import finetune_invariance, prompt_invariance
from lmaudit.checks.superweights.scaling import superweight_scaling
from lmaudit.checks.superweights.stopwords import stopword_shift
from lmaudit.reports.html import render_html
from lmaudit.reports.records import AuditRecord, RunInfo, to_jsonable
from tests.test_superweights import deeper, loaded, plant_canceller, plant_super_weight, planted_llama

pytestmark = pytest.mark.usefixtures("one_thread")
CORPUS = Corpus("tiny", "Bytes of a small corpus for the report test, repeated. " * 40, "test")


def record(name: str, result: object) -> AuditRecord:
    return AuditRecord(nodeid=f"audits/superweights.yaml::{name}", name=name, source="audits/superweights.yaml",
                       status="passed", check=name, area="superweights", metrics=dict(to_jsonable(result.metrics())),
                       result=to_jsonable(result), result_type=type(result).__name__)


def test_superweight_sections_and_charts_render() -> None:
    model = deeper("llama", 5)
    plant_super_weight(model, layer=1, row=5, col=17)
    plant_canceller(model, layer=3, row=5, col=21, source_layer=1)
    canceller = loaded(model, "canceller")
    found = detect(canceller)
    planted = loaded(planted_llama())
    base = detect(planted, "plant")
    results = {
        "superweights": SuperWeightDirectory(found),
        "prompts": prompt_invariance(planted, base, ["a", "12+3", "?!"]),
        "finetune": finetune_invariance(planted, base, planted, source="compare-model"),
        "impact": superweight_impact(canceller, found, CORPUS, seq_len=32, n_windows=2),
        "stopwords": stopword_shift(canceller, found, CORPUS, n_prompts=4, prompt_tokens=8),
        "scaling": superweight_scaling(canceller, found, CORPUS, scales=[0.0, 1.0, 2.0], seq_len=32, n_windows=2),
    }
    html = render_html([record(name, result) for name, result in results.items()], RunInfo())
    assert "section template for" not in html and "chart failed" not in html.lower() and " raised " not in html
    assert "Massive activations ruled out by the causal test" in html and "writes against" not in html
    assert "L1[5, 17]" in html and "zeroing it removed the spike" in html  # the canceller's reason
    assert "Causal tests" in html and "distinct first tokens" in html and "prune_sw_restore" in html
    assert "Probability mass on the" in html and "multiplied by" in html and "Compared model" in html
