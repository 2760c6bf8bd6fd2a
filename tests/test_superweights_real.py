"""Super weights of the real default model: confirmed causally, the late massive activations kept apart, and the
one BOS policy reaching lm-eval's documents so that "+SA" restores where the super activation really sits.
Slow: loads smollm2-135m-instruct. No coordinates are hard-coded: the tests assert what detection discovers."""

from __future__ import annotations

import pytest
import torch

from lmaudit.checks.core.corpora import load_corpus
from lmaudit.checks.core.errors import ModelLoadError
from lmaudit.checks.core.hooks import capture
from lmaudit.checks.core.logprobs import bos_prefix
from lmaudit.checks.core.zero_shot import bos_policy_lm
from lmaudit.checks.superweights.detect import detect
from lmaudit.checks.superweights.impact import superweight_impact

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real():
    from lmaudit.checks.core.loading import load_model

    try:
        loaded = load_model("smollm2-135m-instruct")
    except ModelLoadError as exc:
        pytest.skip(f"default model not installed: {exc}")
    return loaded, detect(loaded)


def test_every_confirmed_super_weight_collapses_its_spike_and_the_rest_do_not(real) -> None:
    loaded, detection = real
    factor = detection.settings.collapse_factor
    assert detection.super_weights, detection.why_none()
    assert all(sw.collapse >= factor for sw in detection.super_weights)
    confirmed = {(sw.layer, sw.row) for sw in detection.super_weights}
    for late in detection.massive_activations:  # spikes that the depth cut used to hide: tested, ruled out
        assert (late.layer, late.row) not in confirmed
        assert not late.collapse >= factor


def test_lm_eval_documents_start_with_bos_and_carry_the_super_activation_where_detection_saw_it(real) -> None:
    loaded, detection = real
    sw = detection.super_weights[0]
    lm = bos_policy_lm(loaded)
    contexts = ["Question: What is 3+4?\nAnswer:", "The capital of France is", "7-2="]
    encoded = [lm.tok_encode(c) for c in contexts]
    assert all(ids[: len(bos_prefix(loaded.tokenizer))] == bos_prefix(loaded.tokenizer) for ids in encoded)
    width = max(map(len, encoded))
    ids = torch.tensor([e + [e[-1]] * (width - len(e)) for e in encoded])
    with capture({"down": loaded.adapter.down_proj(sw.layer)}, what="output") as seen, torch.no_grad():
        loaded.model(input_ids=ids)
    peaks = seen.output("down")[..., sw.row].abs().argmax(dim=-1)  # (docs,)
    assert peaks.tolist() == [sw.token] * len(contexts)


def test_pruning_hurts_far_more_than_others_and_restoring_recovers(real) -> None:
    loaded, detection = real
    impact = superweight_impact(loaded, detection, load_corpus("pydoc"), seq_len=64, n_windows=2)
    metrics = impact.metrics()
    assert metrics["perplexity_ratio_sw_over_others"] >= 10
    assert metrics["restore_recovery"] >= 0.5
