"""Every gate of ``audits/arithmetic.yaml`` can fail: each registered check runs through its function on a tiny
model, once on the planted arithmetic model where the paper's claim holds by construction (the gate passes) and
once on a model or intervention where it does not (the gate fails). Thresholds and parameters are read from the
audit file itself; only the problem set is shrunk to what the planted model solves (zero-shot 1-digit + - *).
Each counter-example names the gates it fails in its marker (tests/test_gates.py checks that none is missing)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from lmaudit.checks.catalog import load_checks
from lmaudit.checks.core.loading import LoadedModel
from lmaudit.checks.harness.audit_file import parse_audit_file
from lmaudit.checks.harness.context import AuditContext
from lmaudit.checks.harness.thresholds import compare
from tests.test_arithmetic_planted import answer_neurons, planted_arithmetic_model

pytestmark = pytest.mark.usefixtures("one_thread")

load_checks()  # the registry the audit file names its checks in
AUDITS = {a.entry.name: a for a in parse_audit_file(Path(__file__).parents[1] / "audits" / "arithmetic.yaml")}
PLANTED = {"ops": "+-*", "templates": ["symbolic"], "few_shot": 0}  # what the planted model answers
SIZES = {"arithmetic_head_sweep": {"n_per_op": 6, "confirm_per_op": 12, "confirm_templates": ["symbolic"]},
         "default": {"n_per_op": 16, "n_score": 4, "score_pool": 8, "min_score": 8}}


def run(entry: str, loaded: LoadedModel, *, context: AuditContext | None = None, **overrides: object) -> dict:
    """The registered check of ``entry`` with the audit file's full-profile parameters, shrunk to the planted
    problems; returns ``{metric: passed}`` for the entry's gates (and the result under ``"result"``)."""
    audit = AUDITS[entry]
    resolved = audit.resolve("full")
    sizes = SIZES.get(audit.spec.name, SIZES["default"])
    fields = type(resolved.params).model_fields
    update = {k: v for k, v in {**PLANTED, **sizes}.items() if k in fields}
    if "sweep" in fields:
        update["sweep"] = resolved.params.sweep.model_copy(update={**PLANTED, **SIZES["arithmetic_head_sweep"]})
    params = resolved.params.model_copy(update={**update, **overrides})
    result = audit.spec.run(context or AuditContext(model=loaded), type(params).model_validate(params.model_dump()))
    metrics = result.metrics()
    out = {metric: compare(metric, metrics[metric], threshold).passed for metric, threshold in resolved.expect.items()}
    return {**out, "result": result}


@pytest.fixture(scope="module")
def planted() -> LoadedModel:
    return planted_arithmetic_model()


@pytest.fixture(scope="module")
def session(planted) -> AuditContext:
    """One audit session on the planted model: the head sweep's artifacts are shared, as in a real run."""
    return AuditContext(model=planted)


# ------------------------------------------------------------------------------------------------ gates


@pytest.mark.counterexample("arithmetic_baseline_accuracy.accuracy")
def test_baseline_accuracy_fails_on_a_model_that_cannot_add(planted):
    """The planted model with its answer neurons' writes removed never writes a digit: accuracy 0 (the planted
    model itself passes)."""
    assert run("arithmetic_baseline_accuracy", planted)["accuracy"]
    mute = planted_arithmetic_model()  # the same model with its answer neurons' writes removed: never a digit
    adapter = mute.adapter
    with torch.no_grad():
        for layer, neurons in answer_neurons(mute).items():
            adapter.weight(adapter.down_proj(layer))[:, neurons] = 0.0
    outcome = run("arithmetic_baseline_accuracy", mute)
    assert not outcome["accuracy"] and outcome["result"].accuracy == 0.0


def test_head_sweep_finds_the_planted_operand_heads(planted, session):
    outcome = run("arithmetic_few_heads_are_critical", planted, context=session)
    assert outcome["n_significant"] and outcome["significant_fraction"]
    assert outcome["result"].significant_heads == ["L0.H0", "L0.H1", "L0.H2"]


@pytest.mark.counterexample("arithmetic_few_heads_are_critical.n_significant")
def test_no_significant_head_when_every_operand_has_a_redundant_copy():
    """Two heads copy each operand and either copy suffices: ablating one head breaks nothing."""
    model = planted_arithmetic_model(heads_per_operand=2, redundant=True)
    outcome = run("arithmetic_few_heads_are_critical", model)
    assert not outcome["n_significant"] and outcome["result"].n_significant == 0


@pytest.mark.counterexample("arithmetic_few_heads_are_critical.significant_fraction")
def test_significant_fraction_fails_when_many_heads_are_critical():
    """Each operand split over two heads that are both needed: 6 of 80 heads (7.5 %) are critical."""
    model = planted_arithmetic_model(heads_per_operand=2)
    outcome = run("arithmetic_few_heads_are_critical", model)
    assert outcome["n_significant"] and not outcome["significant_fraction"]
    assert outcome["result"].n_significant == 6


def test_cna_top_neurons_matter_on_the_planted_answer_neurons(planted):
    outcome = run("arithmetic_cna_top_neurons_matter", planted)
    assert outcome["control_p"] and outcome["top_drop_over_control_upper_points"]
    top = {(layer, n) for layer, n, _ in outcome["result"].top}
    (last, neurons), = answer_neurons(planted).items()
    assert top & {(last, n) for n in neurons}, "the planted answer neurons rank on top"


@pytest.mark.counterexample("arithmetic_cna_top_neurons_matter.control_p",
                             "arithmetic_cna_top_neurons_matter.top_drop_over_control_upper_points")
def test_cna_intervention_fails_when_the_answer_is_spread_over_many_neurons():
    """50 neurons per digit, each a fiftieth of the answer: zeroing the top 20 costs nothing."""
    model = planted_arithmetic_model(neurons_per_digit=50)
    outcome = run("arithmetic_cna_top_neurons_matter", model)
    assert not outcome["control_p"] and not outcome["top_drop_over_control_upper_points"]


def test_cna_pruning_keeps_the_planted_answer_neurons(planted):
    outcome = run("arithmetic_cna_pruning_keeps_accuracy", planted)
    assert outcome["control_p"] and outcome["pruned_over_control_upper_points"]


@pytest.mark.counterexample("arithmetic_cna_pruning_keeps_accuracy.control_p",
                             "arithmetic_cna_pruning_keeps_accuracy.pruned_over_control_upper_points")
def test_cna_pruning_fails_when_the_answer_is_spread_over_many_neurons():
    """Any tenth of 500 spread answer neurons carries the answer: the top ones are no better than random."""
    model = planted_arithmetic_model(neurons_per_digit=50)
    outcome = run("arithmetic_cna_pruning_keeps_accuracy", model)
    assert not outcome["control_p"] and not outcome["pruned_over_control_upper_points"]


def test_head_ablation_weakens_the_answer_neurons_specifically(planted, session):
    outcome = run("arithmetic_cna_head_ablation_weakens_answer_neurons", planted, context=session)
    assert outcome["control_p"] and outcome["retention_margin"]
    assert outcome["result"].importance_retention < 0.5


@pytest.mark.counterexample("arithmetic_cna_head_ablation_weakens_answer_neurons.control_p",
                             "arithmetic_cna_head_ablation_weakens_answer_neurons.retention_margin")
def test_head_ablation_fails_for_a_head_that_does_not_matter(planted, session):
    """Ablating a head without any effect (a zero head of layer 3) is what the controls do: no margin, p = 1."""
    outcome = run("arithmetic_cna_head_ablation_weakens_answer_neurons", planted, context=session, heads=["L3.H5"])
    assert not outcome["control_p"] and not outcome["retention_margin"]


def _scaled_answer_neurons(model: LoadedModel, factor: float) -> LoadedModel:
    """A "fine-tune" of ``model`` whose answer neurons fire ``factor`` times as much (their input weights scaled)."""
    other = planted_arithmetic_model()
    adapter = other.adapter
    with torch.no_grad():
        for layer, neurons in answer_neurons(other).items():
            adapter.weight(adapter.layer(layer).up_proj)[neurons] *= factor
    return dataclasses.replace(other, spec=f"answer neurons x{factor}")


def _finetune_context(model: LoadedModel, tuned: LoadedModel) -> AuditContext:
    return AuditContext(model=model, compare_model_spec=tuned.spec, load=lambda spec: tuned)


def test_finetune_that_amplifies_the_answer_neurons_passes(planted):
    outcome = run("arithmetic_cna_finetune_amplifies_answer_neurons", planted,
                  context=_finetune_context(planted, _scaled_answer_neurons(planted, 2.0)))
    assert outcome["coefficient_gain"] and outcome["amplified_p"]


@pytest.mark.counterexample("arithmetic_cna_finetune_amplifies_answer_neurons.coefficient_gain",  # factor 0.5
                             "arithmetic_cna_finetune_amplifies_answer_neurons.amplified_p")
@pytest.mark.parametrize("factor", [0.5, 1.0])
def test_finetune_gate_fails_when_the_answer_neurons_shrink_or_stay(planted, factor):
    """Halved answer neurons: gain 0.5; an unchanged model (a no-op fine-tune): no neuron amplified."""
    outcome = run("arithmetic_cna_finetune_amplifies_answer_neurons", planted,
                  context=_finetune_context(planted, _scaled_answer_neurons(planted, factor)))
    assert not outcome["amplified_p"]
    assert outcome["coefficient_gain"] is (factor >= 1.0)


def test_shared_answer_neurons_across_operations(planted):
    outcome = run("arithmetic_cna_templates_share_answer_neurons", planted, templates_a=None, templates_b=None,
                  ops_a="+", ops_b="-", n_score=16, score_pool=24)
    assert outcome["top_overlap"]


@pytest.mark.counterexample("arithmetic_cna_templates_share_answer_neurons.top_overlap")
def test_top_overlap_fails_when_each_prompt_form_has_its_own_answer_neurons():
    """Each operation has its own answer neurons, so "+" and "-" prompts share none of their top neurons (the
    planted model reads only the symbolic form, so the two forms compared here are two operations)."""
    model = planted_arithmetic_model(per_op_answers=True)
    outcome = run("arithmetic_cna_templates_share_answer_neurons", model, templates_a=None, templates_b=None,
                  ops_a="+", ops_b="-", n_score=16, score_pool=24)
    assert not outcome["top_overlap"] and outcome["result"].top_overlap == 0.0


def test_a_model_that_answers_nothing_skips_every_mechanism_entry():
    """Premise missing, not a pass or a failure: no correct answer, nothing to ablate or to rank."""
    from lmaudit.checks.core.errors import PremiseMissing

    mute = planted_arithmetic_model()
    adapter = mute.adapter
    with torch.no_grad():
        for layer, neurons in answer_neurons(mute).items():
            adapter.weight(adapter.down_proj(layer))[:, neurons] = 0.0
    context = AuditContext(model=mute)
    for name in AUDITS:
        if name == "arithmetic_baseline_accuracy":
            continue
        with pytest.raises(PremiseMissing):
            run(name, mute, context=context)
