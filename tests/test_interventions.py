"""Interventions do what they say and always restore the model bit for bit."""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmaudit.checks.core.adapter import ArchitectureAdapter
from lmaudit.checks.core.errors import LmAuditError
from lmaudit.checks.core.interventions import (
    InterventionError,
    ablate_heads,
    edit_weight,
    replace_activation,
    scale_heads_per_row,
    scale_neurons,
    set_down_proj_weight,
    transform_weights,
    zero_weights,
)
from tests.strategies_interventions import InterventionSpec, interventions_for
from tests.tiny_models import assert_bit_identical, random_ids, snapshot, tiny_model

SEQ_LEN = 6
ARCHS_FOR_PROPERTIES = ("llama", "gpt2", "phi3", "gpt_neox")  # Linear, Conv1D, fused gate_up, parallel residual


class Boom(Exception):
    pass


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("arch", ARCHS_FOR_PROPERTIES)
def test_random_nested_interventions_restore_the_state_dict(arch: str) -> None:
    model = tiny_model(arch)
    adapter = ArchitectureAdapter(model)
    ids = random_ids(2, SEQ_LEN)
    before = snapshot(model)
    clean = logits(model, ids)
    hooks_before = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())

    @settings(max_examples=25, suppress_health_check=[HealthCheck.too_slow])
    @given(specs=st.lists(interventions_for(adapter, seq_len=SEQ_LEN), min_size=1, max_size=6),
           raise_at=st.one_of(st.none(), st.integers(0, 5)))
    def nested(specs: list[InterventionSpec], raise_at: int | None) -> None:
        try:
            with ExitStack() as stack:
                for depth, spec in enumerate(specs):
                    stack.enter_context(spec.enter(adapter))
                    if raise_at == depth:
                        raise Boom
                logits(model, ids)
        except Boom:
            pass
        assert_bit_identical(model, before)
        assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks_before
        assert torch.equal(logits(model, ids), clean)

    nested()


def test_edit_weight_on_transposed_conv1d_addresses_out_in() -> None:
    model = tiny_model("gpt2")
    adapter = ArchitectureAdapter(model)
    module = adapter.down_proj(0)  # Conv1D, stored [in, out]
    with edit_weight(module, (3, 5), value=7.0) as original:
        assert module.weight[5, 3].item() == 7.0
    assert module.weight[5, 3].item() == original.item()


def test_set_down_proj_weight_restores_after_an_exception() -> None:
    model = tiny_model("llama")
    adapter = ArchitectureAdapter(model)
    before = snapshot(model)
    with pytest.raises(Boom), set_down_proj_weight(adapter, 1, 2, 3, value=1e6):
        assert adapter.down_proj_weight(1)[2, 3].item() == 1e6
        raise Boom
    assert_bit_identical(model, before)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_ablating_a_head_equals_zeroing_its_output_projection_columns(arch: str) -> None:
    model = tiny_model(arch)
    adapter = ArchitectureAdapter(model)
    ids = random_ids()
    with ablate_heads(adapter, {1: [2]}):
        hooked = logits(model, ids)
    cols = adapter.heads.columns(2)
    with edit_weight(adapter.attn_out(1), (slice(None), cols), value=0.0):
        by_weight = logits(model, ids)
    torch.testing.assert_close(hooked, by_weight, rtol=0, atol=1e-6)
    assert not torch.allclose(hooked, logits(model, ids))


def test_batched_head_scales_equal_one_ablation_per_row() -> None:
    model = tiny_model("llama")
    adapter = ArchitectureAdapter(model)
    ids = random_ids(1, 7)
    n_heads = adapter.heads.n_heads
    scales = torch.ones(n_heads, n_heads) - torch.eye(n_heads)  # row h ablates head h
    with scale_heads_per_row(adapter, 2, scales):
        batched = logits(model, ids.expand(n_heads, -1))
    for head in range(n_heads):
        with ablate_heads(adapter, {2: [head]}):
            torch.testing.assert_close(batched[head], logits(model, ids)[0], rtol=0, atol=1e-5)


def test_zeroing_neurons_equals_zeroing_down_proj_columns() -> None:
    model = tiny_model("qwen2")
    adapter = ArchitectureAdapter(model)
    ids = random_ids()
    with scale_neurons(adapter, {0: [1, 5, 9]}, scale=0.0):
        hooked = logits(model, ids)
    with edit_weight(adapter.down_proj(0), (slice(None), [1, 5, 9]), value=0.0):
        by_weight = logits(model, ids)
    torch.testing.assert_close(hooked, by_weight, rtol=0, atol=1e-6)


def test_replace_activation_sets_the_ffn_output() -> None:
    from lmaudit.checks.core.hooks import capture

    model = tiny_model("llama")
    adapter = ArchitectureAdapter(model)
    with replace_activation(adapter, 1, 3, 4, 123.0), \
            capture({"ffn": adapter.down_proj(1)}, what="output") as seen:
        logits(model, random_ids())
    out = seen.output("ffn")
    assert torch.all(out[:, 3, 4] == 123.0)


def test_transform_weights_runs_once_and_restores() -> None:
    model = tiny_model("olmo2")
    adapter = ArchitectureAdapter(model)
    before = snapshot(model)
    calls = []

    def zero(original: torch.Tensor, weight: torch.Tensor) -> None:
        calls.append(1)
        assert original.data_ptr() != weight.data_ptr() and torch.equal(original, weight)  # saved before the write
        weight.zero_()

    modules = adapter.decoder_linears()
    with transform_weights(modules, zero):
        for _ in range(3):
            logits(model, random_ids())
        assert all(float(adapter.weight(m).detach().abs().sum()) == 0.0 for m in modules.values())
    assert len(calls) == len(modules)
    assert_bit_identical(model, before)


def test_zero_weights_zeroes_exactly_the_listed_cells_of_each_module() -> None:
    model = tiny_model("gpt2")  # Conv1D: (rows, cols) address the [out, in] view
    adapter = ArchitectureAdapter(model)
    before = snapshot(model)
    down, attn = adapter.down_proj(1), adapter.attn_out(0)
    with zero_weights({down: (torch.tensor([0, 4]), torch.tensor([7, 2])), attn: ([1], [3])}):
        assert adapter.weight(down)[[0, 4], [7, 2]].tolist() == [0.0, 0.0]
        assert adapter.weight(attn)[1, 3].item() == 0.0
        assert int((adapter.weight(down) == 0).sum()) == 2
    assert_bit_identical(model, before)


def test_bad_arguments_raise_an_lmaudit_error_naming_the_intervention() -> None:
    adapter = ArchitectureAdapter(tiny_model("llama"))
    with pytest.raises(InterventionError, match="edit_weight: give exactly one of"), \
            edit_weight(adapter.down_proj(0), (0, 0), value=1.0, scale=2.0):
        pass
    with pytest.raises(LmAuditError, match="replace_activation: unknown site 'nope'"), \
            replace_activation(adapter, 0, 0, 0, 1.0, site="nope"):  # type: ignore[arg-type]
        pass
    with pytest.raises(ValueError, match=r"scale_heads_per_row: scales must be \(batch, 4\)"), \
            scale_heads_per_row(adapter, 0, torch.ones(2, 3)):
        pass
