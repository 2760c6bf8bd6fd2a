"""Super weights of the real default model: found, invariant across hypothesis prompts (one batched pass per
round), and doing what the paper says when pruned. Slow: loads smollm2-135m-instruct. No expected coordinates
are hard-coded here: the tests assert what detection discovers."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings

from lmaudit.checks.core.corpora import load_corpus
from lmaudit.checks.core.errors import ModelLoadError
from lmaudit.checks.superweights.detect import detect_super_weights, prompt_invariance
from lmaudit.checks.superweights.impact import stopword_shift, superweight_impact
from tests.strategies_prompts import prompt_batches

pytestmark = pytest.mark.slow
_STATE: dict[str, object] = {}


@pytest.fixture(scope="module")
def real():
    from lmaudit.checks.core.loading import load_model

    try:
        loaded = load_model("smollm2-135m-instruct")
    except ModelLoadError as exc:
        pytest.skip(f"default model not installed: {exc}")
    started = time.perf_counter()
    detection = detect_super_weights(loaded.adapter, loaded.tokenizer)
    _STATE["seconds"] = time.perf_counter() - started
    return loaded, detection


def test_default_model_has_an_early_super_weight(real) -> None:
    loaded, detection = real
    assert detection.super_weights, f"no super weight found; evidence: {detection.rounds[0].spike_layers}"
    for sw in detection.super_weights:
        assert sw.layer < loaded.adapter.n_layers // 2
        assert abs(sw.activation) > 100 * detection.rounds[0].output_median
    assert detection.rounds[-1].held_out == tuple(detection.coordinates)
    # Detection time is measured by benchmarks/bench_superweights.py and reported by the audit, not asserted
    # here: a wall-clock bound in a unit test only measures how busy the CI runner is.


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(batch=prompt_batches(long_words=(20, 40)))
def test_same_coordinates_and_channel_on_every_prompt(real, batch: list[str]) -> None:
    loaded, detection = real
    result = prompt_invariance(loaded.adapter, loaded.tokenizer, batch, detection)
    assert result.moved == []


def test_pruning_the_super_weight_hurts_far_more_than_pruning_others(real) -> None:
    loaded, detection = real
    impact = superweight_impact(loaded, detection, load_corpus("pydoc"), seq_len=128, n_windows=2, tasks=[],
                                n_others=7000)
    ppl = {c.name: c.perplexity for c in impact.conditions}
    assert ppl["prune_sw"] > 2 * ppl["original"]
    assert ppl["prune_sw"] > 2 * ppl["prune_others"]
    assert ppl["prune_sw_restore"] < ppl["prune_sw"]  # restoring the super activation recovers part of it
    after = detection.super_weights[0].layer + 1  # the residual stream entering the layer after the super weight
    assert impact.residual.original[after] > 5 * impact.residual.pruned[after]


def test_pruning_moves_stopword_mass(real) -> None:
    # The paper (Llama-7B) sees stopword mass rise; on SmolLM2-135M it falls (the model degenerates to junk
    # tokens). The audit YAML declares the direction; here: the mass moves, and the top token is one that gained.
    loaded, detection = real
    shift = stopword_shift(loaded, detection, load_corpus("pydoc"), n_prompts=32)
    assert abs(shift.metrics()["stopword_mass_ratio"] - 1) > 0.1
    assert shift.top_tokens[0].ratio > 1
