"""CNA neuron scores: a planted answer neuron ranks first on every residual layout (plain, parallel, sandwich
norms), the factorized scores equal the model's own head, the fixed normaliser is the paper's formula, the
linearised sandwich-norm writes sum to what the layer adds, and the cumulant shortcut stays within its bound."""

from __future__ import annotations

import pytest
import torch

from lmaudit.checks.core.adapter import adapter_for
from lmaudit.checks.core.hooks import capture
from lmaudit.checks.core.interventions import zero_neurons
from lmaudit.checks.core.neuron_scores import (
    TAYLOR_TOLERANCE,
    NeuronScores,
    NormMap,
    _Head,
    _Moments,
    batched_neuron_scores,
    encode,
    factorized_importance,
    last_position_states,
    layer_importance,
    logit_lens,
    neuron_scores,
    neuron_writes,
    scores_from_states,
    subset_importance,
    target_token_id,
    top_neurons,
)
from tests.checkpoints import byte_tokenizer
from tests.tiny_models import tiny_model

PROMPT, TARGET = "12+34=", "4"
PROMPTS, TARGETS = ["1+1=", "7*8=", "The sum of 3 and 5 is"], ["2", "5", " 8"]
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


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "qwen2", "gemma3_text", "olmo2"])
@pytest.mark.parametrize("layer", [0, 2])
def test_planted_answer_neuron_ranks_first(tokenizer, arch, layer):
    model = tiny_model(arch, seed=1)
    target_id = plant_answer_neuron(model, tokenizer, PROMPT, TARGET, layer=layer, neuron=17)
    for normalizer in ("fixed", "per_neuron"):
        scores = neuron_scores(model, tokenizer, PROMPT, TARGET, normalizer=normalizer)
        assert scores.target_id == target_id == tokenizer.convert_tokens_to_ids(TARGET)
        (best_layer, best_neuron, best_importance), *_ = top_neurons(scores, 3)
        assert (best_layer, best_neuron) == (layer, 17), (normalizer, top_neurons(scores, 3))
        assert best_importance > 0.2 and scores.normalizer == normalizer
    assert scores.coefficient[layer, 17] > 0
    top, bottom = logit_lens(adapter_for(model), tokenizer, layer, 17, k=3)
    assert top[0][0] == TARGET
    assert TARGET not in [token for token, _ in bottom]


def test_last_layer_per_neuron_importance_equals_brute_force_intervention(tokenizer):
    """In the last layer (Llama: no down bias) keeping only neuron k gives logits(r + m_k·fc2_k) exactly."""
    model = tiny_model("llama", seed=3)
    adapter = adapter_for(model)
    last = adapter.n_layers - 1
    scores = neuron_scores(model, tokenizer, PROMPT, TARGET, layers=[last], chunk=7, normalizer="per_neuron")
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


def test_fixed_normalizer_is_the_papers_formula(tokenizer):
    """importance_k = log softmax(W_U·(γ ⊙ (r + m_k·fc2_k)) / σ_f)[w] − (same for r), σ_f the clean final scale."""
    model = tiny_model("llama", seed=3)
    adapter = adapter_for(model)
    states = last_position_states(model, tokenizer, [PROMPT], layers=[1], adapter=adapter)
    w = target_token_id(tokenizer, PROMPT, TARGET)
    scores = scores_from_states(adapter, states, [PROMPT], [TARGET], [w], normalizers=("fixed",))["fixed"][0]
    gamma, eps = adapter.final_norm.weight.detach().float(), adapter.final_norm.variance_epsilon
    final = states.final[0]
    sigma_f = torch.sqrt(final.pow(2).mean() + eps)
    w_u = adapter.unembedding.weight.detach().float()
    r, m, fc2 = states.residual[1][0], states.coefficient[1][0], adapter.down_proj_weight(1).float()

    def logprob(x: torch.Tensor) -> float:
        return float(torch.log_softmax(w_u @ (gamma * x) / sigma_f, -1)[w])

    assert float(scores.base_logprob[1]) == pytest.approx(logprob(r), abs=1e-5)
    for k in (0, 9, 40):
        assert float(scores.importance[1, k]) == pytest.approx(logprob(r + m[k] * fc2[:, k]) - logprob(r), abs=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gemma2", "gemma3_text", "olmo2"])
def test_factorized_per_neuron_path_equals_the_models_own_head(tokenizer, arch):
    """U_k shared by all prompts (and the cumulant shortcut) give adapter.logits(r + v_k) for every neuron."""
    model = tiny_model(arch, seed=5)
    adapter = adapter_for(model)
    states = last_position_states(model, tokenizer, PROMPTS, layers=[0, 2], adapter=adapter)
    ids = [target_token_id(tokenizer, p, t) for p, t in zip(PROMPTS, TARGETS, strict=True)]
    scores = scores_from_states(adapter, states, PROMPTS, TARGETS, ids, normalizers=("per_neuron",),
                                chunk=24)["per_neuron"]
    for i, target in enumerate(ids):
        for layer in (0, 2):
            scaled = states.coefficient[layer][i] * states.scale[layer][i]
            generic, base = layer_importance(adapter, states.residual[layer][i], scaled, layer, target, chunk=24)
            torch.testing.assert_close(scores[i].importance[layer], generic, atol=2e-5, rtol=1e-4)
            assert float(scores[i].base_logprob[layer]) == pytest.approx(float(base), abs=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "gemma3_text", "olmo2"])
def test_neuron_writes_sum_to_what_the_layer_adds(tokenizer, arch):
    """Σ_k (m_k/σ(y))·γ ⊙ fc2_k = norm(y) under a post-FFN norm (Σ_k m_k·fc2_k + bias = y otherwise), and
    r + write is the layer's output."""
    model = tiny_model(arch, seed=2)
    adapter = adapter_for(model)
    layer = 1
    modules = {"down": adapter.down_proj(layer), "write": adapter.ffn_write_module(layer)}
    with capture(modules, what="input") as seen_in, capture(modules, what="output") as seen_out, torch.no_grad():
        model(input_ids=torch.tensor([encode(tokenizer, PROMPT)]))
    m, y = seen_in.input("down")[0, -1], seen_out.output("down")[0, -1]
    states = last_position_states(model, tokenizer, [PROMPT], layers=[layer], adapter=adapter)
    total = neuron_writes(adapter, layer) @ (m * states.scale[layer][0])
    bias = getattr(adapter.down_proj(layer), "bias", None)
    if bias is not None:
        total = total + bias
    torch.testing.assert_close(total, adapter.ffn_write(layer, y).detach(), atol=1e-5, rtol=1e-5)
    sandwich = adapter.layer(layer).post_ffn_norm is not None
    assert sandwich == (arch in ("gemma2", "gemma3_text", "olmo2"))
    assert torch.equal(states.scale[layer], torch.ones(1)) != sandwich  # the position's 1/σ(y) under the norm


def test_norm_map_recognises_rms_and_layer_norms_by_probing():
    assert NormMap.of(adapter_for(tiny_model("llama")).final_norm, 32).centered is False
    assert NormMap.of(adapter_for(tiny_model("gpt2")).final_norm, 32).centered is True
    gemma = NormMap.of(adapter_for(tiny_model("gemma3_text")).final_norm, 32)  # scale (1 + w)
    x = torch.randn(2, 32)
    torch.testing.assert_close(gemma.lin(x) / gemma.sigma(x)[:, None] + gemma.bias,
                               gemma.module(x).float(), atol=1e-5, rtol=1e-5)
    assert NormMap.of(torch.nn.Linear(32, 32), 32) is None  # no eps: not a norm
    assert NormMap.of(None, 32) is None


def test_batched_equals_one_by_one_and_subset_equals_full(tokenizer):
    model = tiny_model("olmo2", seed=2)
    adapter = adapter_for(model)
    batched = batched_neuron_scores(model, tokenizer, PROMPTS, TARGETS, layers=[0, 2])
    for prompt, target, scores in zip(PROMPTS, TARGETS, batched, strict=True):
        single = neuron_scores(model, tokenizer, prompt, target, layers=[0, 2])
        assert isinstance(scores, NeuronScores) and scores.prompt == prompt
        torch.testing.assert_close(scores.importance, single.importance, equal_nan=True, atol=1e-5, rtol=1e-4)
        assert scores.importance.shape == (3, 64)
    states = last_position_states(model, tokenizer, PROMPTS, layers=[2], adapter=adapter)
    ids = [target_token_id(tokenizer, p, t) for p, t in zip(PROMPTS, TARGETS, strict=True)]
    sub = subset_importance(adapter, states, ids, {2: [3, 17, 40]})
    for i, scores in enumerate(batched):
        torch.testing.assert_close(sub[2][i], scores.importance[2, [3, 17, 40]], atol=1e-5, rtol=1e-4)


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


@pytest.mark.parametrize("arch", ["llama", "olmo2"])
@pytest.mark.parametrize("normalizer", ["fixed", "per_neuron"])
def test_cumulant_shortcut_stays_within_its_error_bound(arch, normalizer):
    """Every neuron's third-order value is within its stated bound of the exact logsumexp; with the default
    tolerance the scores equal the exact ones, and both paths are taken (small and large activations)."""
    model = tiny_model(arch, seed=5)
    adapter = adapter_for(model)
    head = _Head.of(adapter)
    generator = torch.Generator().manual_seed(0)
    r = 3 * torch.randn(3, adapter.hidden_size, generator=generator)
    final = 3 * torch.randn(3, adapter.hidden_size, generator=generator)
    scale = torch.logspace(-1, 3, adapter.intermediate_size)  # activations from 0.1 to 1000 (tiny weights)
    m = torch.randn(3, adapter.intermediate_size, generator=generator) * scale
    targets = [5, 70, 200]
    writes = neuron_writes(adapter, 1)
    exact = factorized_importance(head, writes, r, m, final, targets, normalizers=(normalizer,), tolerance=None)
    fast = factorized_importance(head, writes, r, m, final, targets, normalizers=(normalizer,))
    torch.testing.assert_close(fast[normalizer][0], exact[normalizer][0], atol=2 * TAYLOR_TOLERANCE, rtol=0)

    with torch.no_grad():  # the shortcut's raw values and bounds for every neuron
        norm = head.norm
        a = norm.lin(r) @ head.w_u.T
        s0 = norm.sigma(final if normalizer == "fixed" else r)
        u = norm.lin(writes.T) @ head.w_u.T
        if normalizer == "fixed":
            s, rho = s0[:, None].expand_as(m), torch.zeros_like(m)
        else:
            rc, fc = norm.center(r), norm.center(writes.T)
            s = torch.sqrt((rc.pow(2).sum(-1)[:, None] + 2 * m * (rc @ fc.T) + m * m * fc.pow(2).sum(-1))
                           / writes.shape[0] + norm.eps)
            rho = s0[:, None] / s - 1
        g = a / s0[:, None]
        ids = torch.tensor(targets)
        moments = _Moments.of(g + head.const, g, ids, with_c=normalizer == "per_neuron")
        value, bound = moments.expand(u, m / s, rho, ids, torch.empty_like(u))
    finite = torch.isfinite(bound)
    assert float((bound <= TAYLOR_TOLERANCE).float().mean()) > 0.2, "the shortcut must be taken for small m"
    assert bool((bound > TAYLOR_TOLERANCE).any()), "and the exact path for large m"
    error = (value.float() - exact[normalizer][0]).abs()
    # slack: float32 rounding of the exact logsumexp itself (a few 1e-6 nats)
    assert bool((error[finite] <= bound[finite].float() + 4e-6).all()), float((error - bound.float())[finite].max())
