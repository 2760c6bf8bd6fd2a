"""Super-weight detection: known answers on tiny models with a planted super weight, none on unplanted ones,
invariance across hypothesis prompts, and the audit checks failing on a model whose super weight moved."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from lmaudit.checks.core.adapter import ArchitectureAdapter
from lmaudit.checks.core.errors import LmAuditError
from lmaudit.checks.core.hooks import capture
from lmaudit.checks.core.loading import LoadedModel
from lmaudit.checks.harness.context import AuditContext
from lmaudit.checks.harness.thresholds import Threshold, compare
from lmaudit.checks.superweights.detect import (
    SuperWeightParams,
    detect_super_weights,
    detect_super_weights_many,
    finetune_invariance,
    prompt_invariance,
    spike_layers,
    superweights_audit,
)
from tests.checkpoints import byte_tokenizer
from tests.strategies_prompts import prompt_batches, prompts
from tests.tiny_models import ARCHITECTURES, tiny_model

TOKENIZER = byte_tokenizer()
PLANT_PROMPT = "plant"
PLANTED_ARCHS = ("llama", "gpt2", "gpt_neox", "gemma2", "qwen2", "olmo2")


def plant_super_weight(model: torch.nn.Module, layer: int, row: int, col: int, *, gain: float = 10.0,
                       weight: float = 8.0) -> None:
    """Make ``W_down[layer][row, col]`` a super weight, in place (this builds a fixture model; it is no
    intervention): neuron ``col``'s up (and gate) rows become ``gain`` × the unit vector of the BOS token's
    MLP input, so ``x[BOS, col]`` is huge (≈ (gain·|h|)²), and column ``col`` of ``W_down`` is zero except
    ``weight`` at ``row``, so only channel ``row`` receives the super activation."""
    adapter = ArchitectureAdapter(model)
    modules = adapter.layer(layer)
    up = modules.up_proj
    ids = torch.tensor([[TOKENIZER.bos_token_id]])
    with capture({"up": up}, what="input") as seen, torch.no_grad():
        model(input_ids=ids)
    h = seen.input("up")[0, 0]  # (hidden,)
    direction = h / h.norm()
    with torch.no_grad():
        for module in (up, modules.gate_proj):
            if module is not None:
                adapter.weight(module)[col] = gain * direction
                bias = getattr(module, "bias", None)
                if bias is not None:
                    bias[col] = 0.0
        w_down = adapter.down_proj_weight(layer)
        w_down[:, col] = 0.0
        w_down[row, col] = weight


def detect(model: torch.nn.Module, prompt: str = PLANT_PROMPT, **kwargs: object):
    return detect_super_weights(ArchitectureAdapter(model), TOKENIZER, prompt, **kwargs)


def loaded(model: torch.nn.Module, spec: str = "tiny") -> LoadedModel:
    return LoadedModel(spec=spec, source="memory", kind="memory", model=model, tokenizer=TOKENIZER,
                       dtype="float32", content_hash=f"tiny-{spec}", load_seconds=0.0)


@pytest.mark.parametrize("arch", PLANTED_ARCHS)
def test_planted_super_weight_is_found_at_its_coordinates(arch: str) -> None:
    model = tiny_model(arch)
    plant_super_weight(model, layer=1, row=5, col=17)
    found = detect(model)
    assert found.coordinates == [(1, 5, 17)], f"{arch}: expected L1[5, 17], found {found.labels()}"
    sw = found.super_weights[0]
    assert sw.weight == pytest.approx(8.0)
    assert sw.token == 0  # the BOS token, where the plant put the huge input
    assert abs(sw.activation) == pytest.approx(abs(8.0 * sw.input_activation), rel=1e-3)
    assert found.rounds[0].spike_layers == (1,)
    assert found.rounds[-1].spike_layers == ()  # zeroing it removed the spike
    assert len(found.rounds) == 2 and found.rounds[1].held_out == ((1, 5, 17),)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_unplanted_random_model_has_none(arch: str) -> None:
    found = detect(tiny_model(arch))
    assert found.super_weights == ()
    assert len(found.rounds) == 1 and len(found.rounds[0].maxima) == 3  # the evidence is still there


def test_two_planted_super_weights_are_found_in_order() -> None:
    model = _deeper_llama(6)
    plant_super_weight(model, layer=0, row=3, col=40)
    plant_super_weight(model, layer=2, row=9, col=7)
    found = detect(model, max_depth=0.5)
    assert found.coordinates == [(0, 3, 40), (2, 9, 7)]
    assert found.channels == [3, 9]


def test_max_depth_excludes_late_spikes() -> None:
    model = _deeper_llama(6)
    plant_super_weight(model, layer=4, row=3, col=40)
    assert detect(model, max_depth=0.5).super_weights == ()
    assert detect(model, max_depth=1.0).coordinates == [(4, 3, 40)]


def test_same_row_two_columns_needs_two_rounds() -> None:
    model = tiny_model("llama")
    plant_super_weight(model, layer=1, row=5, col=17)
    with torch.no_grad():  # a second huge neuron, weaker, writing into the same channel
        adapter = ArchitectureAdapter(model)
        for module in (adapter.layer(1).up_proj, adapter.layer(1).gate_proj):
            adapter.weight(module)[30] = 0.6 * adapter.weight(module)[17]
        adapter.down_proj_weight(1)[:, 30] = 0.0
        adapter.down_proj_weight(1)[5, 30] = 8.0
    found = detect(model)
    assert found.coordinates == [(1, 5, 17), (1, 5, 30)]


def test_detection_leaves_the_model_bit_identical() -> None:
    model = tiny_model("llama")
    plant_super_weight(model, layer=1, row=5, col=17)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    detect(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_batched_detection_equals_one_by_one_with_padding() -> None:
    model = tiny_model("qwen2")
    plant_super_weight(model, layer=1, row=2, col=9)
    adapter = ArchitectureAdapter(model)
    texts = ["a", "a much longer prompt with many more bytes in it", "12+3=15"]
    batched = detect_super_weights_many(adapter, TOKENIZER, texts)
    for text, got in zip(texts, batched, strict=True):
        alone = detect_super_weights(adapter, TOKENIZER, text)
        assert got.coordinates == alone.coordinates == [(1, 2, 9)]
        for a, b in zip(got.rounds[0].maxima, alone.rounds[0].maxima, strict=True):
            assert a.input_max == pytest.approx(b.input_max, rel=1e-4)
            assert a.output_max == pytest.approx(b.output_max, rel=1e-4)
            assert (a.output_token, a.output_channel) == (b.output_token, b.output_channel)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=prompt_batches(long_words=(10, 20)))
def test_planted_coordinates_are_invariant_across_prompts(batch: list[str]) -> None:
    model = _planted_llama()
    reference = _CACHE.setdefault("reference", detect(model))
    result = prompt_invariance(ArchitectureAdapter(model), TOKENIZER, batch, reference)
    assert result.moved == []
    assert result.metrics()["fraction_same"] == 1.0


@settings(max_examples=6, deadline=None)
@given(prompt=prompts())
def test_unplanted_model_has_no_super_weight_on_any_prompt(prompt: str) -> None:
    assert detect(_unplanted_gpt2(), prompt).super_weights == ()


def test_spike_criterion_uses_the_median() -> None:
    from lmaudit.checks.superweights.detect import LayerMaxima

    maxima = [LayerMaxima(i, v, 0, 0, 10 * v, 0, 0) for i, v in enumerate([1.0, 2.0, 1.5, 500.0, 1.2])]
    spikes, in_median, out_median = spike_layers(maxima, 50.0)
    assert spikes == (3,) and in_median == 1.5 and out_median == 15.0
    assert spike_layers(maxima, 400.0)[0] == ()


def test_bad_arguments_fail_before_the_model_runs() -> None:
    model = tiny_model("llama")
    for kwargs in ({"spike_factor": 1.0}, {"max_depth": 0.0}, {"max_rounds": 0}):
        with pytest.raises(LmAuditError):
            detect(model, **kwargs)
    with pytest.raises(LmAuditError):
        detect_super_weights_many(ArchitectureAdapter(model), TOKENIZER, [])


def test_finetune_invariance_fails_when_the_super_weight_moved() -> None:
    base = _planted_llama()
    moved = tiny_model("llama")
    plant_super_weight(moved, layer=1, row=5, col=23)
    reference = detect(base)
    same = finetune_invariance(ArchitectureAdapter(base), reference, ArchitectureAdapter(_planted_llama()),
                               TOKENIZER, tuned_model="copy", source="compare-model")
    assert same.metrics()["same_coordinates"] is True
    assert same.metrics()["max_relative_weight_change"] == 0.0
    broken = finetune_invariance(ArchitectureAdapter(base), reference, ArchitectureAdapter(moved), TOKENIZER,
                                 tuned_model="moved", source="compare-model")
    metrics = broken.metrics()
    assert metrics["same_coordinates"] is False
    assert metrics["tuned_coordinates"] == [[1, 5, 23]]
    assert not compare("same_coordinates", metrics["same_coordinates"], Threshold(equals=True)).passed
    values = {(c.layer, c.row, c.col): (c.base, c.tuned) for c in broken.changes}
    assert values[(1, 5, 17)][0] == pytest.approx(8.0) and values[(1, 5, 23)][1] == pytest.approx(8.0)


def test_superweights_check_pins_and_fails_on_a_broken_model() -> None:
    planted = AuditContext(model=loaded(_planted_llama()))
    result = superweights_audit(planted, SuperWeightParams(prompt=PLANT_PROMPT))
    assert result.metrics()["coordinates"] == [[1, 5, 17]]
    assert compare("coordinates", result.metrics()["coordinates"], Threshold(equals=[[1, 5, 17]])).passed
    broken = AuditContext(model=loaded(tiny_model("llama")))  # no super weight at all
    metrics = superweights_audit(broken, SuperWeightParams(prompt=PLANT_PROMPT)).metrics()
    assert metrics["n_super_weights"] == 0
    assert not compare("n_super_weights", metrics["n_super_weights"], Threshold(min=1)).passed
    assert not compare("coordinates", metrics["coordinates"], Threshold(equals=[[1, 5, 17]])).passed


# ------------------------------------------------------------------------------------------------ helpers

_CACHE: dict[str, Any] = {}


def _planted_llama() -> torch.nn.Module:
    if "planted" not in _CACHE:
        model = tiny_model("llama")
        plant_super_weight(model, layer=1, row=5, col=17)
        _CACHE["planted"] = model
    return _CACHE["planted"]


def _unplanted_gpt2() -> torch.nn.Module:
    return _CACHE.setdefault("gpt2", tiny_model("gpt2"))


def _deeper_llama(layers: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import CONFIGS

    config = CONFIGS["llama"]()
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
