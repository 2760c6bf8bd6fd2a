"""The architecture adapter on a tiny random model of every supported architecture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmaudit.checks.core.adapter import ArchitectureAdapter
from lmaudit.checks.core.errors import UnsupportedArchitectureError
from lmaudit.checks.core.hooks import capture
from lmaudit.checks.core.layer_skip import clean_hidden_states, start_at_layer
from tests.tiny_models import ARCHITECTURES, HEADS, HIDDEN, INTERMEDIATE, LAYERS, random_ids, tiny_model


@pytest.fixture(scope="module", params=ARCHITECTURES)
def adapted(request: pytest.FixtureRequest) -> tuple[str, nn.Module, ArchitectureAdapter]:
    model = tiny_model(request.param)
    return request.param, model, ArchitectureAdapter(model)


def test_shape_numbers_come_from_the_config(adapted: tuple[str, nn.Module, ArchitectureAdapter]) -> None:
    _, model, adapter = adapted
    summary = adapter.summary()
    assert summary["n_layers"] == LAYERS
    assert summary["n_heads"] == HEADS
    assert summary["hidden_size"] == HIDDEN
    assert summary["intermediate_size"] == INTERMEDIATE
    assert summary["parameters"] == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert adapter.heads.n_heads * adapter.heads.head_dim == adapter.attn_out(0).in_features \
        if isinstance(adapter.attn_out(0), nn.Linear) else True


def test_down_proj_weight_is_hidden_by_intermediate(adapted: tuple[str, nn.Module, ArchitectureAdapter]) -> None:
    _, _, adapter = adapted
    for layer in range(adapter.n_layers):
        assert tuple(adapter.down_proj_weight(layer).shape) == (HIDDEN, INTERMEDIATE)


def test_down_proj_input_is_the_neuron_activations(adapted: tuple[str, nn.Module, ArchitectureAdapter]) -> None:
    """Its input has ``intermediate`` channels and ``y = x @ W_down.T + b`` reproduces its output."""
    _, model, adapter = adapted
    module = adapter.down_proj(1)
    with capture({"down": module}) as seen, torch.no_grad():
        model(input_ids=random_ids(), use_cache=False)
    x, y = seen.input("down"), seen.output("down")
    assert x.shape[-1] == INTERMEDIATE and y.shape[-1] == HIDDEN
    bias = module.bias if module.bias is not None else 0.0
    torch.testing.assert_close(x @ adapter.down_proj_weight(1).T + bias, y, rtol=1e-5, atol=1e-5)


def test_up_and_gate_projections_are_found(adapted: tuple[str, nn.Module, ArchitectureAdapter]) -> None:
    name, _, adapter = adapted
    layer = adapter.layer(0)
    if name == "phi3":
        assert layer.gate_up_proj is not None and layer.up_proj is None
        assert adapter.weight(layer.gate_up_proj).shape == (2 * INTERMEDIATE, HIDDEN)
    else:
        assert layer.up_proj is not None
        assert adapter.weight(layer.up_proj).shape == (INTERMEDIATE, HIDDEN)
    assert layer.norms, "every supported layer has at least one norm"


def test_logits_from_the_residual_match_the_model(adapted: tuple[str, nn.Module, ArchitectureAdapter]) -> None:
    """final norm + unembedding (+ soft-cap) applied to the last residual gives the model's own logits."""
    _, model, adapter = adapted
    ids = random_ids()
    with capture({"final_norm": adapter.final_norm}, what="input") as seen, torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
        again = adapter.logits(seen.input("final_norm"))
    torch.testing.assert_close(again, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("start", [1, LAYERS - 1])
def test_start_at_layer_reproduces_the_full_pass(adapted: tuple[str, nn.Module, ArchitectureAdapter],
                                                 start: int) -> None:
    _, model, adapter = adapted
    ids = random_ids(3, 9, seed=1)
    logits, hidden = clean_hidden_states(model, ids)
    before = [id(m) for m in adapter.layer_list]
    with torch.no_grad(), start_at_layer(adapter, start, hidden[start]):
        skipped = model(input_ids=ids, use_cache=False).logits
    assert [id(m) for m in adapter.layer_list] == before, "layers must be put back"
    torch.testing.assert_close(skipped, logits, rtol=0, atol=1e-6)


def test_start_at_layer_rejects_a_mismatched_cache(adapted: tuple[str, nn.Module, ArchitectureAdapter]) -> None:
    _, model, adapter = adapted
    _, hidden = clean_hidden_states(model, random_ids(2, 5))
    with pytest.raises(ValueError, match="does not match"), torch.no_grad(), \
            start_at_layer(adapter, 1, hidden[1]):
        model(input_ids=random_ids(3, 5), use_cache=False)
    assert not any(type(m).__name__ == "_Skipped" for m in adapter.layer_list)


def test_unsupported_model_names_the_modules_looked_for() -> None:
    class Strange(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = object()
            self.blocks = nn.ModuleList([nn.Linear(2, 2)])

    with pytest.raises(UnsupportedArchitectureError, match=r"model\.layers.*transformer\.h.*gpt_neox\.layers"):
        ArchitectureAdapter(Strange())


def test_missing_mlp_names_the_paths() -> None:
    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.mlp = nn.Identity()
    with pytest.raises(UnsupportedArchitectureError, match=r"down_proj: mlp\.down_proj, mlp\.c_proj"):
        ArchitectureAdapter(model)
