"""Every gate of audits/quantization.yaml can fail: for each threshold, a model or an intervention on which the
registered check, run through its function on the tiny planted model, misses it; and the planted model itself,
which has a super weight that the naive schemes trip over, meets every gate.

The gates are read from the audit file itself (entry, metric, threshold as written there); only the amount of
text and the block sizes are scaled to the tiny model (:func:`tiny_params`). The planted model and its corpora
come from tests/test_quantization_audit.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import lmaudit.checks.quantization.checks  # noqa: F401  (registers the checks the audit file names)
from lmaudit.checks.core.interventions import edit_down_proj_weights, transform_weights, zero_neurons
from lmaudit.checks.core.outliers import SuperActivation, SuperWeightSites
from lmaudit.checks.harness.audit_file import ParsedAudit, parse_audit_file
from lmaudit.checks.harness.registry import CheckParams
from lmaudit.checks.harness.thresholds import Comparison, compare
from tests.test_quantization_audit import (
    BLOCK,
    COL,
    LAYER,
    ROW,
    SMALL,
    audit_context,
    planted_model,
    write_corpora,
)

pytestmark = pytest.mark.usefixtures("one_thread")

AUDIT_FILE = Path(__file__).resolve().parent.parent / "audits" / "quantization.yaml"
AUDITS = {audit.entry.name: audit for audit in parse_audit_file(AUDIT_FILE)}
GATES = [(name, metric) for name, audit in AUDITS.items() for metric in audit.resolve("full").expect]
TINY_BLOCKS = (16, 64, 256, BLOCK)  # the tiny model's sweep: its weights have 1024 or 2048 elements

# A random small weight of another layer where the super weight should be: what holding out "the super weight"
# does when the detection points at the wrong place.
WRONG_SITES = SuperWeightSites(((0, 9, 40),), (SuperActivation(0, 0, 9, 0.1),), "a random small weight")


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    return write_corpora(tmp_path_factory.mktemp("quant-corpora"))


def tiny_params(audit: ParsedAudit, corpus_dir: Path) -> CheckParams:
    """The entry's full-profile parameters with the amount of text and the block sizes scaled to the tiny model."""
    params = audit.resolve("full").params
    update: dict[str, object] = {**{k: v for k, v in SMALL.items() if k != "z_candidates"},
                                 "corpora": (str(corpus_dir / "alpha.txt"), str(corpus_dir / "beta.txt"))}
    if "block_size" in type(params).model_fields:
        update["block_size"] = BLOCK
    if "block_sizes" in type(params).model_fields:
        update["block_sizes"] = TINY_BLOCKS
    return params.model_copy(update=update)


def gate(name: str, metric: str, corpus_dir: Path, sites: SuperWeightSites | None = None) -> Comparison:
    """Run the entry's registered check on the planted model (with ``sites`` standing in for the detection) and
    compare its metric with the audit file's threshold."""
    audit = AUDITS[name]
    context = audit_context(corpus_dir) if sites is None else audit_context(corpus_dir, sites=sites)
    result = audit.spec.run(context, tiny_params(audit, corpus_dir))
    return compare(metric, result.metrics()[metric], audit.resolve("full").expect[metric])


@contextmanager
def outliers_removed() -> Iterator[None]:
    """Intervention: the planted super weight set to 0 and its neuron's activation zeroed (so neither the weight
    outlier nor the activation outlier exists), while the detection still points at them."""
    adapter = planted_model().adapter
    with edit_down_proj_weights(adapter, [(LAYER, ROW, COL)], value=0.0), zero_neurons(adapter, {LAYER: [COL]}):
        yield


@contextmanager
def binarized() -> Iterator[None]:
    """Intervention: every decoder weight replaced by sign(w)·mean|w| of its matrix. Two values per matrix lie on
    every 4-bit grid, so RTN at any block size reproduces the weights: nothing grows with B."""
    linears = planted_model().adapter.decoder_linears()
    with transform_weights(linears, lambda w, out: out.copy_(torch.sign(w) * w.abs().mean())):
        yield


# The markers of the two parametrised counter-examples: each names the gates it makes fail (tests/test_gates.py
# checks that every gate of the audit files has a counter-example), and the test runs once per gate it names.
HOLDS_OUT_A_RANDOM_WEIGHT = pytest.mark.counterexample(
    "w8a8_per_tensor_super_activation_handling_recovers_loss.recovery",
    "w8a8_per_token_super_outlier_handling_recovers_loss.recovery",
    "w4_block_super_weight_hold_out_recovers_loss.hold_out_recovery",
)
HAS_NO_OUTLIERS = pytest.mark.counterexample(
    "w8a8_per_tensor_super_activation_handling_recovers_loss.recovery",
    "w8a8_per_token_super_outlier_handling_recovers_loss.recovery",
    "w4_block_paper_method_recovers_loss.recovery",
    "w4_block_super_weight_hold_out_recovers_loss.hold_out_recovery",
    "w4_block_size_scaling.growth_recovery",
)


def each_gate_of(mark: pytest.MarkDecorator) -> list[object]:
    """``(entry, metric)`` parameters, one per gate the counterexample marker names."""
    return [pytest.param(*name.rsplit(".", 1), id=name) for name in mark.args]


@pytest.mark.parametrize(("name", "metric"), GATES, ids=[f"{n}.{m}" for n, m in GATES])
def test_the_planted_model_meets_every_gate(name, metric, corpus_dir):
    """The gates are satisfiable: a model whose super weight really is what naive RTN trips over meets them."""
    comparison = gate(name, metric, corpus_dir)
    assert comparison.passed, comparison.failure_line()


@HOLDS_OUT_A_RANDOM_WEIGHT
@pytest.mark.parametrize(("name", "metric"), each_gate_of(HOLDS_OUT_A_RANDOM_WEIGHT))
def test_holding_out_a_random_small_weight_recovers_nothing(name, metric, corpus_dir):
    """The detection points at a random small weight instead of the super weight: holding that one out leaves the
    naive damage as it is (recovery ≈ 0), so the recovery gates fail. (The paper's W4 method still recovers here,
    through its clipping, which caps the super weight like any other outlier on this model.)"""
    comparison = gate(name, metric, corpus_dir, sites=WRONG_SITES)
    assert not comparison.passed and abs(comparison.measured) < 0.01, comparison


@HAS_NO_OUTLIERS
@pytest.mark.parametrize(("name", "metric"), each_gate_of(HAS_NO_OUTLIERS))
def test_a_model_without_outliers_has_nothing_to_recover(name, metric, corpus_dir):
    """The super weight and its activation are removed while the detection still names them: nothing is left to
    recover. Naive RTN still loses a little (ordinary rounding error), and neither holding the named weight out
    nor clipping at the calibrated z recovers a tenth of it (measured 0.0 for every gate: the z search keeps
    z = inf, and the held-out entries are zeros that set no scale)."""
    with outliers_removed():
        comparison = gate(name, metric, corpus_dir)
    assert not comparison.passed, comparison


@pytest.mark.counterexample("w4_block_size_scaling.naive_spearman")
def test_weights_that_every_block_size_reproduces_show_no_trend(corpus_dir):
    """Binarized weights lie on every block's 4-bit grid: naive RTN is exact at every B, its perplexity does not
    grow with the block size, and Spearman ρ is undefined (NaN) or low, so the trend gate fails."""
    with binarized():
        comparison = gate("w4_block_size_scaling", "naive_spearman", corpus_dir)
    assert not comparison.passed, comparison


def test_counterexamples_leave_the_model_as_it_was(corpus_dir):
    model = planted_model().model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with outliers_removed(), binarized():
        pass
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
