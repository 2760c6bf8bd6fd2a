"""CNA comparisons and the intervention/pruning checks on tiny models with a planted answer neuron."""

from __future__ import annotations

import copy

import pytest
import torch

from checks.adapter import adapter_for
from checks.arithmetic_data import generate_problems
from checks.cna import compare_head_ablated, compare_models, compare_prompts, intervention_check, prune_to_top
from checks.neuron_scores import neuron_scores
from tests.checkpoints import byte_tokenizer
from tests.test_neuron_scores import plant_answer_neuron
from tests.tiny_models import tiny_model


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def test_base_vs_planted_model_puts_the_planted_neuron_first(tokenizer):
    base = tiny_model("llama", seed=1)
    planted = copy.deepcopy(base)
    plant_answer_neuron(planted, tokenizer, "12+34=", "4", layer=1, neuron=9)
    comparison = compare_models(base, planted, tokenizer, "12+34=", "4", k=5)
    assert (comparison.rows[0].layer, comparison.rows[0].neuron) == (1, 9)
    assert comparison.rows[0].importance_delta > 0.2
    assert comparison.top_b[0] == (1, 9) and comparison.metrics()["top_neuron_b"] == "L1.N9"


def test_head_ablation_comparison_leaves_the_model_untouched(tokenizer):
    model = tiny_model("llama", seed=2)
    before = neuron_scores(model, tokenizer, "7*8=", "5")
    comparison = compare_head_ablated(model, tokenizer, "7*8=", "5", {0: [1, 3]}, k=4)
    after = neuron_scores(model, tokenizer, "7*8=", "5")
    assert torch.equal(before.importance, after.importance)
    assert comparison.label_b == "ablated L0.H1, L0.H3" and comparison.rows
    assert comparison.metrics()["max_abs_importance_delta"] > 0
    same = compare_prompts(model, tokenizer, "7*8=", "5", "7*8=", "5", k=4)
    assert same.overlap == 1.0 and same.metrics()["max_abs_importance_delta"] < 1e-5  # batch rounding only


def test_intervention_check_ranks_the_planted_neuron_and_is_seeded(tokenizer):
    model = tiny_model("llama", seed=3)
    problems = generate_problems(ops="+", digits=1, n_per_op=4, template="symbolic", seed=0)
    for problem in problems[:1]:
        plant_answer_neuron(model, tokenizer, problem.prompt, problem.answer, layer=2, neuron=5)
    first = intervention_check(model, tokenizer, problems[:1], k=1, layers=[1, 2], n_random=2, seed=7)
    again = intervention_check(model, tokenizer, problems[:1], k=1, layers=[1, 2], n_random=2, seed=7)
    assert first.top[0][:2] == (2, 5)
    assert first == again
    assert set(first.metrics()) >= {"top_drop_points", "random_drop_points", "drop_gap_points"}
    pruned = prune_to_top(model, tokenizer, problems, keep=4, layers=[2])
    assert 0.0 <= pruned.pruned <= 1.0 and pruned.zeroed_per_layer == adapter_for(model).intermediate_size - 4
