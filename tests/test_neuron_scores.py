"""CNA neuron scores: a planted answer neuron ranks first, the vectorized scores equal a brute-force
intervention, batching changes nothing, and the logit lens reads the planted direction."""

from __future__ import annotations

import pytest
import torch

from lmaudit.checks.core.adapter import adapter_for
from lmaudit.checks.core.hooks import capture
from lmaudit.checks.core.interventions import zero_neurons
from lmaudit.checks.core.neuron_scores import (
    NeuronScores,
    batched_neuron_scores,
    encode,
    logit_lens,
    neuron_scores,
    target_token_id,
    top_neurons,
)
from tests.checkpoints import byte_tokenizer
from tests.tiny_models import tiny_model

PROMPT, TARGET = "12+34=", "4"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def plant_answer_neuron(model, tokenizer, prompt: str, target: str, layer: int, neuron: int) -> int:
    """Make ``neuron`` of ``layer`` fire on ``prompt``'s last token and write the target's unembedding row."""
    adapter = adapter_for(model)
    modules = adapter.layer(layer)
    up = modules.up_proj
    ids = torch.tensor([encode(tokenizer, prompt)])
    with capture({"up": up}, what="input") as cap, torch.no_grad():
        model(input_ids=ids)
    x = cap.input("up")[0, -1]  # (hidden,): the MLP's input at the last position
    direction = x / x.norm()
    target_id = target_token_id(tokenizer, prompt, target)
    with torch.no_grad():
        for proj in (up, modules.gate_proj):
            if proj is None:
                continue
            adapter.weight(proj)[neuron] = 4.0 * direction
            if getattr(proj, "bias", None) is not None:
                proj.bias[neuron] = 0.0
        row = adapter.unembedding.weight[target_id]
        adapter.down_proj_weight(layer)[:, neuron] = 3.0 * row / row.norm()
    return target_id


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "qwen2"])
@pytest.mark.parametrize("layer", [0, 2])
def test_planted_answer_neuron_ranks_first(tokenizer, arch, layer):
    model = tiny_model(arch, seed=1)
    target_id = plant_answer_neuron(model, tokenizer, PROMPT, TARGET, layer=layer, neuron=17)
    scores = neuron_scores(model, tokenizer, PROMPT, TARGET)
    assert scores.target_id == target_id == tokenizer.convert_tokens_to_ids(TARGET)
    (best_layer, best_neuron, best_importance), *_ = top_neurons(scores, 3)
    assert (best_layer, best_neuron) == (layer, 17), top_neurons(scores, 3)
    assert best_importance > 0.2
    assert scores.coefficient[layer, 17] > 0
    top, bottom = logit_lens(adapter_for(model), tokenizer, layer, 17, k=3)
    assert top[0][0] == TARGET
    assert TARGET not in [token for token, _ in bottom]
    flipped_top, _ = logit_lens(adapter_for(model), tokenizer, layer, 17, coefficient=-2.0, k=3)
    assert TARGET not in [token for token, _ in flipped_top]


def test_last_layer_importance_equals_brute_force_intervention(tokenizer):
    """In the last layer (Llama: no down bias) keeping only neuron k gives logits(r + m_k·fc2_k) exactly."""
    model = tiny_model("llama", seed=3)
    adapter = adapter_for(model)
    last = adapter.n_layers - 1
    scores = neuron_scores(model, tokenizer, PROMPT, TARGET, layers=[last], chunk=7)
    ids = torch.tensor([encode(tokenizer, PROMPT)])
    everyone = range(adapter.intermediate_size)

    def logprob(zeroed: list[int]) -> float:
        with zero_neurons(adapter, {last: zeroed}), torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
        return float(torch.log_softmax(logits, -1)[scores.target_id])

    base = logprob(list(everyone))
    assert scores.base_logprob[last].item() == pytest.approx(base, abs=1e-5)
    for k in (0, 5, 33, 63):
        single = logprob([j for j in everyone if j != k])
        assert scores.importance[last, k].item() == pytest.approx(single - base, abs=1e-4)
    assert torch.isnan(scores.importance[:last]).all() and scores.layers == [last]


def test_batched_equals_one_by_one(tokenizer):
    model = tiny_model("llama", seed=2)
    prompts = ["1+1=", "The sum of 3 and 5 is", "7*8="]
    targets = ["2", " 8", "5"]
    batched = batched_neuron_scores(model, tokenizer, prompts, targets, layers=[0, 2])
    for prompt, target, scores in zip(prompts, targets, batched, strict=True):
        single = neuron_scores(model, tokenizer, prompt, target, layers=[0, 2])
        assert isinstance(scores, NeuronScores) and scores.prompt == prompt
        torch.testing.assert_close(scores.importance, single.importance, equal_nan=True, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(scores.coefficient, single.coefficient, equal_nan=True, atol=1e-5, rtol=1e-4)
        assert scores.importance.shape == (3, 64)


def test_target_is_tokenised_after_the_prompt(tokenizer):
    assert target_token_id(tokenizer, "3 plus 5 is", " 8") == tokenizer.convert_tokens_to_ids("Ġ")
    assert target_token_id(tokenizer, "3+5=", "8") == tokenizer.convert_tokens_to_ids("8")
    with pytest.raises(ValueError):
        target_token_id(tokenizer, "3+5=", "")


def test_top_neurons_orders_and_skips_unscored_layers():
    table = torch.full((3, 4), float("nan"))
    table[1] = torch.tensor([0.1, 3.0, -1.0, 2.0])
    assert top_neurons(table, 2) == [(1, 1, 3.0), (1, 3, 2.0)]
    assert len(top_neurons(table, 10)) == 4


@pytest.mark.parametrize("arch", ["llama", "gemma2", "olmo2"])
def test_factorized_path_equals_generic_path(tokenizer, arch):
    """The RMSNorm factorization (U_k computed once per layer) gives the generic path's numbers."""
    from lmaudit.checks.core.neuron_scores import _rms_eps, factorized_layer_importance, layer_importance

    model = tiny_model(arch, seed=5)
    adapter = adapter_for(model)
    eps = _rms_eps(adapter)
    assert eps is not None
    generator = torch.Generator().manual_seed(0)
    r = torch.randn(2, adapter.hidden_size, generator=generator)
    m = torch.randn(2, adapter.intermediate_size, generator=generator)
    fast, fast_base = factorized_layer_importance(adapter, r, m, 1, [5, 70], eps, chunk=24)
    for b, target in enumerate([5, 70]):
        slow, slow_base = layer_importance(adapter, r[b], m[b], 1, target, chunk=24)
        torch.testing.assert_close(fast[b], slow, atol=2e-5, rtol=1e-4)
        assert float(fast_base[b]) == pytest.approx(float(slow_base), abs=1e-5)


@pytest.mark.parametrize("arch", ["llama", "olmo2"])
def test_cumulant_shortcut_stays_within_its_error_bound(arch):
    """The third-order value of every neuron is within its stated bound of the exact logsumexp; with the default
    tolerance the scores equal the exact ones, and both paths are taken (small and large activations)."""
    from lmaudit.checks.core.neuron_scores import (
        TAYLOR_TOLERANCE,
        _Moments,
        _rms,
        _rms_eps,
        factorized_layer_importance,
    )

    model = tiny_model(arch, seed=5)
    adapter = adapter_for(model)
    eps = _rms_eps(adapter)
    generator = torch.Generator().manual_seed(0)
    r = 3 * torch.randn(3, adapter.hidden_size, generator=generator)
    scale = torch.logspace(-1, 3, adapter.intermediate_size)  # activations from 0.1 to 1000 (tiny weights)
    m = torch.randn(3, adapter.intermediate_size, generator=generator) * scale
    targets = [5, 70, 200]
    exact, base = factorized_layer_importance(adapter, r, m, 1, targets, eps, tolerance=None)
    fast, fast_base = factorized_layer_importance(adapter, r, m, 1, targets, eps)
    torch.testing.assert_close(fast, exact, atol=2 * TAYLOR_TOLERANCE, rtol=0)
    torch.testing.assert_close(fast_base, base)

    with torch.no_grad():  # the shortcut's raw values and bounds for every neuron (the pipeline of the function)
        fc2 = adapter.down_proj_weight(1)
        gamma_r = adapter.final_norm(r) * _rms(r, eps)[:, None]
        a = adapter.unembedding(gamma_r)
        s0 = _rms(r, eps)
        z0 = a / s0[:, None]
        u = adapter.unembedding(adapter.final_norm(fc2.T) * _rms(fc2.T, eps)[:, None])
        s = torch.sqrt((r.pow(2).sum(-1)[:, None] + 2 * m * (r @ fc2) + m * m * fc2.pow(2).sum(0))
                       / fc2.shape[0] + eps)
        ids = torch.tensor(targets)
        value, bound = _Moments.of(z0, torch.logsumexp(z0, -1), ids).expand(u, m, s, s0, ids)
    finite = torch.isfinite(bound)
    assert float((bound <= TAYLOR_TOLERANCE).float().mean()) > 0.2, "the shortcut must be taken for small m"
    assert bool((bound > TAYLOR_TOLERANCE).any()), "and the exact path for large m"
    error = (value.float() - exact).abs()
    assert bool((error[finite] <= bound[finite].float() + 1e-6).all()), float((error - bound.float())[finite].max())
