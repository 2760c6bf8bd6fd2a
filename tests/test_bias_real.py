"""The gender-bias audit's science on the real default model: only what a tiny model cannot show (slow)."""

from __future__ import annotations

import math

import pytest
import torch

from lmaudit.checks.bias.editing import measure_side_effects
from lmaudit.checks.bias.occupations import TEMPLATES, occupation_table
from lmaudit.checks.bias.scores import bias_statistics, model_scorer, occupation_bias
from lmaudit.checks.core.corpora import load_corpus
from lmaudit.checks.core.loading import LoadedModel, load_model
from lmaudit.checks.core.stats import layer_range
from tests.test_bias_planted import passes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_model() -> LoadedModel:
    return load_model("smollm2-135m-instruct")


def test_real_model_bias_scores(default_model: LoadedModel) -> None:
    """Both scorers agree, r is antisymmetric under the swap, and the statistics are consistent with the
    per-occupation values (nothing about the model's numbers is hard-coded)."""
    templates = TEMPLATES[:2]
    occupations = occupation_table(["nurse", "engineer", "hairdresser", "plumber", "secretary", "carpenter"])
    cached = occupation_bias(default_model, templates=templates, occupations=occupations)
    plain = occupation_bias(default_model, templates=templates, occupations=occupations,
                            scorer=model_scorer(default_model, prefix_cache=False))
    assert cached.r == pytest.approx(plain.r, abs=1e-3)
    swapped = occupation_bias(default_model, templates=[t.swapped() for t in templates], occupations=occupations)
    assert swapped.r == [-x for x in cached.r]
    stats = bias_statistics(torch.tensor(cached.r), [o.share_women for o in occupations])
    assert stats.total_bias == pytest.approx(cached.total_bias)
    assert all(math.isfinite(x) for x in cached.r)


@pytest.mark.counterexample("bias_edit_side_effects_bounded.perplexity_change_pct",
                             "bias_edit_side_effects_bounded.arithmetic_change_pct")
def test_zeroing_the_last_fifth_of_the_ffns_fails_the_side_effect_gates(default_model: LoadedModel) -> None:
    """An edit far too broad, every FFN neuron of the last 20 % of the default model's layers zeroed, collapses
    both perplexity and one-digit addition; zeroing one neuron passes both gates. The side effects are
    measured by the check's own function; the real model is needed because a tiny model has no skill to lose."""
    adapter, corpus = default_model.adapter, load_corpus("pydoc")
    broad = [(layer, i) for layer in layer_range(adapter.n_layers, 0.8) for i in range(adapter.intermediate_size)]
    for neurons, fail in ((broad, True), (broad[:1], False)):
        effects = measure_side_effects(default_model, corpus, neurons, seq_len=64, n_windows=1, n_arithmetic=12,
                                       seed=0)
        assert effects.arithmetic_before > 0
        assert passes("bias_edit_side_effects_bounded", "perplexity_change_pct",
                      effects.perplexity_change_pct) is not fail
        assert passes("bias_edit_side_effects_bounded", "arithmetic_change_pct",
                      effects.arithmetic_change_pct) is not fail
