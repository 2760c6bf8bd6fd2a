"""CNA checks: rank-all comparisons with known answers, accuracy under neuron masks (replicas) equal to full
teacher forcing, the held-out scoring set of correctly answered problems, seeded controls, and the report."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from lmaudit.checks.arithmetic.checks import (
    CompareParams,
    HeadAblationParams,
    InterventionParams,
    parse_heads,
)
from lmaudit.checks.arithmetic.cna import (
    CnaComparison,
    NeuronDelta,
    ProblemAccuracy,
    compare_scores,
    empirical_p,
    intervention_check,
    prune_to_top,
    scoring_problems,
)
from lmaudit.checks.core.accuracy import arithmetic_accuracy
from lmaudit.checks.core.arithmetic_problems import draw_prompts, generate_problems, problem_key
from lmaudit.checks.core.errors import PremiseMissing
from lmaudit.checks.core.interventions import zero_neurons
from lmaudit.checks.core.loading import LoadedModel
from lmaudit.checks.core.neuron_scores import NeuronScores
from lmaudit.checks.harness.context import AuditContext
from tests.checkpoints import byte_tokenizer
from tests.test_arithmetic_planted import answer_neurons, planted_arithmetic_model
from tests.tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def planted() -> LoadedModel:
    return planted_arithmetic_model()


def _scores(importance: list[float], coefficient: list[float]) -> NeuronScores:
    table = torch.full((2, len(importance)), float("nan"))
    coef = torch.full((2, len(importance)), float("nan"))
    table[1], coef[1] = torch.tensor(importance), torch.tensor(coefficient)
    return NeuronScores("p", "t", 0, coef, table, torch.tensor([float("nan"), 0.0]))


def test_comparison_ranks_every_neuron_and_summarises_the_top_of_a():
    a = _scores([1.0, 0.5, 0.0, -1.0, 0.0], [2.0, -1.0, 0.0, 3.0, 1.0])
    b = _scores([0.5, 0.25, 0.0, 2.0, -4.0], [4.0, -2.0, 0.0, 3.0, 1.0])
    comparison = compare_scores(a, b, k=2, labels=("base", "tuned"))
    assert comparison.top_a == ((1, 0), (1, 1)) and comparison.top_b == ((1, 3), (1, 0))
    # every neuron is ranked by |Δ|: neuron 4 (in neither top list) moved most
    assert [(r.layer, r.neuron) for r in comparison.rows] == [(1, 4), (1, 3), (1, 0), (1, 1), (1, 2)]
    assert comparison.rows[1] == NeuronDelta(1, 3, -1.0, 2.0, 3.0, 3.0)
    metrics = comparison.metrics()
    assert metrics["top_overlap"] == 0.5 and comparison.n_neurons == 5
    assert metrics["importance_retention"] == pytest.approx(0.75 / 1.5)
    assert metrics["coefficient_gain"] == pytest.approx((4.0 + 2.0) / (2.0 + 1.0))  # sign of A's coefficient
    assert metrics["amplified"] == 2 and metrics["amplified_p"] == pytest.approx(0.25)
    assert metrics["max_abs_importance_delta"] == pytest.approx(4.0)
    same = compare_scores(a, a, k=2)
    assert same.importance_spearman == pytest.approx(1.0) and same.amplified == 0 and same.amplified_p == 1.0


def test_empirical_p_counts_ties_as_extreme():
    assert empirical_p(5.0, [0.0] * 20) == pytest.approx(1 / 21)
    assert empirical_p(0.0, [0.0] * 20) == 1.0
    assert empirical_p(1.0, [1.0 + 1e-9, 0.5]) == 2 / 3


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_accuracy_under_neuron_masks_equals_full_teacher_forcing(arch):
    tokenizer = byte_tokenizer()
    loaded = LoadedModel.from_model(tiny_model(arch, seed=3), tokenizer)
    problems = generate_problems(ops="+*", digits=1, n_per_op=4, template="symbolic", few_shot=2, seed=0,
                                 shared_shots=True)
    accuracy = ProblemAccuracy(loaded, problems, 1)
    assert accuracy.baseline.correct == arithmetic_accuracy(loaded.model, tokenizer, problems).correct
    specs = [{1: [1, 2, 3], 2: list(range(40))}, {2: [5]}, {1: list(range(0, 64, 2))}]
    together = accuracy.zeroed_many(specs)
    for spec, result in zip(specs, together, strict=True):
        with zero_neurons(loaded.adapter, spec):
            assert result.correct == arithmetic_accuracy(loaded.model, tokenizer, problems).correct
    with pytest.raises(ValueError, match="below the evaluator's start layer"):
        accuracy.zeroed({0: [1]})


def test_masks_change_the_planted_answers(planted):
    problems = draw_prompts(ops="+-*", digits=[1], templates=["symbolic"], n_per_op=5, few_shot=0, seed=0)
    (last, neurons), = answer_neurons(planted).items()
    accuracy = ProblemAccuracy(planted, problems, last)
    clean, muted, one = accuracy.zeroed_many([{}, {last: neurons}, {last: neurons[:1]}])
    assert clean.accuracy == 1.0 and muted.accuracy == 0.0 and 0.0 < one.accuracy < 1.0  # digit 0's neuron


def test_scoring_keeps_only_correct_answers_and_needs_enough(planted):
    candidates = draw_prompts(ops="+-*/", digits=[1], templates=["symbolic"], n_per_op=6, few_shot=0, seed=1)
    kept = scoring_problems(planted, candidates, per_cell=4, min_prompts=4)
    assert len(kept) == 12 and all(p.op.symbol != "/" for p in kept)  # the planted model cannot divide
    with pytest.raises(PremiseMissing, match="answers correctly"):
        scoring_problems(planted, candidates, per_cell=4, min_prompts=13)


def test_registered_cna_scores_on_held_out_problems(planted):
    import lmaudit.checks.arithmetic.checks as audit

    context = AuditContext(model=planted)
    params = InterventionParams(ops="+-*", templates=["symbolic"], few_shot=0, n_per_op=30, n_score=4, score_pool=20,
                                min_score=8)
    scoring = audit._scoring(context, params)
    evaluated = {problem_key(p) for p in params.evaluated(context)}
    assert len(scoring.problems) == 12 and not evaluated & {problem_key(p) for p in scoring.problems}
    result = audit.check_cna_intervention(context, params)
    assert result.n_scoring_prompts == 12 and result.n_random == 20 and result.normalizer_top_overlap == 1.0
    assert audit._scoring(context, params) is scoring, "the scoring set is a shared session artifact"


def test_intervention_is_seeded_and_draws_other_neurons(planted):
    problems = draw_prompts(ops="+-", digits=[1], templates=["symbolic"], n_per_op=4, few_shot=0, seed=0)
    (last, neurons), = answer_neurons(planted).items()
    importance = torch.full((planted.adapter.n_layers, planted.adapter.intermediate_size), float("nan"))
    importance[last] = 0.0
    importance[last, neurons] = 1.0
    accuracy = ProblemAccuracy(planted, problems, last)
    first = intervention_check(planted, accuracy, importance, k=10, layers=[last], n_random=20, seed=7,
                               n_scoring_prompts=0)
    again = intervention_check(planted, accuracy, importance, k=10, layers=[last], n_random=20, seed=7,
                               n_scoring_prompts=0)
    assert first == again and {n for _, n, _ in first.top} == set(neurons)
    assert first.top_zeroed == 0.0 and first.control_p == pytest.approx(1 / 21)
    assert first.metrics()["control_drop_mean_points"] == 0.0  # the draws exclude the top neurons


@dataclass
class _Recorder:
    """A ProblemAccuracy stand-in that records which neurons each evaluation zeroed."""

    problems: tuple = (None,) * 4
    calls: list | None = None

    @property
    def baseline(self):
        return type("A", (), {"accuracy": 0.5})()

    def zeroed_many(self, specs):
        self.calls = list(specs)
        return [type("A", (), {"accuracy": 0.5 if 0 not in spec[1] else 0.25})() for spec in specs]


def test_pruning_keeps_the_top_neurons_by_the_chosen_ranking():
    loaded = LoadedModel.from_model(tiny_model("llama", seed=0), byte_tokenizer())
    width = loaded.adapter.intermediate_size
    importance = torch.full((3, width), float("nan"))
    importance[1] = torch.linspace(0.0, -1.0, width)
    importance[1, 0], importance[1, 1] = 2.0, -5.0  # the most positive and the most negative neuron
    signed, absolute = _Recorder(), _Recorder()
    result = prune_to_top(loaded, signed, importance, keep=1, layers=[1], n_random=3, seed=0)
    assert set(range(width)) - set(signed.calls[0][1]) == {0} and result.rank_by == "importance"
    prune_to_top(loaded, absolute, importance, keep=1, layers=[1], n_random=3, seed=0, rank_by="abs_importance")
    assert set(range(width)) - set(absolute.calls[0][1]) == {1}
    assert len({tuple(c[1]) for c in signed.calls[1:]}) == 3, "each random draw keeps a different neuron"
    metrics = result.metrics()
    assert metrics["pruned_accuracy"] == 0.5 and metrics["pruned_retention"] == 1.0
    with pytest.raises(ValueError):
        prune_to_top(loaded, signed, importance, keep=1, layers=[1], n_random=3, seed=0, rank_by="size")


def test_parameters_are_validated():
    with pytest.raises(ValueError, match="L<layer>.H<head>"):
        HeadAblationParams(heads=["14.1"])
    with pytest.raises(ValueError, match="ops_b and/or templates_b"):
        CompareParams(condition="prompts")
    with pytest.raises(ValueError):
        InterventionParams(n_random=5)  # a control spread needs at least 20 draws
    assert parse_heads(["L14.H1", "L14.H3", "L5.H0"]) == {14: [1, 3], 5: [0]}


def test_report_renders_every_cna_result(planted):
    import lmaudit.checks.arithmetic.checks as audit
    from lmaudit.reports.charts import render_charts
    from lmaudit.reports.html import environment
    from lmaudit.reports.records import to_jsonable

    context = AuditContext(model=planted)
    common = {"ops": "+-*", "templates": ["symbolic"], "few_shot": 0, "n_per_op": 8, "n_score": 3, "score_pool": 6,
              "min_score": 4}
    sweep = audit.HeadSweepParams(ops="+-*", few_shot=0, n_per_op=4, confirm_per_op=8, confirm_templates=["symbolic"])
    results = [audit.check_cna_intervention(context, audit.InterventionParams(k=5, **common)),
               audit.check_cna_pruning(context, audit.PruningParams(keep_fraction=0.02, **common)),
               audit.check_cna_head_ablation(context, audit.HeadAblationParams(k=5, sweep=sweep, **common))]
    env = environment()
    for result in results:
        name = type(result).__name__
        data = to_jsonable(result)
        assert [c.error for c in render_charts(name, data)] == [""]
        html = env.get_template(f"sections/{name}.html.j2").render(record=None, result=data)
        assert "<table" in html or "<p>" in html
    assert "control heads" in env.get_template("sections/HeadAblationComparison.html.j2").render(
        record=None, result=to_jsonable(results[2]))


def test_report_table_shows_the_logit_lens_escaped():
    from lmaudit.reports.html import environment
    from lmaudit.reports.records import to_jsonable

    rows = (NeuronDelta(3, 7, 0.5, 0.1, 1.0, 2.0, ("<script>x", " 8"), ("&amp",)),)
    comparison = CnaComparison("base", "tuned", "1+1=", "1+1=", 1, ((3, 7),), ((3, 7),), rows, 10, "finetune",
                               importance_retention=0.2, coefficient_gain=2.0, amplified=1,
                               max_abs_importance_delta=0.4, importance_spearman=0.5, n_prompts=4)
    html = environment().get_template("sections/CnaComparison.html.j2").render(
        record=None, result=to_jsonable(comparison))
    assert "<script>" not in html and "&lt;script&gt;x" in html and "&amp;amp" in html
    assert "␣8" in html and "finetune" in html and "averaged over 4 prompts" in html
    assert html.count("<tr>") == 2 and "1 of A's top 1" in html


def test_control_heads_come_from_a_bounded_screen(planted):
    """Division is beyond the planted model, so the screen is bounded and most heads skip the wrong answers:
    they are still controls (they broke no correct answer)."""
    import lmaudit.checks.arithmetic.checks as audit

    sweep = audit.HeadSweepParams(ops="+-*/", few_shot=0, n_per_op=4, confirm_per_op=8, confirm_templates=["symbolic"])
    params = audit.HeadAblationParams(ops="+-*", templates=["symbolic"], few_shot=0, n_per_op=8, n_score=3,
                                      score_pool=6, min_score=4, k=5, sweep=sweep, heads=["L0.H1"])
    context = AuditContext(model=planted)
    result = audit.check_cna_head_ablation(context, params)
    _, screen = audit._screen(context, sweep)
    assert not all(all(row) for row in screen.exact), "the screen skipped some wrong answers"
    assert result.n_controls == 20 and result.importance_retention < result.control_retention_lower


def test_a_control_spread_is_reported_as_four_named_metrics():
    from lmaudit.checks.core.stats import Spread

    spread = Spread.of([1.0, 2.0, 6.0])
    assert Spread.metric_names("control_{}_accuracy") == (
        "control_mean_accuracy", "control_std_accuracy", "control_min_accuracy", "control_max_accuracy")
    assert spread.metrics("c_{}") == {"c_mean": 3.0, "c_std": spread.std, "c_min": 1.0, "c_max": 6.0}
    assert abs(spread.std - 2.6457513) < 1e-6  # the sample standard deviation of 1, 2, 6
