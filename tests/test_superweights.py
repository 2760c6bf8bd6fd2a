"""Super-weight detection on tiny models with planted super weights: found at their exact coordinates on every
architecture family (sandwich norms included), confirmed causally, late massive activations reported apart, none
on unplanted models, NaN raised, and the premise missing said by every dependent check.

The planting helpers here are shared with the other super-weight tests (and the offload tests)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from lmaudit.checks.core.adapter import ArchitectureAdapter
from lmaudit.checks.core.errors import LmAuditError, NonFiniteOutputError, PremiseMissing
from lmaudit.checks.core.hooks import capture
from lmaudit.checks.core.loading import LoadedModel
from lmaudit.checks.core.outliers import SuperWeightSites
from lmaudit.checks.harness.context import AuditContext
from lmaudit.checks.superweights.checks import DetectionParams, superweights_audit
from lmaudit.checks.superweights.detect import (
    DetectionSettings,
    LayerMaxima,
    detect,
    detect_many,
    spike_layers,
)
from tests.checkpoints import byte_tokenizer
from tests.strategies_prompts import prompt_batches
from tests.tiny_models import CONFIGS, assert_bit_identical, snapshot, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER = byte_tokenizer()
PLANT_PROMPT = "plant"
PLANTED_ARCHS = ("llama", "gpt2", "gpt_neox", "qwen2", "gemma2", "gemma3_text", "olmo2")
POST_NORM_GAIN = 100.0  # effective gain of a planted row in a post-FFN norm
ROW, COL, DC = 5, 17, 11  # super activation channel, neuron, DC channel of the everywhere plant


# ------------------------------------------------------------------------------------------------ planting


def _post_norm_gain(adapter: ArchitectureAdapter, layer: int, row: int, gain: float) -> None:
    """Make the post-FFN norm (sandwich norms) pass channel ``row`` with ``gain`` times its normalised value, so
    that what the layer writes into the residual stream carries the spike. Works for ``w·x̂`` and ``(1 + w)·x̂``."""
    norm = adapter.layer(layer).post_ffn_norm
    if norm is None:
        return
    probe = torch.zeros(1, 1, adapter.hidden_size)
    probe[..., row] = 1.0
    with torch.no_grad():
        norm.weight[row] = 0.0
        at_zero = float(norm(probe)[0, 0, row])
        norm.weight[row] = 1.0
        slope = float(norm(probe)[0, 0, row]) - at_zero  # = the normalised value x̂[row] of the probe
        norm.weight[row] = (gain * slope - at_zero) / slope


def _make_neuron_write_only(adapter: ArchitectureAdapter, layer: int, row: int, col: int, weight: float) -> None:
    """Column ``col`` of ``W_down`` is zero except ``weight`` at ``row``, and row ``row`` is zero except at ``col``:
    only neuron ``col`` writes channel ``row`` (so zeroing the weight empties the channel)."""
    with torch.no_grad():
        w_down = adapter.down_proj_weight(layer)
        w_down[:, col] = 0.0
        w_down[row, :] = 0.0
        w_down[row, col] = weight
    _post_norm_gain(adapter, layer, row, POST_NORM_GAIN)


def _fire_along(adapter: ArchitectureAdapter, layer: int, col: int, direction: torch.Tensor, gain: float) -> None:
    """Neuron ``col``'s up (and gate) rows become ``gain · direction`` (its pre-activation is then huge on inputs
    along ``direction``)."""
    modules = adapter.layer(layer)
    with torch.no_grad():
        for module in (modules.up_proj, modules.gate_proj):
            if module is not None:
                adapter.weight(module)[col] = gain * direction
                bias = getattr(module, "bias", None)
                if bias is not None:
                    bias[col] = 0.0


def plant_super_weight(model: torch.nn.Module, layer: int, row: int, col: int, *, gain: float = 10.0,
                       weight: float = 8.0, bos_channel: int | None = None) -> None:
    """Make ``W_down[layer][row, col]`` a super weight, in place (a fixture model; not an intervention): neuron
    ``col`` fires hugely on the BOS token's MLP input (x[BOS, col] ≈ (gain·|h|)²) and alone writes channel
    ``row`` with ``weight``, so the BOS token carries a super activation in ``row`` from ``layer`` on.

    ``bos_channel`` is for models without a norm in front of the MLP (OLMo 2), whose MLPs read the raw residual
    stream: the BOS embedding becomes a large vector along that channel (so only BOS fires the neuron), and the
    later layers' MLPs stop reading that channel and ``row`` (as trained models do not blow up on them)."""
    adapter = ArchitectureAdapter(model)
    if bos_channel is not None:
        _distinct_bos(adapter, layer, row, bos_channel)
    up = adapter.layer(layer).up_proj
    with capture({"up": up}, what="input") as seen, torch.no_grad():
        model(input_ids=torch.tensor([[TOKENIZER.bos_token_id]]))
    h = seen.input("up")[0, 0]  # (hidden,)
    _fire_along(adapter, layer, col, h / h.norm(), gain)
    _make_neuron_write_only(adapter, layer, row, col, weight)


def plant_everywhere(model: torch.nn.Module, *, layer: int = 1, dc: float = 1.0, weight: float = 8.0) -> None:
    """Every token's embedding gets ``dc`` in channel DC; neuron COL of ``layer`` reads it (so it fires at every
    position) and alone writes channel ROW: a super activation of ``weight``·x at every position."""
    adapter = ArchitectureAdapter(model)
    with torch.no_grad():
        adapter.embedding.weight[:, DC] += dc
    direction = torch.zeros(adapter.hidden_size)
    direction[DC] = 1.0
    _fire_along(adapter, layer, COL, direction, 10.0)
    _make_neuron_write_only(adapter, layer, ROW, COL, weight)


def _distinct_bos(adapter: ArchitectureAdapter, layer: int, row: int, channel: int) -> None:
    with torch.no_grad():
        embedding = adapter.embedding.weight[TOKENIZER.bos_token_id]
        embedding.zero_()
        embedding[channel] = 50.0
        for later in range(layer + 1, adapter.n_layers):
            for module in (adapter.layer(later).up_proj, adapter.layer(later).gate_proj):
                if module is not None:
                    adapter.weight(module)[:, [channel, row]] = 0.0


def plant_canceller(model: torch.nn.Module, layer: int, row: int, col: int, *, source_layer: int) -> None:
    """A late massive activation that is *not* a super weight: neuron ``col`` of ``layer`` fires on the BOS
    token's MLP input there (which carries the super activation planted at ``source_layer``) and writes minus
    that super activation into ``row``, cancelling it (what late layers of real models do before the output)."""
    adapter = ArchitectureAdapter(model)
    ids = torch.tensor([[TOKENIZER.bos_token_id]])
    with capture({"up": adapter.layer(layer).up_proj}, what="input") as seen, torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    h = seen.input("up")[0, 0]
    _fire_along(adapter, layer, col, h / h.norm(), 10.0)
    with capture({"down": adapter.down_proj(layer)}, what="input") as seen, torch.no_grad():
        model(input_ids=ids)
    x = float(seen.input("down")[0, 0, col])
    residual = float(out.hidden_states[layer + 1][0, 0, row])
    with torch.no_grad():
        w_down = adapter.down_proj_weight(layer)
        w_down[:, col] = 0.0
        w_down[row, col] = -residual / x


def deeper(architecture: str, layers: int) -> torch.nn.Module:
    """A tiny random model of ``architecture`` with ``layers`` decoder layers."""
    from transformers import AutoModelForCausalLM

    config = CONFIGS[architecture]()
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def loaded(model: torch.nn.Module, spec: str = "tiny") -> LoadedModel:
    return LoadedModel.from_model(model, TOKENIZER, spec=spec, content_hash=f"tiny-{spec}")


def find(model: torch.nn.Module, prompt: str = PLANT_PROMPT, **kwargs: Any):
    return detect(loaded(model), prompt, **kwargs)


_CACHE: dict[str, Any] = {}


def planted_llama() -> torch.nn.Module:
    if "planted" not in _CACHE:
        model = tiny_model("llama")
        plant_super_weight(model, layer=1, row=5, col=17)
        _CACHE["planted"] = model
    return _CACHE["planted"]


# ------------------------------------------------------------------------------------------------ detection


@pytest.mark.parametrize("arch", PLANTED_ARCHS)
def test_planted_super_weight_is_found_at_its_coordinates(arch: str) -> None:
    model = tiny_model(arch)
    # OLMo 2 normalises after the MLP, not before: its MLPs read the raw residual stream (plant_super_weight)
    plant_super_weight(model, layer=1, row=5, col=17, bos_channel=11 if arch == "olmo2" else None)
    found = find(model)
    assert found.coordinates == [(1, 5, 17)], f"{arch}: expected L1[5, 17], found {found.labels()}"
    sw = found.super_weights[0]
    assert sw.weight == pytest.approx(8.0)
    assert sw.token == 0  # the BOS token, where the plant put the huge input
    assert sw.contribution == pytest.approx(8.0 * sw.input_activation, rel=1e-4)
    assert sw.collapse >= DetectionSettings().collapse_factor
    assert found.rounds[0].spike_layers == (1,)
    assert found.rounds[-1].spike_layers == ()  # zeroing it removed the spike
    assert found.massive_activations == ()


def test_sandwich_norm_spike_is_measured_after_the_post_ffn_norm() -> None:
    # Without the post-FFN norm's gain the down projection spikes but what the layer writes does not: no candidate.
    model = tiny_model("olmo2")
    plant_super_weight(model, layer=1, row=5, col=17, bos_channel=11)
    adapter = ArchitectureAdapter(model)
    with torch.no_grad():
        adapter.layer(1).post_ffn_norm.weight.fill_(1.0)
    assert find(model).super_weights == ()


@pytest.mark.parametrize("arch", ("llama", "gpt2", "gemma3_text"))
def test_unplanted_random_model_has_none_and_says_why(arch: str) -> None:
    found = find(tiny_model(arch))
    assert found.super_weights == ()
    assert len(found.rounds) == 1 and len(found.rounds[0].maxima) == 3  # the evidence is still there
    with pytest.raises(PremiseMissing, match="no layer spiked"):
        found.require()


def test_two_planted_super_weights_in_two_layers() -> None:
    model = deeper("llama", 6)
    plant_super_weight(model, layer=0, row=3, col=40)
    plant_super_weight(model, layer=2, row=9, col=7)
    found = find(model)
    assert sorted(found.coordinates) == [(0, 3, 40), (2, 9, 7)]
    assert found.channels == [3, 9]


def test_super_weight_in_any_layer_is_found_no_depth_cut() -> None:
    model = deeper("llama", 6)
    plant_super_weight(model, layer=4, row=3, col=40)
    assert find(model).coordinates == [(4, 3, 40)]


def test_two_weights_writing_one_super_activation_are_confirmed_together() -> None:
    model = tiny_model("llama")
    plant_super_weight(model, layer=1, row=5, col=17)
    adapter = ArchitectureAdapter(model)
    with torch.no_grad():  # a second, weaker huge neuron writing the same channel
        for module in (adapter.layer(1).up_proj, adapter.layer(1).gate_proj):
            adapter.weight(module)[30] = 0.8 * adapter.weight(module)[17]
        adapter.down_proj_weight(1)[:, 30] = 0.0
        adapter.down_proj_weight(1)[5, 30] = 8.0
    found = find(model)
    assert found.coordinates == [(1, 5, 17), (1, 5, 30)]  # by contribution, largest first
    assert [t.confirmed for t in found.tests] == [False, True]  # zeroing one alone leaves a big spike
    assert found.tests[1].zeroed == ((1, 5, 17), (1, 5, 30))


def test_a_confirmed_row_that_still_spikes_keeps_its_remaining_writers() -> None:
    model = tiny_model("llama")
    plant_super_weight(model, layer=1, row=5, col=17)
    adapter = ArchitectureAdapter(model)
    with torch.no_grad():  # neuron 30: 1/16 of neuron 17's contribution, still a spike on its own
        for module in (adapter.layer(1).up_proj, adapter.layer(1).gate_proj):
            adapter.weight(module)[30] = 0.25 * adapter.weight(module)[17]
        adapter.down_proj_weight(1)[:, 30] = 0.0
        adapter.down_proj_weight(1)[5, 30] = 8.0
    found = find(model)
    assert found.coordinates == [(1, 5, 17), (1, 5, 30)]
    assert [(t.confirmed, t.still_spiking) for t in found.tests] == [(True, True), (True, False)]
    assert found.tests[1].zeroed == ((1, 5, 17), (1, 5, 30))  # each weight zeroed once


def test_column_is_chosen_by_contribution_not_by_input() -> None:
    model = tiny_model("llama")
    plant_super_weight(model, layer=1, row=5, col=17, weight=8.0)
    adapter = ArchitectureAdapter(model)
    with torch.no_grad():  # neuron 30 fires harder than 17 but writes channel 5 with a tiny weight
        for module in (adapter.layer(1).up_proj, adapter.layer(1).gate_proj):
            adapter.weight(module)[30] = 1.5 * adapter.weight(module)[17]
        adapter.down_proj_weight(1)[:, 30] = 0.0
        adapter.down_proj_weight(1)[5, 30] = 0.01
    found = find(model)
    assert found.rounds[0].maxima[1].input_channel == 30
    assert found.coordinates[0] == (1, 5, 17)


def test_planted_late_canceller_is_a_massive_activation_not_a_super_weight() -> None:
    model = deeper("llama", 5)
    plant_super_weight(model, layer=1, row=5, col=17)
    plant_canceller(model, layer=3, row=5, col=21, source_layer=1)
    found = find(model)
    assert found.coordinates == [(1, 5, 17)]
    late = [(m.layer, m.row, m.cols) for m in found.massive_activations]
    assert late == [(3, 5, (21,))], found.massive_activations
    assert found.massive_activations[0].collapse < 1  # zeroing it makes the residual spike *grow*


def test_a_spike_in_the_last_layer_cannot_persist() -> None:
    model = tiny_model("llama")
    plant_super_weight(model, layer=2, row=5, col=17)  # the last of 3 layers
    found = find(model)
    assert found.super_weights == ()
    assert [(m.layer, m.row) for m in found.massive_activations] == [(2, 5)]
    with pytest.raises(PremiseMissing, match="last layer"):
        found.require()


def test_detection_leaves_the_model_bit_identical() -> None:
    model = planted_llama()
    before = snapshot(model)
    find(model)
    assert_bit_identical(model, before)


def test_batched_detection_equals_one_by_one_with_padding() -> None:
    model = tiny_model("qwen2")
    plant_super_weight(model, layer=1, row=2, col=9)
    texts = ["a", "a much longer prompt with many more bytes in it", "12+3=15"]
    batched = detect_many(loaded(model), texts)
    for text, got in zip(texts, batched, strict=True):
        alone = find(model, text)
        assert got.coordinates == alone.coordinates == [(1, 2, 9)]
        for a, b in zip(got.rounds[0].maxima, alone.rounds[0].maxima, strict=True):
            assert a.input_max == pytest.approx(b.input_max, rel=1e-4)
            assert a.output_max == pytest.approx(b.output_max, rel=1e-4)
            assert (a.output_token, a.output_channel) == (b.output_token, b.output_channel)


def test_nan_in_the_model_raises_instead_of_reporting_none() -> None:
    model = tiny_model("llama")
    with torch.no_grad():
        ArchitectureAdapter(model).down_proj_weight(1)[3, 4] = float("nan")
    with pytest.raises(NonFiniteOutputError, match="layer 1"):
        find(model)


def test_spike_criterion_uses_the_median() -> None:
    maxima = [LayerMaxima(i, v, 0, 0, 10 * v, 0, 0) for i, v in enumerate([1.0, 2.0, 1.5, 500.0, 1.2])]
    spikes, in_median, out_median = spike_layers(maxima, 50.0)
    assert spikes == (3,) and in_median == 1.5 and out_median == 15.0
    assert spike_layers(maxima, 400.0)[0] == ()


@pytest.mark.parametrize("kwargs", [{"spike_factor": 1.0}, {"collapse_factor": 0.5}, {"confirm_layers": 0},
                                    {"max_super_weights": 0}])
def test_bad_settings_fail_before_the_model_runs(kwargs: dict[str, Any]) -> None:
    with pytest.raises(LmAuditError):
        DetectionSettings(**kwargs)


def test_empty_prompt_list_fails() -> None:
    with pytest.raises(LmAuditError):
        detect_many(loaded(tiny_model("llama")), [])


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=prompt_batches(long_words=(10, 20)))
def test_planted_coordinates_hold_on_every_prompt_with_bos(batch: list[str]) -> None:
    found = detect_many(loaded(planted_llama()), batch)
    assert all(d.coordinates == [(1, 5, 17)] for d in found), [d.labels() for d in found]


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=prompt_batches(long_words=(10, 20)))
def test_a_super_weight_firing_on_every_token_is_found_without_bos_whatever_comes_first(batch: list[str]) -> None:
    if "everywhere" not in _CACHE:
        _CACHE["everywhere"] = tiny_model("llama")
        plant_everywhere(_CACHE["everywhere"])
    found = detect_many(loaded(_CACHE["everywhere"], "everywhere"), batch, bos=False)
    assert all(d.coordinates == [(1, ROW, COL)] and not d.bos for d in found), [d.labels() for d in found]


# ------------------------------------------------------------------------------------------------ the checks


def test_directory_check_and_provider_on_a_planted_model() -> None:
    context = AuditContext(model=loaded(planted_llama()))
    result = superweights_audit(context, DetectionParams(prompt=PLANT_PROMPT))
    metrics = result.metrics()
    assert metrics["coordinates"] == [[1, 5, 17]] and metrics["first_layer_fraction"] == pytest.approx(1 / 3)
    assert metrics["min_collapse"] >= 10 and metrics["n_massive_activations"] == 0
    sites = context.require(SuperWeightSites)  # default prompt: the plant fires on BOS, on every prompt
    assert sites.coordinates == ((1, 5, 17),) and sites.activations[0].token == 0


def test_no_super_weight_skips_the_directory_and_empties_the_sites_with_the_reason() -> None:
    context = AuditContext(model=loaded(tiny_model("llama"), "unplanted"))
    with pytest.raises(PremiseMissing, match="no confirmed super weight: no layer spiked"):
        superweights_audit(context, DetectionParams())
    sites = context.require(SuperWeightSites)
    assert not sites and "no layer spiked" in sites.description


def test_sites_report_only_confirmed_super_weights() -> None:
    model = deeper("llama", 5)
    plant_super_weight(model, layer=1, row=5, col=17)
    plant_canceller(model, layer=3, row=5, col=21, source_layer=1)
    sites = AuditContext(model=loaded(model, "canceller")).require(SuperWeightSites)
    assert sites.coordinates == ((1, 5, 17),)
    assert not math.isnan(sites.activations[0].value)
