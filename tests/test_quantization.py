"""Tests for lmaudit.checks.quantization.schemes: naive vs super-outlier-aware schemes on tiny models with planted structure.

Known answers come from the plant, not from a real model: a planted super weight must come back bit for bit
from the aware scheme while the naive scheme crushes its block onto one or two grid levels, and a planted
massive activation must flatten the rest of its token (per token) or sequence (per tensor) under naive W8A8.
"""

from __future__ import annotations

import math
import subprocess
import sys
from contextlib import ExitStack

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lmaudit.checks.quantization.schemes as quantization
from lmaudit.checks.core.adapter import ArchitectureAdapter, weight_out_in
from lmaudit.checks.core.hooks import capture
from lmaudit.checks.core.interventions import replace_activation, transform_inputs, transform_weights
from lmaudit.checks.quantization.quantizers import Granularity, QuantSpec, Scheme, fake_quantize
from lmaudit.checks.quantization.schemes import (
    ActivationGranularity,
    SuperOutliers,
    W8A8Scheme,
    WeightOnlyScheme,
    activation_quantizer,
    model_bytes,
    quantize_weight,
    quantized,
    recovery,
    search_clip_z,
)
from tests.tiny_models import ARCHITECTURES, assert_bit_identical, random_ids, snapshot, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


SETTINGS = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
LAYER, ROW, COL = 1, 5, 17  # the planted super weight in W_down[1] ([hidden 32, intermediate 64])
BLOCK = 256  # W_down is 32 × 64 = 2048 elements: 8 blocks; the plant (flat 5·64 + 17 = 337) is in block 1


def planted(value: float = 40.0, *, arch: str = "llama") -> tuple[torch.nn.Module, ArchitectureAdapter]:
    """A tiny model whose W_down[1][5, 17] is ``value`` (≈ 2000σ of a random init weight)."""
    model = tiny_model(arch)
    adapter = ArchitectureAdapter(model)
    with torch.no_grad():
        weight_out_in(adapter.down_proj(LAYER))[ROW, COL] = value
    return model, adapter


OUTLIERS = SuperOutliers.from_coordinates([(LAYER, ROW, COL)], token=0)
SCHEMES = [
    WeightOnlyScheme(bits=4, block_size=BLOCK),
    WeightOnlyScheme(bits=3, block_size=1000),  # does not divide 2048 or 1024: shorter last block
    W8A8Scheme(ActivationGranularity.PER_TOKEN),
    W8A8Scheme(ActivationGranularity.PER_TENSOR),
]


# ------------------------------------------------------------------------------------------------ recovery


def test_recovery_formula_on_synthetic_numbers():
    assert recovery(10.0, 30.0, 12.0) == pytest.approx(0.9)  # (30 − 12) / (30 − 10)
    assert recovery(10.0, 30.0, 10.0) == 1.0
    assert recovery(10.0, 30.0, 30.0) == 0.0
    assert recovery(10.0, 30.0, 40.0) == pytest.approx(-0.5)  # aware worse than naive
    assert recovery(10.0, 30.0, 8.0) == pytest.approx(1.1)  # aware better than full precision
    assert math.isnan(recovery(10.0, 10.0, 12.0))  # nothing to recover
    assert math.isnan(recovery(10.0, 9.0, 12.0))


# ------------------------------------------------------------------------------------------------ weights


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_planted_super_weight_restored_by_aware_and_its_block_crushed_by_naive(bits):
    model, adapter = planted()
    weight = weight_out_in(adapter.down_proj(LAYER))
    original = weight.detach().clone()
    scheme = WeightOnlyScheme(bits=bits, block_size=BLOCK)
    block = torch.zeros(original.numel(), dtype=torch.bool)
    block[BLOCK : 2 * BLOCK] = True  # block 1 holds the plant
    block = block.view_as(original)
    others = block.clone()
    others[ROW, COL] = False

    with quantized(adapter, scheme):
        naive = weight.detach().clone()
    with quantized(adapter, scheme, OUTLIERS, clip_z=None):
        aware = weight.detach().clone()

    assert aware[ROW, COL].item() == 40.0  # restored bit for bit
    # naive: Δ = (40 − min)/(2^N − 1) ≫ the block's spread (≈ 0.02·4σ), so its other 255 weights share a level
    levels = naive[others].unique()
    assert levels.numel() <= 2
    assert float((naive[others] - original[others]).norm() / original[others].norm()) > 0.9 if bits < 8 else True
    # aware: the block keeps the error of an outlier-free block: |error| ≤ Δ_clean/2 with Δ_clean from the rest
    rest = original[others]
    delta = float(rest.max() - rest.min()) / (2**bits - 1)
    assert (aware[others] - rest).abs().max() <= delta / 2 * (1 + 1e-5)
    # the other blocks do not care whether the plant is held out
    assert torch.equal(naive[~block], aware[~block])
    assert torch.equal(weight, original)  # and everything is back


def test_aware_weight_equals_clip_then_quantize_then_restore():
    torch.manual_seed(0)
    w = torch.randn(32, 64) * 0.02
    w[3, 9] = 5.0
    w[20, 1] = 0.3  # an ordinary outlier that clipping caps
    hold = torch.zeros_like(w, dtype=torch.bool)
    hold[3, 9] = True
    spec = QuantSpec(4, Scheme.ASYMMETRIC, Granularity.BLOCKWISE, 512)
    got = quantize_weight(w, spec, hold_out=hold, clip_z=3.0)
    from lmaudit.checks.quantization.quantizers import clip_outliers

    clipped = clip_outliers(w, 3.0, block_size=512)
    clipped[3, 9] = w[3, 9]
    expected = fake_quantize(clipped, spec, hold_out=hold)
    assert torch.equal(got, expected)
    assert got[3, 9].item() == 5.0
    assert got[20, 1].item() < 0.3  # clipped (then quantized)
    assert torch.equal(quantize_weight(w, spec), fake_quantize(w, spec))  # naive = plain RTN
    assert torch.equal(quantize_weight(w, spec, clip_z=math.inf), fake_quantize(w, spec))


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label)
@pytest.mark.parametrize("aware", [False, True])
def test_state_bit_identical_after_every_scheme(scheme, aware):
    model, adapter = planted()
    ids = random_ids(2, 9)
    before = snapshot(model)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    clip = 3.0 if aware and isinstance(scheme, WeightOnlyScheme) else None
    with quantized(adapter, scheme, OUTLIERS if aware else None, clip_z=clip), torch.no_grad():
        changed = model(input_ids=ids).logits
    assert not torch.equal(changed, reference)  # the scheme did something
    assert_bit_identical(model, before)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference)  # and no hook is left behind


def test_state_restored_when_the_block_raises():
    model, adapter = planted()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"), quantized(adapter, SCHEMES[2], OUTLIERS):
        raise RuntimeError("boom")
    assert_bit_identical(model, before)


def test_weights_are_quantized_once_not_per_forward(monkeypatch):
    model, adapter = planted()
    calls = []
    real = quantization.quantize_weight
    monkeypatch.setattr(quantization, "quantize_weight", lambda *a, **k: calls.append(1) or real(*a, **k))
    with quantized(adapter, W8A8Scheme(), OUTLIERS), torch.no_grad():
        for _ in range(3):
            model(input_ids=random_ids(1, 5))
    assert len(calls) == len(adapter.decoder_linears())  # 3 layers × 7 Linears, each once


# ------------------------------------------------------------------------------------------------ activations


def _down_proj_inputs(adapter, scheme, outliers, value):
    """(raw, quantized) input of the planted layer's down projection with a massive activation x[:, 0, COL]."""
    name = "down"
    module = {name: adapter.down_proj(LAYER)}
    ids = random_ids(2, 12)
    with replace_activation(adapter, LAYER, 0, COL, value, site="neurons"), \
            capture(module, what="input") as raw, \
            quantized(adapter, scheme, outliers), \
            capture(module, what="input") as seen, torch.no_grad():
        adapter.model(input_ids=ids)
    return raw.input(name), seen.input(name)  # (2, 12, 64) each


@pytest.mark.parametrize("granularity", list(ActivationGranularity))
def test_planted_super_activation_held_out_by_aware_w8a8(granularity):
    model, adapter = planted()
    scheme = W8A8Scheme(granularity)
    raw, naive = _down_proj_inputs(adapter, scheme, None, 1000.0)
    raw_a, aware = _down_proj_inputs(adapter, scheme, OUTLIERS, 1000.0)
    assert (raw[:, 0, COL] == 1000.0).all() and (raw_a[:, 0, COL] == 1000.0).all()
    small = raw.clone()
    small[:, 0, COL] = 0.0
    assert small.abs().max() < 1000.0 / 127 / 2  # so naive rounds everything else to 0
    crushed = naive.clone()
    crushed[:, 0, COL] = 0.0
    if granularity is ActivationGranularity.PER_TOKEN:
        assert (crushed[:, 0] == 0).all()  # token 0 flattened ...
        assert (crushed[:, 1:] != 0).any()  # ... the other tokens keep their own scale
    else:
        assert (crushed == 0).all()  # one scale per sequence: the whole sequence flattened
    assert naive[:, 0, COL].eq(1000.0).all()  # the max sits on the grid's end point
    # aware: the massive activation comes back bit for bit, the rest keeps an outlier-free scale
    assert torch.equal(aware[:, 0, COL], raw_a[:, 0, COL])
    rest = raw_a.clone()
    rest[:, 0, COL] = 0.0
    dims = -1 if granularity is ActivationGranularity.PER_TOKEN else (-2, -1)
    delta = rest.abs().amax(dim=dims, keepdim=True) / 127
    err = (aware - raw_a).abs()
    err[:, 0, COL] = 0.0
    assert (err <= delta / 2 * (1 + 1e-5) + 1e-12).all()


@SETTINGS
@given(
    rows=st.integers(1, 6), cols=st.integers(3, 40), seed=st.integers(0, 2**31 - 1),
    n_held=st.integers(1, 3), granularity=st.sampled_from(list(ActivationGranularity)),
    scale=st.sampled_from([1e-2, 1.0, 1e3]),
)
def test_replace_by_median_quantize_restore_equals_hold_out(rows, cols, seed, n_held, granularity, scale):
    """The paper's REPLACE (by the group's median) → Q → Q⁻¹ → RESTORE equals fake_quantize with hold_out,
    because the median lies within [min, max] of the group's other elements (fewer than half are held)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, rows, cols, generator=gen) * scale
    positions = sorted({(int(torch.randint(0, rows, (), generator=gen)), int(torch.randint(0, cols, (), generator=gen)))
                        for _ in range(n_held)})
    for t, c in positions:
        x[:, t, c] = 500.0 * scale  # massive
    spec = QuantSpec(8, Scheme.SYMMETRIC, Granularity.PER_CHANNEL)
    got = activation_quantizer(spec, granularity, positions)(x)

    # literal paper procedure, group by group
    groups = x.reshape(-1, cols) if granularity is ActivationGranularity.PER_TOKEN else x.reshape(2, -1)
    mask = torch.zeros_like(x, dtype=torch.bool)
    for t, c in positions:
        mask[:, t, c] = True
    mask = mask.reshape(groups.shape)
    expected = groups.clone()
    for g in range(groups.shape[0]):
        if mask[g].sum() * 2 >= mask.shape[1]:
            return  # too many held out for the median argument; not a case the schemes produce
        replaced = groups[g].clone()
        replaced[mask[g]] = groups[g].median()
        q = fake_quantize(replaced, QuantSpec(8, Scheme.SYMMETRIC, Granularity.PER_TENSOR))
        expected[g] = torch.where(mask[g], groups[g], q)
    assert torch.equal(got, expected.reshape(x.shape))


def test_shared_input_is_quantized_once_and_in_place_edits_invalidate():
    fn = activation_quantizer(QuantSpec(8, "symmetric", "per_channel"), ActivationGranularity.PER_TOKEN)
    x = torch.randn(1, 4, 8)
    first = fn(x)
    assert fn(x) is first  # q/k/v read the same tensor: one quantization
    assert fn(x.clone()) is not first and torch.equal(fn(x.clone()), first)
    x.mul_(2)
    assert torch.equal(fn(x), fake_quantize(x, QuantSpec(8, "symmetric", "per_channel")))


def test_hold_positions_beyond_the_sequence_are_ignored():
    fn = activation_quantizer(QuantSpec(8, "symmetric", "per_channel"), ActivationGranularity.PER_TOKEN, [(50, 2)])
    x = torch.randn(1, 4, 8)
    assert torch.equal(fn(x), fake_quantize(x, QuantSpec(8, "symmetric", "per_channel")))


# ------------------------------------------------------------------------------------------------ fast vs reference


def reference_rtn(w: torch.Tensor, bits: int, hold: torch.Tensor | None) -> torch.Tensor:
    """Per-tensor asymmetric min-max RTN written out: Δ = (max − min)/(2^N − 1) over the non-held elements,
    q = clamp(round((w − min)/Δ), 0, 2^N − 1), w_q = q·Δ + min (the top code is max itself), held restored."""
    keep = torch.ones_like(w, dtype=torch.bool) if hold is None else ~hold
    lo, hi = w[keep].min(), w[keep].max()
    qmax = 2**bits - 1
    delta = (hi - lo) / qmax
    q = torch.clamp(torch.round((w - lo) / delta), 0, qmax)
    return torch.where(keep, torch.where(q == qmax, hi, q * delta + lo), w)


def reference_activations(x: torch.Tensor, per_token: bool, hold: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """The paper's procedure, one group at a time and without any caching: REPLACE the held (token, channel)
    entries by the median of their group, symmetric absmax RTN to 8 bits, RESTORE the held entries."""
    batch, tokens, features = x.shape
    mask = torch.zeros_like(x, dtype=torch.bool)
    for token, channel in hold:
        if token < tokens:
            mask[:, token, channel] = True
    groups = x.reshape(batch * tokens, features) if per_token else x.reshape(batch, tokens * features)
    held = mask.reshape(groups.shape)
    out = torch.empty_like(groups)
    for i in range(groups.shape[0]):
        row = groups[i].clone()
        row[held[i]] = groups[i].median()  # REPLACE
        delta = row.abs().max() / 127
        safe = delta if delta > 0 else torch.tensor(1.0)
        q = torch.clamp(torch.round(row / safe), -127, 127) * safe
        out[i] = torch.where(held[i], groups[i], q)  # RESTORE
    return out.reshape(x.shape)


@pytest.mark.parametrize("granularity", list(ActivationGranularity))
@pytest.mark.parametrize("aware", [False, True])
def test_fast_w8a8_forward_is_bit_identical_to_the_straightforward_reference(granularity, aware):
    """The fast path (vectorised quantizer, one quantization shared by q/k/v and by gate/up, single-threaded)
    against the reference: each Linear quantizes its own input group by group with the literal median
    REPLACE/RESTORE, weights by the written-out formula. Same float32 operations, so the logits agree bit for
    bit; a massive activation is planted at the held position so that holding it out matters."""
    model, adapter = planted()
    scheme = W8A8Scheme(granularity)
    outliers = OUTLIERS if aware else None
    ids = random_ids(2, 11, seed=5)
    masks = outliers.weight_masks(adapter) if outliers else {}
    positions = outliers.activation_positions(adapter) if outliers else {}
    per_token = granularity is ActivationGranularity.PER_TOKEN
    with replace_activation(adapter, LAYER, 0, COL, 300.0, site="neurons"):
        with quantized(adapter, scheme, outliers), torch.no_grad():
            fast = model(input_ids=ids).logits
        with ExitStack() as stack, torch.no_grad():
            for module in adapter.decoder_linears().values():
                stack.enter_context(transform_weights([module], lambda w, out, m=module: out.copy_(reference_rtn(w, 8, masks.get(m)))))
                stack.enter_context(transform_inputs(
                    [module], lambda x, m=module: reference_activations(x, per_token, positions.get(m, ()))))
            reference = model(input_ids=ids).logits
        with torch.no_grad():
            plain = model(input_ids=ids).logits
    assert not torch.equal(fast, plain)  # the scheme did something
    assert torch.equal(fast, reference)


# ------------------------------------------------------------------------------------------------ z search, memory


def test_search_clip_z_picks_the_lowest_calibration_nll():
    model, adapter = planted()
    calibration = random_ids(2, 17, seed=3)
    search = search_clip_z(adapter, WeightOnlyScheme(bits=3, block_size=BLOCK), OUTLIERS, calibration,
                           candidates=(math.inf, 6.0, 2.0, 0.5))
    assert search.candidates == (math.inf, 6.0, 2.0, 0.5)
    assert len(search.calibration_nll) == 4 and all(math.isfinite(v) for v in search.calibration_nll)
    assert search.z == search.candidates[search.calibration_nll.index(min(search.calibration_nll))]
    assert search.calibration_tokens == 2 * 16
    assert search_clip_z(adapter, WeightOnlyScheme(bits=3, block_size=BLOCK), OUTLIERS, calibration,
                         candidates=(math.inf,)).z == math.inf


def test_memory_meter_sees_an_allocation():
    """In a fresh process: in this long-lived test process the allocator may reuse pages that earlier tests freed,
    so a new tensor need not raise RSS at all (seen in the full suite)."""
    code = (
        "import time, torch\n"
        "from lmaudit.checks.quantization.schemes import MemoryMeter\n"
        "with MemoryMeter() as meter:\n"
        "    block = torch.ones(16 * 2**20)  # 64 MiB, touched\n"
        "    block.add_(1)\n"
        "    time.sleep(0.1)  # hold it for 20 sampling intervals: the meter samples RSS\n"
        "    del block\n"
        "use = meter.use(100 * 2**20, 0)\n"
        "print(use.rss_peak_bytes - use.rss_start_bytes, use.peak_bytes, use.model_bytes, use.rss_peak_bytes,"
        " use.rss_start_bytes, use.peak_ratio)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    grew, peak, model, rss_peak, rss_start, ratio = (float(x) for x in out)
    assert grew >= 48 * 2**20
    assert peak == model + rss_peak - rss_start
    assert ratio == pytest.approx(peak / model)


def test_model_bytes_counts_tied_weights_once():
    model = tiny_model("llama")
    model.tie_weights()
    distinct = {p.untyped_storage().data_ptr(): p.numel() * 4 for p in [*model.parameters(), *model.buffers()]}
    assert model_bytes(model) == sum(distinct.values())


def test_super_outliers_from_detection_and_validation():
    class SW:
        def __init__(self, coords, token):
            self.coordinates, self.token = coords, token

    class Detection:
        super_weights = (SW((11, 507, 1229), 0), SW((11, 507, 1487), 0))

    found = SuperOutliers.from_detection(Detection())
    assert found.weights == ((11, 507, 1229), (11, 507, 1487)) and found.tokens == (0, 0)
    with pytest.raises(ValueError, match="token positions"):
        SuperOutliers(((1, 2, 3),), ())
    with pytest.raises(ValueError, match="clip_z applies"), quantized(planted()[1], W8A8Scheme(), OUTLIERS, clip_z=3.0):
        pass


def test_super_outliers_from_the_super_weight_areas_sites():
    from lmaudit.checks.core.outliers import SuperActivation, SuperWeightSites

    sites = SuperWeightSites(((11, 507, 1229), (11, 507, 1487), (20, 3, 9)),
                             (SuperActivation(11, 2, 507, -300.0),), "detector")
    found = SuperOutliers.from_sites(sites)
    assert found.weights == ((11, 507, 1229), (11, 507, 1487), (20, 3, 9))
    assert found.tokens == (2, 2, 0)  # the token of the super activation each writes; 0 when none is recorded
    assert bool(found) and not SuperOutliers.from_sites(SuperWeightSites((), ()))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_is_quantized_with_its_super_weight_held_out_and_restored(arch):
    """Audit any model: every supported architecture (GPT-2's transposed Conv1D, fused gate_up, sandwich norms)
    goes through both schemes, the held-out weight keeps its value inside, and the model comes back bit for bit."""
    model = tiny_model(arch)
    adapter = ArchitectureAdapter(model)
    before = snapshot(model)
    ids = random_ids(2, 9)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    outliers = SuperOutliers.from_coordinates([(LAYER, 3, 5)])
    held = adapter.down_proj_weight(LAYER)[3, 5].item()
    for scheme, clip in ((WeightOnlyScheme(bits=4, block_size=64), 3.0), (W8A8Scheme(ActivationGranularity.PER_TENSOR), None)):
        with quantized(adapter, scheme, outliers, clip_z=clip), torch.no_grad():
            assert adapter.down_proj_weight(LAYER)[3, 5].item() == held
            assert not torch.equal(model(input_ids=ids).logits, reference)
    assert_bit_identical(model, before)
