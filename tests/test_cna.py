"""CNA comparisons, the intervention/pruning checks and the start-layer evaluator, on tiny models with a planted
answer neuron; the registered comparison check end to end; the report's neuron table."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from lmaudit.checks.arithmetic.checks import CompareParams, check_cna_compare, parse_heads
from lmaudit.checks.arithmetic.cna import (
    CnaComparison,
    NeuronDelta,
    ProblemAccuracy,
    StartLayerEvaluator,
    compare_head_ablated,
    compare_models,
    compare_prompts,
    compare_scores,
    intervention_check,
    prune_to_top,
)
from lmaudit.checks.core.accuracy import arithmetic_accuracy, teacher_forced_correct
from lmaudit.checks.core.adapter import adapter_for
from lmaudit.checks.core.arithmetic_problems import generate_problems
from lmaudit.checks.core.interventions import zero_neurons
from lmaudit.checks.core.loading import LoadedModel
from lmaudit.checks.core.neuron_scores import NeuronScores, neuron_scores
from lmaudit.checks.harness.context import AuditContext
from tests.checkpoints import byte_tokenizer
from tests.test_head_sweep import QUERIES, self_consistent_task
from tests.test_neuron_scores import plant_answer_neuron
from tests.tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def test_base_vs_planted_model_puts_the_planted_neuron_first(tokenizer):
    base = tiny_model("llama", seed=1)
    planted = copy.deepcopy(base)
    plant_answer_neuron(planted, tokenizer, "12+34=", "4", layer=1, neuron=9)
    comparison = compare_models(planted, base, tokenizer, "12+34=", "4", k=5, lens=True)
    assert (comparison.rows[0].layer, comparison.rows[0].neuron) == (1, 9)
    assert comparison.rows[0].importance_delta < -0.2  # B (the base model) lacks the planted neuron
    assert comparison.top_a[0] == (1, 9) and comparison.metrics()["top_neuron_a"] == "L1.N9"
    assert comparison.rows[0].promotes[0] == "4"  # the logit lens of the planted neuron (model A) reads the target
    assert comparison.metrics()["importance_retention"] < 0.5


def test_head_ablation_comparison_leaves_the_model_untouched(tokenizer):
    model = tiny_model("llama", seed=2)
    before = neuron_scores(model, tokenizer, "7*8=", "5")
    comparison = compare_head_ablated(model, tokenizer, "7*8=", "5", {0: [1, 3]}, k=4)
    after = neuron_scores(model, tokenizer, "7*8=", "5")
    assert torch.equal(before.importance, after.importance)
    assert comparison.label_b == "ablated L0.H1, L0.H3" and comparison.rows
    assert comparison.metrics()["max_abs_importance_delta"] > 0
    # scoring both conditions in one pass over U (concatenated states) equals scoring them apart
    again = compare_head_ablated(model, tokenizer, "7*8=", "5", {0: [1, 3]}, k=4, original=before)
    assert [(r.layer, r.neuron) for r in again.rows] == [(r.layer, r.neuron) for r in comparison.rows]
    for x, y in zip(again.rows, comparison.rows, strict=True):
        assert x.importance_b == pytest.approx(y.importance_b, abs=1e-5)
    same = compare_prompts(model, tokenizer, "7*8=", "5", "7*8=", "5", k=4)
    assert same.overlap == 1.0 and same.metrics()["max_abs_importance_delta"] < 1e-5  # batch rounding only
    averaged = compare_prompts(model, tokenizer, ["7*8=", "1+2="], ["5", "3"], ["7*8=", "1+2="], ["5", "3"], k=4)
    assert averaged.n_prompts == 2 and averaged.overlap == 1.0 and "mean over 2 prompts" in averaged.prompt_a


def _scores(importance: list[float], coefficient: list[float]) -> NeuronScores:
    table = torch.full((2, len(importance)), float("nan"))
    coef = torch.full((2, len(importance)), float("nan"))
    table[1], coef[1] = torch.tensor(importance), torch.tensor(coefficient)
    return NeuronScores("p", "t", 0, coef, table, torch.tensor([float("nan"), 0.0]))


def test_comparison_summaries_are_known_answers():
    a = _scores([1.0, 0.5, 0.0, -1.0], [2.0, -1.0, 0.0, 3.0])
    b = _scores([0.5, 0.25, 0.0, 2.0], [4.0, -2.0, 0.0, 3.0])
    comparison = compare_scores(a, b, k=2, labels=("base", "tuned"))
    assert comparison.top_a == ((1, 0), (1, 1)) and comparison.top_b == ((1, 3), (1, 0))
    metrics = comparison.metrics()
    assert metrics["top_overlap"] == 0.5
    assert metrics["importance_retention"] == pytest.approx(0.75 / 1.5)
    assert metrics["coefficient_gain"] == pytest.approx((4.0 + 2.0) / (2.0 + 1.0))  # sign of A's coefficient
    assert metrics["max_abs_importance_delta"] == pytest.approx(3.0)
    assert comparison.rows[0] == NeuronDelta(1, 3, -1.0, 2.0, 3.0, 3.0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_start_layer_evaluator_equals_full_teacher_forcing(tokenizer, arch):
    """Clean prefix cache + clean states below the start layer reused: same correctness as full passes."""
    model = tiny_model(arch, seed=4)
    adapter = adapter_for(model)
    encoded = self_consistent_task(model, tokenizer, QUERIES, n_answer=3)
    groups = [i % 2 for i in range(len(encoded))]
    broken = 0
    for start in (0, 1):
        evaluator = StartLayerEvaluator(model, tokenizer, encoded, start, groups=groups, stop_check=False)
        assert bool(evaluator.baseline.all())
        for spec in ({1: list(range(0, 64, 2))}, {2: list(range(1, 64, 2))}, {1: [5], 2: [6, 7]}):
            with zero_neurons(adapter, spec):
                expected = teacher_forced_correct(model, tokenizer, encoded, stop_check=False)
                assert torch.equal(evaluator.correct(), expected)
            broken += int((~expected).sum())
        assert torch.equal(evaluator.correct(), evaluator.baseline)  # nothing active: the clean answers again
    assert broken, "some zeroing must break an answer for this to test anything"


def test_problem_accuracy_matches_arithmetic_accuracy_and_guards_its_start(tokenizer):
    model = tiny_model("llama", seed=3)
    problems = generate_problems(ops="+*", digits=1, n_per_op=3, template="symbolic", few_shot=2, seed=0,
                                 shared_shots=True)
    accuracy = ProblemAccuracy(model, tokenizer, problems, 1)
    assert accuracy.baseline == arithmetic_accuracy(model, tokenizer, problems)
    spec = {1: [1, 2, 3], 2: list(range(40))}
    with zero_neurons(adapter_for(model), spec):
        assert accuracy.zeroed(spec).correct == arithmetic_accuracy(model, tokenizer, problems).correct
    with pytest.raises(ValueError, match="below the evaluator's start layer"):
        accuracy.zeroed({0: [1]})


def test_intervention_check_ranks_the_planted_neuron_and_is_seeded(tokenizer):
    model = tiny_model("llama", seed=3)
    problems = generate_problems(ops="+", digits=1, n_per_op=4, template="symbolic", seed=0)
    for problem in problems[:1]:
        plant_answer_neuron(model, tokenizer, problem.prompt, problem.answer, layer=2, neuron=5)
    first = intervention_check(model, tokenizer, problems[:1], k=1, layers=[1, 2], n_random=2, seed=7)
    again = intervention_check(model, tokenizer, problems[:1], k=1, layers=[1, 2], n_random=2, seed=7)
    assert first.top[0][:2] == (2, 5)
    assert first == again and first.n_prompts == 1 and len(first.random_zeroed) == 2
    metrics = first.metrics()
    assert metrics["top_minus_worst_random_points"] == pytest.approx(
        100 * (min(first.random_zeroed) - first.top_zeroed))


@dataclass
class _Recorder:
    """A ProblemAccuracy stand-in that records which neurons each evaluation zeroed."""

    problems: tuple = (None,) * 4
    calls: list | None = None

    @property
    def baseline(self):
        return type("A", (), {"accuracy": 0.5})()

    def zeroed(self, spec):
        self.calls = (self.calls or []) + [spec]
        return type("A", (), {"accuracy": 0.5 if 0 not in spec[1] else 0.25})()  # neuron 0 carries the answers


def test_pruning_keeps_the_top_neurons_by_the_chosen_ranking():
    model = tiny_model("llama", seed=0)
    width = adapter_for(model).intermediate_size
    importance = torch.full((3, width), float("nan"))
    importance[1] = torch.linspace(0.0, -1.0, width)
    importance[1, 0], importance[1, 1] = 2.0, -5.0  # the most positive and the most negative neuron
    signed, absolute = _Recorder(), _Recorder()
    result = prune_to_top(model, None, [], keep=1, layers=[1], importance=importance, accuracy=signed, n_random=3)
    kept = set(range(width)) - set(signed.calls[0][1])
    assert kept == {0} and result.rank_by == "importance" and len(result.random_draws) == 3
    prune_to_top(model, None, [], keep=1, layers=[1], importance=importance, accuracy=absolute,
                 rank_by="abs_importance")
    assert set(range(width)) - set(absolute.calls[0][1]) == {1}
    assert signed.calls[1:] != [signed.calls[1]] * 3, "each random draw keeps a different neuron"
    metrics = result.metrics()
    assert metrics["pruned_accuracy"] == 0.5 and metrics["pruned_retention"] == 1.0
    assert metrics["pruned_minus_random_points"] == pytest.approx(100 * (0.5 - result.random_pruned))
    with pytest.raises(ValueError):
        prune_to_top(model, None, [], keep=1, layers=[1], importance=importance, accuracy=signed, rank_by="size")


def _loaded(model, tokenizer, spec: str) -> LoadedModel:
    return LoadedModel(spec=spec, source="memory", kind="memory", model=model, tokenizer=tokenizer,
                       dtype="float32", content_hash=spec, load_seconds=0.0)


def test_registered_compare_check_runs_every_condition(tokenizer, monkeypatch):
    import lmaudit.checks.arithmetic.checks as audit

    scored: list[int] = []
    original = audit.batched_neuron_scores
    monkeypatch.setattr(audit, "batched_neuron_scores", lambda model, tok, prompts, *args, **kwargs: (
        scored.append(len(prompts)) or original(model, tok, prompts, *args, **kwargs)))
    base = tiny_model("llama", seed=5)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        adapter_for(tuned).down_proj_weight(2).mul_(3.0)  # a "fine-tune" that changes the last layer's neurons
    context = AuditContext(model=_loaded(base, tokenizer, "tiny"), compare_model_spec="tuned",
                           load=lambda spec: _loaded(tuned, tokenizer, spec))
    common = {"ops": "+-", "n_score": 2, "few_shot": 1, "layers": [1, 2], "k": 4}
    finetune = check_cna_compare(context, CompareParams(condition="finetune", **common))
    assert isinstance(finetune, CnaComparison) and finetune.condition == "finetune"
    assert finetune.label_b == "tuned" and finetune.n_prompts == 8 and finetune.rows[0].promotes
    assert finetune.metrics()["max_abs_importance_delta"] > 0
    ablated = check_cna_compare(context, CompareParams(condition="head_ablated", heads=["L1.H0", "L2.H3"], **common))
    assert ablated.label_b == "ablated L1.H0, L2.H3" and ablated.metrics()["max_abs_importance_delta"] > 0
    assert finetune.top_a == ablated.top_a  # A (the base scores) is shared between the checks
    prompts = check_cna_compare(context, CompareParams(condition="prompts", templates=["symbolic"],
                                                       templates_b=["words"], **common))
    assert prompts.condition == "prompts" and "words" in prompts.label_b and prompts.n_prompts == 4
    assert scored == [8], "the base model's per-prompt scores are computed once and shared by every check"
    ops = check_cna_compare(context, CompareParams(condition="prompts", ops_b="*", **common))
    assert scored == [8, 4] and ops.label_b == "ops *, symbolic/words"  # only the new problems are scored
    with pytest.raises(ValueError, match="L<layer>.H<head>"):
        CompareParams(condition="head_ablated", heads=["14.1"])
    with pytest.raises(ValueError, match="needs heads"):
        CompareParams(condition="head_ablated")
    with pytest.raises(ValueError, match="ops_b and/or templates_b"):
        CompareParams(condition="prompts")
    assert parse_heads(["L14.H1", "L14.H3", "L5.H0"]) == {14: [1, 3], 5: [0]}


def test_report_table_shows_the_logit_lens_escaped():
    from lmaudit.reports.html import environment
    from lmaudit.reports.records import to_jsonable

    rows = (NeuronDelta(3, 7, 0.5, 0.1, 1.0, 2.0, ("<script>x", " 8"), ("&amp",)),)
    comparison = CnaComparison("base", "tuned", "1+1=", "1+1=", "2", "2", 1, ((3, 7),), ((3, 7),), rows, 4,
                               "finetune")
    html = environment().get_template("sections/CnaComparison.html.j2").render(
        record=None, result=to_jsonable(comparison))
    assert "<script>" not in html and "&lt;script&gt;x" in html and "&amp;amp" in html
    assert "␣8" in html and "finetune" in html and "averaged over 4 prompts" in html
    assert html.count("<tr>") == 2 and "1 of the 1 are in both" in html
