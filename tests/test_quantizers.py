"""Property tests for lmaudit.checks.quantization.quantizers (fake RTN quantizers with super outliers held out).

The group statistics are recomputed here independently of the implementation (scatter-reduce over explicit
group ids instead of reshaped views), so the partial last block and the hold-out exclusion are checked
against an oracle, not against the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lmaudit.checks.quantization.quantizers import (
    Granularity,
    QuantizationError,
    QuantSpec,
    Scheme,
    clip_outliers,
    fake_quantize,
    group_ids,
    quantization_step,
)

EPS32 = torch.finfo(torch.float32).eps
TINY32 = torch.finfo(torch.float32).tiny  # smallest normal float32
SETTINGS = settings(deadline=None, max_examples=80, suppress_health_check=[HealthCheck.too_slow])
pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: intra-op threads only cost time


# --------------------------------------------------------------------------------------------------------------
# strategies


@st.composite
def tensors(draw, max_side: int = 64) -> torch.Tensor:
    """float32 matrices 1..64 × 1..64: Gaussian at several scales, or hypothesis-chosen (sparse, edge-case)
    finite values, plus 0-3 planted outliers up to 1e30 in magnitude."""
    shape = (draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))
    if draw(st.booleans()):
        seed = draw(st.integers(0, 2**32 - 1))
        scale = draw(st.sampled_from([1e-3, 0.02, 1.0, 50.0]))
        shift = draw(st.sampled_from([0.0, 0.0, 3.0, -1e3]))
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale + shift
    else:
        elements = st.floats(
            -1e4, 1e4, width=32, allow_nan=False, allow_infinity=False, allow_subnormal=False
        )
        x = torch.from_numpy(draw(hnp.arrays(np.float32, shape, elements=elements)).copy())
    flat = x.view(-1)
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, flat.numel() - 1))
        magnitude = draw(st.floats(1e2, 1e30))  # rounded to float32 on assignment
        flat[i] = magnitude if draw(st.booleans()) else -magnitude
    return x


@st.composite
def specs(draw, numel: int) -> QuantSpec:
    bits = draw(st.sampled_from([2, 3, 4, 8, 16]) | st.integers(2, 16))
    scheme = draw(st.sampled_from(Scheme))
    granularity = draw(st.sampled_from(Granularity))
    block = None
    if granularity is Granularity.BLOCKWISE:
        # small blocks, blocks around numel (dividing it or not), and the paper-like power-of-two sizes
        block = draw(st.integers(1, 70) | st.integers(1, numel + 5) | st.sampled_from([64, 256, 1024, 4096]))
    return QuantSpec(bits, scheme, granularity, block)


def hold_mask(draw, x: torch.Tensor) -> torch.Tensor:
    """A few held-out positions, often including the largest |x| (the 'super outlier')."""
    mask = torch.zeros(x.shape, dtype=torch.bool)
    idx = draw(st.lists(st.integers(0, x.numel() - 1), max_size=5))
    if draw(st.booleans()):
        idx.append(int(x.abs().argmax()))
    mask.view(-1)[idx] = True
    return mask


# --------------------------------------------------------------------------------------------------------------
# independent oracle


def ref_group_ids(shape: tuple[int, ...], spec: QuantSpec) -> torch.Tensor:
    numel = math.prod(shape)
    length = {
        Granularity.PER_TENSOR: numel,
        Granularity.PER_CHANNEL: shape[-1],
        Granularity.BLOCKWISE: spec.block_size,
    }[spec.granularity]
    return torch.arange(numel) // length


def ref_stats(x: torch.Tensor, spec: QuantSpec, hold: torch.Tensor | None = None):
    """Per-element (group id, Δ, group max|x|, group min) from the non-held elements, via scatter-reduce."""
    flat = x.reshape(-1).float()
    gid = ref_group_ids(tuple(x.shape), spec)
    keep = torch.ones_like(gid, dtype=torch.bool) if hold is None else ~hold.reshape(-1)
    n = int(gid.max()) + 1
    lo = torch.full((n,), math.inf).scatter_reduce(0, gid[keep], flat[keep], "amin")
    hi = torch.full((n,), -math.inf).scatter_reduce(0, gid[keep], flat[keep], "amax")
    empty = torch.isinf(lo) & torch.isinf(hi)
    lo, hi = lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)
    delta = (hi - lo) / spec.qmax if spec.scheme is Scheme.ASYMMETRIC else torch.maximum(hi, -lo) / spec.qmax
    gmax = torch.maximum(hi.abs(), lo.abs())
    return gid, delta[gid], gmax[gid], lo[gid]


def roundtrip_tolerance(delta: torch.Tensor, gmax: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Δ/2 plus float32 arithmetic slack: a few ulps of the group's magnitude, and qmax·2^-149 for the case
    where Δ itself is subnormal or underflows (a group whose whole range is below ~1e-38)."""
    return delta.double() / 2 + 8 * EPS32 * gmax.double() + spec.qmax * 2.0**-149


def distinct_per_group(values: torch.Tensor, gid: torch.Tensor) -> torch.Tensor:
    """Number of distinct (numerically, so −0.0 == 0.0) values in each group."""
    v = values.double()
    order = torch.argsort(v, stable=True)
    order = order[torch.argsort(gid[order], stable=True)]
    v, g = v[order], gid[order]
    new = torch.ones_like(g, dtype=torch.bool)
    new[1:] = (g[1:] != g[:-1]) | (v[1:] != v[:-1])
    return torch.bincount(g[new])


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.view(
        {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float64: torch.int64}[t.dtype]
    )


# --------------------------------------------------------------------------------------------------------------
# round trip and scales


@SETTINGS
@given(data=st.data())
def test_roundtrip_error_at_most_half_step(data):
    x = data.draw(tensors())
    spec = data.draw(specs(x.numel()))
    y = fake_quantize(x, spec)
    assert y.shape == x.shape and y.dtype == x.dtype
    gid, delta, gmax, _ = ref_stats(x, spec)
    step = quantization_step(x, spec)
    assert torch.equal(step.reshape(-1), delta), "quantization_step disagrees with the scatter-reduce oracle"
    err = (y.double() - x.double()).abs().reshape(-1)
    assert (err <= roundtrip_tolerance(delta, gmax, spec)).all()
    if spec.scheme is Scheme.SYMMETRIC:
        # nothing is clamped: every element lies inside ±qmax·Δ (up to rounding of Δ)
        assert (
            x.abs().double().reshape(-1)
            <= delta.double() * spec.qmax * (1 + 4 * EPS32) + 2.0**-149 * spec.qmax
        ).all()


@SETTINGS
@given(data=st.data())
def test_roundtrip_bfloat16_input(data):
    x = data.draw(tensors()).bfloat16()
    spec = data.draw(specs(x.numel()))
    hold = hold_mask(data.draw, x)
    y = fake_quantize(x, spec, hold_out=hold)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert torch.equal(bits_of(y[hold]), bits_of(x[hold]))
    _, delta, gmax, _ = ref_stats(x, spec, hold)
    # float32 arithmetic, then one more rounding to bfloat16 (8 significant bits) of the result
    tol = roundtrip_tolerance(delta, gmax, spec) + 2.0**-8 * gmax.double()
    assert ((y.double() - x.double()).abs()[~hold] <= tol[~hold.reshape(-1)]).all()


def test_constant_groups_roundtrip_exactly():
    x = torch.tensor([[3.25] * 5, [0.0] * 5, [-7.5] * 5, [1e30] * 5])
    for scheme in Scheme:
        for granularity, block in [(Granularity.PER_CHANNEL, None), (Granularity.BLOCKWISE, 5)]:
            spec = QuantSpec(3, scheme, granularity, block)
            if scheme is Scheme.SYMMETRIC:
                assert torch.equal(fake_quantize(x[1:2], spec), x[1:2])
                # a constant non-zero group is ±absmax, which is a grid point: exact up to Δ·qmax rounding
                assert torch.allclose(fake_quantize(x, spec), x, rtol=2 * EPS32, atol=0)
            else:
                assert torch.equal(fake_quantize(x, spec), x)
                assert torch.equal(quantization_step(x, spec), torch.zeros_like(x))


def test_partial_last_block_uses_its_own_range():
    # 10 elements, B = 4: blocks [0..3], [4..7] and the partial [8, 9]; the partial block has range 1.
    x = torch.tensor([0.0, 100.0, 50.0, 25.0, -8.0, 8.0, 0.0, 1.0, 2.0, 3.0])
    spec = QuantSpec(2, "asymmetric", "blockwise", 4)
    step = quantization_step(x, spec)
    assert step.tolist() == pytest.approx([100 / 3] * 4 + [16 / 3] * 4 + [1 / 3] * 2)
    assert torch.equal(fake_quantize(x, spec)[8:], x[8:])  # 2 and 3 are min and max of their own block
    assert group_ids(x.shape, spec).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]


@SETTINGS
@given(data=st.data())
def test_group_ids_match_reference(data):
    x = data.draw(tensors(max_side=16))
    spec = data.draw(specs(x.numel()))
    assert torch.equal(group_ids(x.shape, spec).reshape(-1), ref_group_ids(tuple(x.shape), spec))


def test_per_channel_is_per_row_for_weights_and_per_token_for_activations():
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 10.0, 20.0, 30.0]])
    spec = QuantSpec(2, "asymmetric", "per_channel")
    assert torch.equal(fake_quantize(w, spec), w)  # each row is exactly its own 4-level grid
    assert quantization_step(w, spec)[:, 0].tolist() == [1.0, 10.0]
    acts = torch.randn(2, 3, 8)  # [batch, tokens, features]: one scale per token
    assert torch.equal(fake_quantize(acts, spec), fake_quantize(acts.reshape(6, 8), spec).reshape(2, 3, 8))


# --------------------------------------------------------------------------------------------------------------
# held-out elements


@SETTINGS
@given(data=st.data())
def test_held_out_elements_restored_and_excluded_from_scales(data):
    x = data.draw(tensors())
    spec = data.draw(specs(x.numel()))
    hold = hold_mask(data.draw, x)
    y = fake_quantize(x, spec, hold_out=hold)
    assert torch.equal(bits_of(y[hold]), bits_of(x[hold])), "held-out values must be bit-identical"

    gid, delta, gmax, _ = ref_stats(x, spec, hold)
    step = quantization_step(x, spec, hold_out=hold)
    assert torch.equal(step.reshape(-1), delta)
    keep = ~hold.reshape(-1)
    err = (y.double() - x.double()).abs().reshape(-1)
    assert (err[keep] <= roundtrip_tolerance(delta, gmax, spec)[keep]).all()

    # Groups without held-out elements are quantized exactly as without hold_out.
    plain = fake_quantize(x, spec).reshape(-1)
    touched = torch.zeros(int(gid.max()) + 1, dtype=torch.bool)
    touched[gid[~keep]] = True
    untouched = ~touched[gid]
    assert torch.equal(y.reshape(-1)[untouched], plain[untouched])

    # Each group with held-out elements == that group, with those elements removed, quantized on its own.
    per_tensor = QuantSpec(spec.bits, spec.scheme, Granularity.PER_TENSOR)
    for g in touched.nonzero().flatten().tolist():
        in_g = gid == g
        rest = x.reshape(-1)[in_g & keep]
        if rest.numel() == 0:
            assert (step.reshape(-1)[in_g] == 0).all()
            continue
        assert torch.equal(y.reshape(-1)[in_g & keep], fake_quantize(rest, per_tensor))
        assert (step.reshape(-1)[in_g] == quantization_step(rest, per_tensor)[0]).all()


def test_non_finite_values_must_be_held_out():
    x = torch.tensor([[0.5, -1.0, float("nan"), 2.0], [1.0, float("inf"), 0.25, -0.5]])
    spec = QuantSpec(8, "symmetric", "per_channel")
    with pytest.raises(ValueError, match="non-held-out values must be finite"):
        fake_quantize(x, spec)
    hold = ~torch.isfinite(x)
    y = fake_quantize(x, spec, hold_out=hold)
    assert torch.equal(bits_of(y[hold]), bits_of(x[hold]))  # nan restored with its exact payload
    assert torch.allclose(y[~hold], x[~hold], atol=2 / 127)


def test_fully_held_out_group():
    x = torch.tensor([[5.0, -3.0], [1.0, 2.0]])
    hold = torch.tensor([[True, True], [False, False]])
    spec = QuantSpec(4, "asymmetric", "per_channel")
    assert torch.equal(fake_quantize(x, spec, hold_out=hold), x)
    step = quantization_step(x, spec, hold_out=hold)
    assert torch.equal(step, torch.tensor([[0.0, 0.0], [1 / 15, 1 / 15]]))  # 1/15 rounded to float32


# --------------------------------------------------------------------------------------------------------------
# idempotence


def test_symmetric_scale_lemma_exhaustive():
    """fl(fl(fl(a/n)·n)/n) == fl(a/n) for every float32 significand a in [1, 2) and n = 2^(N−1) − 1, N = 2..16.

    Δ' (the scale recomputed from an already quantized tensor, whose absmax is fl(Δ·qmax)) therefore equals
    Δ exactly, which is what makes symmetric fake quantization exactly idempotent (for normal Δ)."""
    a = (torch.arange(2**23, dtype=torch.int32) + (127 << 23)).view(torch.float32)
    for bits in range(2, 17):
        n = float(2 ** (bits - 1) - 1)
        d = a / n
        assert torch.equal((d * n) / n, d), bits


def test_asymmetric_top_code_is_the_maximum_itself():
    # fl(Δ·15 + min) is 5.7300005 here, an ulp above max = 5.73: written as such, a second pass would measure
    # max one ulp higher, recompute Δ one ulp off and move values. Code 15 dequantizes to max itself instead.
    x = torch.tensor([1.84, 5.73, 2.36])
    spec = QuantSpec(4, "asymmetric", "per_tensor")
    delta = (x.max() - x.min()) / 15
    assert delta * 15 + x.min() != x.max()  # the float rounding the top code avoids
    y = fake_quantize(x, spec)
    assert y[0] == x[0] and y[1] == x[1]  # min and max are grid points
    assert torch.equal(fake_quantize(y, spec), y)


def coarse_grid(delta: torch.Tensor, gmax: torch.Tensor) -> torch.Tensor:
    """Per element: its group's grid is coarser than float32 resolution (the idempotence condition)."""
    return (delta == 0) | ((delta >= TINY32) & (delta.double() >= 2.0**-20 * gmax.double()))


@SETTINGS
@given(data=st.data())
def test_quantizing_twice_changes_nothing(data):
    """Bit-identical for every group whose grid is coarser than float32 resolution (see the module docstring);
    elsewhere (e.g. 16-bit codes on values clustered far from 0) values move by at most 4 ulps of the group."""
    x = data.draw(tensors())
    spec = data.draw(specs(x.numel()))
    hold = hold_mask(data.draw, x) if data.draw(st.booleans()) else None
    y = fake_quantize(x, spec, hold_out=hold)
    y2 = fake_quantize(y, spec, hold_out=hold)
    _, delta, gmax, _ = ref_stats(x, spec, hold)
    diff = (y2.double() - y.double()).abs().reshape(-1)
    assert (diff <= 4 * EPS32 * gmax.double() + spec.qmax * 2.0**-149).all()
    coarse = coarse_grid(delta, gmax)
    assert torch.equal(y2.reshape(-1)[coarse], y.reshape(-1)[coarse])


@SETTINGS
@given(bits=st.sampled_from([3, 4, 8]), scheme=st.sampled_from(Scheme), block=st.sampled_from([64, 1000, 4096]),
       seed=st.integers(0, 2**32 - 1), scale=st.sampled_from([0.02, 1.0, 300.0]))
def test_quantizing_weights_twice_changes_nothing(bits, scheme, block, seed, scale):
    """The audit's case: Gaussian weights with a super weight, 3/4/8 bits, blockwise: always bit-identical."""
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(seed)) * scale
    w[7, 11] = 300 * scale
    hold = torch.zeros_like(w, dtype=torch.bool)
    hold[7, 11] = True
    for h in (None, hold):
        spec = QuantSpec(bits, scheme, Granularity.BLOCKWISE, block)
        y = fake_quantize(w, spec, hold_out=h)
        assert torch.equal(fake_quantize(y, spec, hold_out=h), y)


@SETTINGS
@given(
    bits=st.integers(2, 16),
    scheme=st.sampled_from(Scheme),
    exponent=st.integers(-20, 10),
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(2, 300),
)
def test_grid_points_are_fixed_points(bits, scheme, exponent, seed, n):
    """A tensor that already lies on an exactly representable grid (Δ a power of two, extremes at the end
    codes) is returned bit-identically."""
    spec = QuantSpec(bits, scheme, Granularity.PER_TENSOR)
    gen = torch.Generator().manual_seed(seed)
    step = 2.0**exponent
    if scheme is Scheme.ASYMMETRIC:
        offset = float(torch.randint(-1000, 1000, (), generator=gen)) * step
        codes = torch.randint(0, spec.qmax + 1, (n,), generator=gen)
        codes[0], codes[1] = 0, spec.qmax
    else:
        offset = 0.0
        codes = torch.randint(-spec.qmax, spec.qmax + 1, (n,), generator=gen)
        codes[0] = spec.qmax if seed % 2 else -spec.qmax
    x = codes.float() * step + offset
    assert torch.equal(fake_quantize(x, spec), x)
    assert (quantization_step(x, spec) == step).all()


# --------------------------------------------------------------------------------------------------------------
# levels


@SETTINGS
@given(data=st.data())
def test_at_most_2_to_the_bits_distinct_values_per_group(data):
    x = data.draw(tensors())
    spec = data.draw(specs(x.numel()).filter(lambda s: s.bits <= 6))  # so the bound can actually bind
    hold = hold_mask(data.draw, x) if data.draw(st.booleans()) else None
    y = fake_quantize(x, spec, hold_out=hold).reshape(-1)
    gid = ref_group_ids(tuple(x.shape), spec)
    keep = torch.ones_like(gid, dtype=torch.bool) if hold is None else ~hold.reshape(-1)
    counts = distinct_per_group(y[keep], gid[keep])
    assert (counts <= 2**spec.bits).all()
    assert (counts <= spec.n_levels).all()  # 2^N − 1 for the symmetric grid


# --------------------------------------------------------------------------------------------------------------
# the super-outlier effect


@pytest.mark.parametrize("scheme", list(Scheme))
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_planted_outlier_crushes_its_block_unless_held_out(bits, scheme):
    block = 128**2
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(bits)) * 0.02  # 4 blocks of 128²
    w[5, 100] = 20.0  # a 1000σ "super weight" in block 0
    hold = torch.zeros_like(w, dtype=torch.bool)
    hold[5, 100] = True
    spec = QuantSpec(bits, scheme, Granularity.BLOCKWISE, block)

    naive = fake_quantize(w, spec).reshape(-1)
    held = fake_quantize(w, spec, hold_out=hold).reshape(-1)
    flat, others = w.reshape(-1), ~hold.reshape(-1)
    in_block = torch.arange(w.numel()) < block
    sel = in_block & others

    def rel_err(y):
        return float((y[sel] - flat[sel]).norm() / flat[sel].norm())

    levels = naive[sel].unique()
    if bits <= 4:
        # naive: Δ ≈ 20/qmax ≥ 1.3 ≫ σ = 0.02 — the whole block lands on one or two levels
        assert levels.numel() <= 2
        assert rel_err(naive) > 0.9
        assert float((naive[sel] == naive[sel].mode().values).float().mean()) > 0.99
    else:
        assert levels.numel() <= 8  # 256 levels in theory, but the data span only ±0.1 of a 20-wide range
        assert rel_err(naive) > 0.25
    # held out: the block keeps the error of an outlier-free Gaussian block (Δ ≈ 8.5σ/qmax, rms ≈ Δ/√12)
    bound = {3: 0.5, 4: 0.25, 8: 0.02}[bits]
    assert rel_err(held) < bound
    assert rel_err(held) < rel_err(naive) / 2
    assert held[hold.reshape(-1)].item() == 20.0
    # the other blocks do not care
    assert torch.equal(naive[~in_block], held[~in_block])


# --------------------------------------------------------------------------------------------------------------
# clipping


def test_clip_outliers_worked_example():
    x = torch.tensor([1.0, -2.0, 3.0, -10.0])
    # |x| = 1, 2, 3, 10: mean 4, population std √12.5; z = 1 → t = 4 + √12.5
    t = 4 + math.sqrt(12.5)
    y = clip_outliers(x, 1.0, block_size=None)
    assert y[:3].tolist() == [1.0, -2.0, 3.0]
    assert y[3].item() == pytest.approx(-t, rel=1e-6)
    assert torch.equal(clip_outliers(x, 1.0, block_size=2), x)  # blocks {1, -2}, {3, -10}: nothing above t
    assert clip_outliers(x, 0.0, block_size=2).tolist() == [1.0, -1.5, 3.0, -6.5]


@SETTINGS
@given(data=st.data())
def test_clip_outliers_caps_only_above_threshold(data):
    x = data.draw(tensors()).clamp(-1e15, 1e15)  # keep |x|² finite for the float64 oracle's variance
    z = data.draw(st.floats(0, 6))
    block = data.draw(st.none() | st.integers(1, x.numel() + 5))
    y = clip_outliers(x, z, block_size=block)
    assert y.shape == x.shape and y.dtype == x.dtype

    # float64 oracle for t = mean|x| + z·std|x| per block (population std)
    a = x.reshape(-1).abs().double()
    gid = torch.arange(a.numel()) // (a.numel() if block is None else block)
    count = torch.bincount(gid).double()
    mean = torch.zeros_like(count).index_add_(0, gid, a) / count
    var = torch.zeros_like(count).index_add_(0, gid, (a - mean[gid]) ** 2) / count
    t = (mean + z * var.sqrt())[gid]

    xf, yf = x.reshape(-1).double(), y.reshape(-1).double()
    below = a < t * (1 - 1e-5)
    above = a > t * (1 + 1e-5)
    assert torch.equal(bits_of(y.reshape(-1)[below]), bits_of(x.reshape(-1)[below])), "under t: untouched"
    assert torch.allclose(yf[above].abs(), t[above], rtol=1e-5, atol=0), "over t: capped at t"
    assert (torch.sign(yf) == torch.sign(xf)).all()
    assert (yf.abs() <= a).all()  # never grows, whatever the rounding near the threshold
    # every clipped element of a block is capped at the same level
    clipped = yf != xf
    if clipped.any():
        caps = distinct_per_group(yf[clipped].abs(), gid[clipped])
        assert caps[caps > 0].max() == 1


def test_clip_then_quantize_with_super_weight_held_out():
    """The paper's recipe: clip the ordinary outliers, hold the super weight out, RTN the rest."""
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(0)) * 0.02
    w[5, 100] = 20.0
    hold = torch.zeros_like(w, dtype=torch.bool)
    hold[5, 100] = True
    spec = QuantSpec(4, "asymmetric", "blockwise", 128**2)
    clipped = torch.where(hold, w, clip_outliers(w, 3.0, block_size=128**2))
    y = fake_quantize(clipped, spec, hold_out=hold)
    assert y[5, 100].item() == 20.0
    assert float((y - w)[~hold].norm() / w[~hold].norm()) < 0.25


# --------------------------------------------------------------------------------------------------------------
# validation and misc


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 1, "scheme": "asymmetric", "granularity": "per_tensor"}, r"bits must be between 2 and 16"),
        ({"bits": 17, "scheme": "asymmetric", "granularity": "per_tensor"}, r"bits must be between 2 and 16"),
        ({"bits": 4.0, "scheme": "asymmetric", "granularity": "per_tensor"}, r"bits must be an int"),
        ({"bits": True, "scheme": "asymmetric", "granularity": "per_tensor"}, r"bits must be an int"),
        ({"bits": 4, "scheme": "nf4", "granularity": "per_tensor"}, r"scheme.*'asymmetric', 'symmetric'"),
        ({"bits": 4, "scheme": "symmetric", "granularity": "per_row"}, r"granularity.*'blockwise'"),
        ({"bits": 4, "scheme": "symmetric", "granularity": "blockwise"}, r"block_size is required"),
        ({"bits": 4, "scheme": "symmetric", "granularity": "blockwise", "block_size": 0}, r"positive int"),
        ({"bits": 4, "scheme": "symmetric", "granularity": "blockwise", "block_size": 2.5}, r"positive int"),
        ({"bits": 4, "scheme": "symmetric", "granularity": "per_tensor", "block_size": 64}, r"only applies"),
    ],
)
def test_bad_specs_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kwargs)


def test_bad_inputs_raise_value_error():
    spec = QuantSpec(4, Scheme.SYMMETRIC, Granularity.PER_TENSOR)
    x = torch.randn(4, 4)
    with pytest.raises(ValueError, match="floating-point"):
        fake_quantize(torch.ones(3, dtype=torch.int64), spec)
    with pytest.raises(ValueError, match="bool tensor"):
        fake_quantize(x, spec, hold_out=torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"shape \(4,\) but x has shape \(4, 4\)"):
        fake_quantize(x, spec, hold_out=torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="range must be finite"):
        fake_quantize(torch.tensor([-3e38, 3e38]), QuantSpec(4, "asymmetric", "per_tensor"))
    with pytest.raises(ValueError, match="z must be a finite number >= 0"):
        clip_outliers(x, -1.0, block_size=4)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        clip_outliers(x, 3.0, block_size=0)
    with pytest.raises(QuantizationError):  # the lmaudit error type, for callers catching LmAuditError
        QuantSpec(0, "symmetric", "per_tensor")


def test_spec_coercion_and_describe():
    spec = QuantSpec(4, "asymmetric", "blockwise", 128**2)
    assert spec.scheme is Scheme.ASYMMETRIC and spec.granularity is Granularity.BLOCKWISE
    assert spec.describe() == "int4 asymmetric RTN, blockwise B=16384 (128²)"
    assert QuantSpec(3, Scheme.SYMMETRIC, "PER_CHANNEL").describe() == (
        "int3 symmetric RTN, per-channel (one scale per row)"
    )
    assert QuantSpec(8, "symmetric", "per_tensor").describe() == "int8 symmetric RTN, per-tensor"
    assert QuantSpec(4, "asymmetric", "blockwise", 1000).describe().endswith("B=1000")
    assert (
        QuantSpec(4, "asymmetric", "per_tensor").n_levels,
        QuantSpec(4, "symmetric", "per_tensor").n_levels,
    ) == (
        16,
        15,
    )
    with pytest.raises(AttributeError):
        spec.bits = 8  # frozen


def test_dtypes_shapes_and_empty():
    spec = QuantSpec(4, "asymmetric", "blockwise", 7)
    x64 = torch.randn(5, 6, dtype=torch.float64)
    assert fake_quantize(x64, spec).dtype == torch.float64
    assert fake_quantize(torch.randn(3, 4, 5), spec).shape == (3, 4, 5)
    assert fake_quantize(torch.tensor(2.5), QuantSpec(4, "symmetric", "per_channel")).item() == 2.5
    empty = torch.empty(0, 8)
    assert fake_quantize(empty, spec).shape == (0, 8)
    assert quantization_step(empty, spec).shape == (0, 8)
    t = torch.randn(4, 4).t()  # non-contiguous input
    assert torch.equal(fake_quantize(t, spec), fake_quantize(t.contiguous(), spec))
    x = torch.randn(6, 6)
    before = x.clone()
    for s in (spec, QuantSpec(3, "symmetric", "per_tensor")):
        fake_quantize(x, s, hold_out=x > 1)
        clip_outliers(x, 0.0, block_size=5)
    assert torch.equal(x, before), "inputs are never modified in place"


# --------------------------------------------------------------------------------------------------------------
# the fast path against a straightforward reference (bit for bit)


def reference_fake_quantize(x: torch.Tensor, spec: QuantSpec, hold: torch.Tensor | None = None) -> torch.Tensor:
    """The module docstring's formulas, group by group in a Python loop (no reshaped views, no slicing, no
    shared helper): statistics over the non-held elements, Δ := 1 where Δ = 0, the top asymmetric code written
    as max itself, held elements copied back. Same IEEE float32 operations as the implementation, so the result
    must agree bit for bit, not only within Δ/2."""
    flat = x.reshape(-1).float()
    keep = torch.ones(flat.shape, dtype=torch.bool) if hold is None else ~hold.reshape(-1)
    out = flat.clone()
    start = 0
    for length in torch.unique_consecutive(ref_group_ids(tuple(x.shape), spec), return_counts=True)[1].tolist():
        members = slice(start, start + length)  # groups are contiguous runs of the flattened tensor
        start += length
        values = flat[members]
        kept = values[keep[members]]
        lo = kept.min() if kept.numel() else torch.tensor(0.0)
        hi = kept.max() if kept.numel() else torch.tensor(0.0)
        if spec.scheme is Scheme.ASYMMETRIC:
            delta = (hi - lo) / spec.qmax
            safe = delta if delta > 0 else torch.tensor(1.0)
            q = torch.clamp(torch.round((values - lo) / safe), 0, spec.qmax)
            deq = torch.where(q == spec.qmax, hi, q * safe + lo)
        else:
            delta = torch.maximum(hi, -lo) / spec.qmax
            safe = delta if delta > 0 else torch.tensor(1.0)
            deq = torch.clamp(torch.round(values / safe), -spec.qmax, spec.qmax) * safe
        out[members] = torch.where(keep[members], deq, values)
    return out.reshape(x.shape).to(x.dtype)


@SETTINGS
@given(data=st.data())
def test_fast_path_is_bit_identical_to_the_reference(data):
    """fake_quantize (vectorised over groups, in-place steps into one output buffer) equals the per-group loop
    exactly, held-out elements included."""
    x = data.draw(tensors(max_side=24))
    spec = data.draw(specs(x.numel()))
    hold = hold_mask(data.draw, x) if data.draw(st.booleans()) else None
    assert torch.equal(fake_quantize(x, spec, hold_out=hold), reference_fake_quantize(x, spec, hold))


@pytest.mark.parametrize(
    ("shape", "spec"),
    [((1536, 576), QuantSpec(8, "asymmetric", "per_tensor")),
     ((1536, 576), QuantSpec(4, "asymmetric", "blockwise", 128**2)),
     ((576, 576), QuantSpec(4, "asymmetric", "blockwise", 128**2)),  # 20 full blocks + a 4096-element remainder
     ((512, 1536), QuantSpec(8, "symmetric", "per_channel"))],  # 2 × 256 tokens of a down_proj input
    ids=["per-tensor", "block-128sq", "block-remainder", "per-token"],
)
def test_weight_sized_tensor_is_bit_identical_to_the_reference(shape, spec):
    """Real weight sizes (W8 per tensor, W4 128², W8A8 activations per row) with an outlier and a held element."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen) * 0.05
    w[1, 33] = 3.0
    hold = torch.zeros_like(w, dtype=torch.bool)
    hold[1, 33] = True
    for h in (None, hold):
        assert torch.equal(fake_quantize(w, spec, hold_out=h), reference_fake_quantize(w, spec, h))



def test_out_buffer_receives_the_result():
    x = torch.randn(6, 10)
    x[2, 3] = 40.0
    hold = torch.zeros_like(x, dtype=torch.bool)
    hold[2, 3] = True
    spec = QuantSpec(4, "asymmetric", "blockwise", 16)
    buffer = torch.full((100,), float("nan"))
    out = buffer[:60].view(6, 10)
    assert fake_quantize(x, spec, hold_out=hold, out=out) is out
    assert torch.equal(out, fake_quantize(x, spec, hold_out=hold)) and out[2, 3].item() == 40.0
    assert buffer[60:].isnan().all()  # nothing written past the view
    half = x.to(torch.bfloat16)  # computed in float32, rounded into the bfloat16 buffer
    out_half = torch.empty_like(half)
    assert torch.equal(fake_quantize(half, spec, out=out_half), fake_quantize(half, spec))
    with pytest.raises(QuantizationError, match="shape"):
        fake_quantize(x, spec, out=torch.empty(60))
    with pytest.raises(QuantizationError, match="float32"):
        fake_quantize(x, spec, out=torch.empty(6, 10, dtype=torch.float64))
    with pytest.raises(QuantizationError, match="contiguous"):
        fake_quantize(x, spec, out=torch.empty(10, 6).t())
    with pytest.raises(QuantizationError, match="share memory"):
        fake_quantize(x, spec, out=x)
