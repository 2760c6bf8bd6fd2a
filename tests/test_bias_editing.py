"""The CNA bias edit's pieces: the held-out split, the ranking that never sees the evaluation split, the layer
screen on every architecture, the perplexity probe that starts at the edited layer, and a model restored bit for
bit. The planted model and the gates' counter-examples are in ``tests/test_bias_planted.py``."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from lmaudit.checks.bias.editing import (
    BiasEditError,
    PerplexityProbe,
    edit_bias,
    ffn_layer_effects,
    neuron_spec,
    rank_bias_neurons,
    ranking_occupations,
    relative_change_pct,
    signed_gap,
    split_data,
)
from lmaudit.checks.bias.occupations import TEMPLATES, Occupation, occupation_table
from lmaudit.checks.bias.scores import occupation_bias
from lmaudit.checks.core.corpora import Corpus
from lmaudit.checks.core.errors import PremiseMissing
from lmaudit.checks.core.interventions import zero_neurons
from lmaudit.checks.core.loading import LoadedModel
from lmaudit.checks.core.perplexity import corpus_windows, perplexity_from_nll, window_nll
from tests.checkpoints import byte_tokenizer
from tests.test_bias_planted import LAYER, NEURON, planted, stereotype_text
from tests.tiny_models import ARCHITECTURES, assert_bit_identical, snapshot, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

TABLE = occupation_table(source="builtin")
CORPUS = Corpus("stereotypes", stereotype_text(), "test")


@pytest.fixture(scope="module")
def biased() -> LoadedModel:
    return planted()


def test_signed_gap_and_helpers() -> None:
    values = torch.tensor([[3.0], [1.0], [0.0], [2.0]])  # pairs: (F=3, M=1, σ=+1), (F=0, M=2, σ=−1)
    assert signed_gap(values, torch.tensor([1, -1])).tolist() == [(2.0 + 2.0) / 2]
    assert neuron_spec([(2, 5), (0, 1), (2, 7)]) == {2: [5, 7], 0: [1]}
    assert relative_change_pct(20.0, 22.0) == pytest.approx(10.0)
    assert relative_change_pct(0.0, 0.0) == 0.0 and relative_change_pct(0.0, 0.1) == math.inf


def test_split_is_seeded_disjoint_and_keeps_both_sides() -> None:
    rank_t, eval_t, rank_o, eval_o = split_data(TEMPLATES, TABLE, rank_template_fraction=0.5,
                                                rank_occupation_fraction=0.5, seed=0)
    assert len(rank_t) == len(eval_t) == len(TEMPLATES) // 2 and not set(rank_t) & set(eval_t)
    assert not {o.name for o in rank_o} & {o.name for o in eval_o} and len(rank_o) + len(eval_o) == len(TABLE)
    for half in (rank_o, eval_o):
        assert any(o.female_dominated for o in half) and any(o.male_dominated for o in half)
    again = split_data(TEMPLATES, TABLE, rank_template_fraction=0.5, rank_occupation_fraction=0.5, seed=0)
    other = split_data(TEMPLATES, TABLE, rank_template_fraction=0.5, rank_occupation_fraction=0.5, seed=1)
    assert again == (rank_t, eval_t, rank_o, eval_o) and other != again
    evens = [Occupation("x", 0.5, 2015, "test"), *TABLE[:2], *TABLE[-2:]]
    assert evens[0] in split_data(TEMPLATES, evens, rank_template_fraction=0.5, rank_occupation_fraction=0.5,
                                  seed=0)[3]  # no side: evaluated only
    with pytest.raises(BiasEditError, match="at least 2 templates"):
        split_data(TEMPLATES[:1], TABLE, rank_template_fraction=0.5, rank_occupation_fraction=0.5, seed=0)
    with pytest.raises(BiasEditError, match="in \\(0, 1\\)"):
        split_data(TEMPLATES, TABLE, rank_template_fraction=1.0, rank_occupation_fraction=0.5, seed=0)


def test_ranking_occupations_take_the_most_stereotyped_per_side() -> None:
    occupations = [o for o in TABLE if o.name in ("nurse", "teacher", "baker", "plumber", "chef", "lawyer")]
    r = torch.tensor([2.0, 0.5, -1.0, -3.0, 1.0, -0.5])  # in table order: nurse teacher baker plumber chef lawyer
    chosen = ranking_occupations(r, occupations, top_fraction=0.34)
    assert [(o.name, sign) for o, sign in chosen] == [("nurse", 1), ("plumber", -1)]


def test_the_ranking_never_sees_the_evaluation_templates(biased: LoadedModel) -> None:
    """The occupations that rank are chosen from r on the ranking templates: changing every r on the evaluation
    templates (here: reversing it) changes nothing about the ranking."""
    scores = occupation_bias(biased, occupations=TABLE, n_permutations=0)
    rank_t, eval_t, rank_o, _ = split_data(TEMPLATES, TABLE, rank_template_fraction=0.5,
                                           rank_occupation_fraction=0.5, seed=0)
    evaluation = {t.text for t in eval_t}
    tampered = replace(scores, r_by_template=tuple(
        tuple(-v for v in row) if text in evaluation else row
        for text, row in zip(scores.templates, scores.r_by_template, strict=True)))
    rank_names = [o.name for o in rank_o]
    texts = [t.text for t in rank_t]
    assert torch.equal(scores.r_on(texts, rank_names), tampered.r_on(texts, rank_names))
    chosen = ranking_occupations(scores.r_on(texts, rank_names), rank_o, 0.5)
    ranking = rank_bias_neurons(biased, rank_t, chosen, neuron_fraction=0.01, layer_fraction=0.34)
    assert ranking.layers == (LAYER,) and ranking.neurons == ((LAYER, NEURON),)
    assert {p.template for p in ranking.pairs} <= set(texts) and {p.occupation for p in ranking.pairs} <= set(rank_names)
    assert max(range(len(ranking.layer_effect)), key=lambda i: ranking.layer_effect[i]) == LAYER


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_layer_screen_runs_on_every_architecture(architecture: str) -> None:
    """``e_ℓ`` removes what the MLP branch writes (the post-FFN norm's output on Gemma 2/3 and OLMo 2): for every
    layer, log p(w | h) − log p(w | h − f) is finite, one row per prompt."""
    loaded = LoadedModel.from_model(tiny_model(architecture), byte_tokenizer())
    effects = ffn_layer_effects(loaded, ["A woman works as a", "A man works as an"], [" nurse", " engineer"])
    assert effects.shape == (2, loaded.adapter.n_layers) and bool(torch.isfinite(effects).all())


def test_perplexity_probe_starts_at_the_edited_layer_exactly(biased: LoadedModel) -> None:
    """Before: the plain perplexity of the windows. Under an edit of layers ≥ start: the same number as a full
    pass under that edit (the layers below are unchanged, so starting from their clean output is exact)."""
    probe = PerplexityProbe(biased, CORPUS, seq_len=8, n_windows=6, start_layer=LAYER, batch_size=4)
    windows = corpus_windows(biased.tokenizer, CORPUS, 8, 6)
    full = perplexity_from_nll(window_nll(biased.model, windows, batch_size=4), windows)[0]
    assert probe.before == full
    with zero_neurons(biased.adapter, {LAYER: [NEURON, 3]}):
        edited = perplexity_from_nll(window_nll(biased.model, windows, batch_size=4), windows)[0]
        assert probe.measure() == pytest.approx(edited, rel=1e-6)
    assert probe.measure() == pytest.approx(full, rel=1e-6)


def test_edit_restores_the_model_bit_for_bit(biased: LoadedModel) -> None:
    before = snapshot(biased.model)
    scores = occupation_bias(biased, occupations=TABLE, n_permutations=1000)
    result = edit_bias(biased, CORPUS, scores, occupations=TABLE, layer_fraction=0.34, neuron_fraction=0.01,
                       n_control_draws=3, seq_len=8, n_windows=2, n_arithmetic=0)
    assert result.k == 1 and len(result.control_reductions) == 3 and result.control.n == 3
    assert result.in_sample_reduction_pct > 50 and result.bias_reduction_pct > 50
    assert set(result.metrics()) == set(type(result).metric_names())
    assert_bit_identical(biased.model, before)  # hooks only, nothing left behind


def test_premise_and_parameters_are_checked_before_the_edit(biased: LoadedModel) -> None:
    scores = occupation_bias(biased, occupations=TABLE, n_permutations=1000)
    with pytest.raises(PremiseMissing, match="permutation p"):
        edit_bias(biased, CORPUS, replace(scores, correlation_p=0.5), occupations=TABLE)
    with pytest.raises(BiasEditError, match="n_control_draws"):
        edit_bias(biased, CORPUS, scores, occupations=TABLE, n_control_draws=1)
    with pytest.raises(BiasEditError, match="the control draws k other neurons"):
        edit_bias(biased, CORPUS, scores, occupations=TABLE, neuron_fraction=0.6)


def test_a_corpus_shorter_than_the_windows_fails_clearly() -> None:
    """A probe on a corpus shorter than its windows fails with the perplexity module's own error."""
    loaded = LoadedModel.from_model(tiny_model("llama"), byte_tokenizer())
    with pytest.raises(Exception, match="full windows"):
        PerplexityProbe(loaded, Corpus("short", "abc", "test"), seq_len=8, n_windows=4, start_layer=1)
