"""Pure-torch fake quantizers (quantize, then dequantize) for the super-outlier-aware quantization audit.

Reference: Yu et al., "The Super Weight in Large Language Models" (arXiv:2411.07191), the section on
round-to-nearest (RTN) quantization with the super outliers held out at full precision. Every function here
returns a *float* tensor with the input's shape and dtype whose values lie on the quantization grid, so the
effect of quantization on a model can be measured without integer kernels.

Notation, for one group X (the set of elements that share a scale) and N bits:

Asymmetric (min-max) RTN::

    Δ      = (max X − min X) / (2^N − 1)
    Q(x)   = clamp(round((x − min X) / Δ), 0, 2^N − 1)
    Q⁻¹(q) = Δ·q + min X

Symmetric (absmax) RTN::

    Δ      = max |X| / (2^(N−1) − 1)
    Q(x)   = clamp(round(x / Δ), −(2^(N−1) − 1), 2^(N−1) − 1)
    Q⁻¹(q) = Δ·q

``round`` is torch's round-half-to-even. Hence |Q⁻¹(Q(x)) − x| ≤ Δ/2 for every x of its own group, up to
float rounding of the arithmetic (a few ulps of the group's magnitude).

Degenerate groups: when Δ = 0 (a constant group for the asymmetric scheme, an all-zero group for the
symmetric one) the division uses Δ := 1 instead; every element then gets code 0 and dequantizes to
min X (asymmetric) or 0 (symmetric), i.e. the group round-trips exactly. :func:`quantization_step` still
reports the formula's Δ, i.e. 0, for such a group (the error bound Δ/2 = 0 is then exact).

Idempotence (tested in tests/test_quantizers.py): quantizing twice changes nothing,
fake_quantize(fake_quantize(x)) == fake_quantize(x) bit for bit, for every group whose grid is coarser than
float32 resolution, precisely Δ = 0 or (Δ normal and Δ ≥ 2^−20·max|X|) — every practical grid (4-bit weights:
Δ ≈ range/15; 16-bit codes on values clustered far from 0 are the exception). Why:

* the statistics are reproduced. Symmetric: the re-measured absmax is fl(Δ·qmax), and fl(fl(fl(a/n)·n)/n) ==
  fl(a/n) for every float32 significand a and n = 2^(N−1) − 1 (checked exhaustively), so Δ comes back exactly.
  Asymmetric: code 0 dequantizes to min exactly (Δ·0 + min) and code 2^N − 1 is written as max itself (its
  exact value Δ·(2^N − 1) + min, instead of that expression's float rounding, which may be an ulp off and
  would make the second pass recompute Δ an ulp off), and every other code lands strictly between them;
* the codes are reproduced: re-quantizing Q⁻¹(q) gives q ± (3q + max|X|/Δ)·2^−24, which rounds back to q
  under the condition above.

Outside the condition, values move by at most a few ulps of the group's magnitude (also tested).

Groups (:class:`Granularity`):

* ``PER_TENSOR``: the whole tensor is one group.
* ``PER_CHANNEL``: one group per vector along the last dimension, i.e. per row of ``x.reshape(-1,
  x.shape[-1])``. For an ``nn.Linear`` weight ``[out, in]`` that is one scale per output channel; for
  activations ``[tokens, features]`` (or ``[batch, tokens, features]``) it is one scale per token. A 1-D
  tensor is a single row, a 0-D tensor a single element.
* ``BLOCKWISE``: contiguous blocks of ``B = block_size`` elements of the flattened (row-major) tensor, as in
  the paper's block-size sweep (B = 128², 256², 512², 1024²). When B does not divide ``numel``, the last
  block is shorter: it holds the ``numel mod B`` trailing elements and is quantized with its own min/max.
  Nothing is padded, so no padding value can influence any scale.

Held-out elements (``hold_out``, e.g. the super weight or the super activation) are excluded from the
min/max (absmax) statistics of their group, so they do not stretch its scale, and are copied back
bit-identically into the output. A group whose elements are all held out gets Δ = 0.

Arithmetic is done in float32 (float64 for float64 input), also for bfloat16/float16 input; the result is
cast back to the input's dtype, which for a half-precision input adds that dtype's own rounding. The
non-held-out elements must be finite and every group's range must be finite in float32 (|max − min| below
≈3.4e38); otherwise a :class:`QuantizationError` names the offending group. Everything is vectorised: the
flattened tensor is viewed as ``[n_groups, group_len]`` (for BLOCKWISE plus one ``[1, numel mod B]``
remainder) and reduced along the last dimension; there is no Python loop over groups. The functions run
under ``torch.no_grad()`` and return tensors without a graph (no straight-through estimator).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from lmaudit.checks.core.errors import LmAuditError

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "Granularity",
    "QuantSpec",
    "QuantizationError",
    "Scheme",
    "clip_outliers",
    "fake_quantize",
    "group_ids",
    "quantization_step",
]

MIN_BITS = 2
MAX_BITS = 16


class QuantizationError(LmAuditError, ValueError):
    """A bad quantization spec or input. A ``ValueError`` too, so plain ``except ValueError`` catches it."""


class Scheme(str, Enum):
    """Where the grid sits: min-max with an offset (asymmetric) or centred on zero (symmetric absmax)."""

    ASYMMETRIC = "asymmetric"
    SYMMETRIC = "symmetric"


class Granularity(str, Enum):
    """Which elements share one scale; see the module docstring."""

    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"
    BLOCKWISE = "blockwise"


def _coerce_enum(value: object, enum_cls: type[Enum], field: str) -> Enum:
    if isinstance(value, enum_cls):
        return value
    if isinstance(value, str):
        key = value.strip().lower().replace("-", "_")
        for member in enum_cls:
            if key in (member.value, member.name.lower()):
                return member
    choices = ", ".join(repr(m.value) for m in enum_cls)
    raise QuantizationError(f"QuantSpec.{field}: got {value!r}; valid choices are {choices}")


@dataclass(frozen=True)
class QuantSpec:
    """One fake-quantization recipe.

    ``bits``: integer width N, ``MIN_BITS`` ≤ N ≤ ``MAX_BITS`` (the audit sweeps 3, 4 and 8).
    ``scheme``: :class:`Scheme` (or its value string, e.g. ``"symmetric"``).
    ``granularity``: :class:`Granularity` (or its value string, e.g. ``"blockwise"``).
    ``block_size``: B, a positive int, required for BLOCKWISE and forbidden (must be None) otherwise.

    Invalid fields raise :class:`QuantizationError` (a ``ValueError``) naming the field and the valid values.
    """

    bits: int
    scheme: Scheme
    granularity: Granularity
    block_size: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise QuantizationError(
                f"QuantSpec.bits must be an int, got {self.bits!r} ({type(self.bits).__name__})"
            )
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise QuantizationError(
                f"QuantSpec.bits must be between {MIN_BITS} and {MAX_BITS} inclusive, got {self.bits}"
            )
        object.__setattr__(self, "scheme", _coerce_enum(self.scheme, Scheme, "scheme"))
        object.__setattr__(self, "granularity", _coerce_enum(self.granularity, Granularity, "granularity"))
        if self.granularity is Granularity.BLOCKWISE:
            b = self.block_size
            if b is None:
                raise QuantizationError(
                    "QuantSpec.block_size is required for BLOCKWISE granularity (e.g. 128**2)"
                )
            if isinstance(b, bool) or not isinstance(b, int) or b < 1:
                raise QuantizationError(f"QuantSpec.block_size must be a positive int, got {b!r}")
        elif self.block_size is not None:
            raise QuantizationError(
                f"QuantSpec.block_size only applies to BLOCKWISE granularity; got block_size={self.block_size!r} "
                f"with granularity {self.granularity.value!r} (pass None)"
            )

    @property
    def qmax(self) -> int:
        """Largest code: 2^N − 1 (asymmetric, codes 0..qmax) or 2^(N−1) − 1 (symmetric, codes −qmax..qmax)."""
        return (1 << self.bits) - 1 if self.scheme is Scheme.ASYMMETRIC else (1 << (self.bits - 1)) - 1

    @property
    def n_levels(self) -> int:
        """Number of distinct codes: 2^N (asymmetric) or 2^N − 1 (symmetric)."""
        return self.qmax + 1 if self.scheme is Scheme.ASYMMETRIC else 2 * self.qmax + 1

    def describe(self) -> str:
        """Human-readable one-liner, e.g. ``'int4 asymmetric RTN, blockwise B=16384 (128²)'``."""
        if self.granularity is Granularity.PER_TENSOR:
            where = "per-tensor"
        elif self.granularity is Granularity.PER_CHANNEL:
            where = "per-channel (one scale per row)"
        else:
            b = int(self.block_size)  # type: ignore[arg-type]
            side = math.isqrt(b)
            where = f"blockwise B={b}" + (f" ({side}²)" if side * side == b and side > 1 else "")
        return f"int{self.bits} {self.scheme.value} RTN, {where}"


# --------------------------------------------------------------------------------------------------------------
# grouping


def _group_len(shape: torch.Size, spec: QuantSpec, numel: int) -> int:
    """Length of a (full) group: rows of the ``[n_groups, group_len]`` view of the flattened tensor."""
    if spec.granularity is Granularity.PER_TENSOR:
        return numel
    if spec.granularity is Granularity.PER_CHANNEL:
        return shape[-1] if len(shape) else 1
    return int(spec.block_size)  # type: ignore[arg-type]


def _split(flat: Tensor, group_len: int) -> list[Tensor]:
    """``[n_full, group_len]`` view of the full groups plus a ``[1, rest]`` view of a shorter last group."""
    numel = flat.numel()
    n_full = numel // group_len
    cut = n_full * group_len
    parts = []
    if n_full:
        parts.append(flat[:cut].view(n_full, group_len))
    if cut < numel:
        parts.append(flat[cut:].view(1, numel - cut))
    return parts


def group_ids(shape: torch.Size | tuple[int, ...], spec: QuantSpec) -> Tensor:
    """Group index of every element (int64, of the given shape), numbered in row-major order from 0.

    PER_TENSOR: all 0. PER_CHANNEL: ``flat_index // shape[-1]``. BLOCKWISE: ``flat_index // block_size``.
    """
    shape = torch.Size(shape)
    numel = shape.numel()
    if numel == 0:
        return torch.zeros(shape, dtype=torch.int64)
    length = _group_len(shape, spec, numel)
    return (torch.arange(numel) // length).reshape(shape)


# --------------------------------------------------------------------------------------------------------------
# core


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_inputs(x: Tensor, spec: QuantSpec, hold_out: Tensor | None, fn: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{fn}: spec must be a QuantSpec, got {type(spec).__name__}")
    if not x.is_floating_point():
        raise QuantizationError(f"{fn}: x must have a floating-point dtype, got {x.dtype}")
    if hold_out is not None:
        if not isinstance(hold_out, Tensor) or hold_out.dtype != torch.bool:
            got = hold_out.dtype if isinstance(hold_out, Tensor) else type(hold_out).__name__
            raise QuantizationError(f"{fn}: hold_out must be a bool tensor, got {got}")
        if hold_out.shape != x.shape:
            raise QuantizationError(
                f"{fn}: hold_out has shape {tuple(hold_out.shape)} but x has shape {tuple(x.shape)}"
            )
        if hold_out.device != x.device:
            raise QuantizationError(f"{fn}: hold_out is on {hold_out.device} but x is on {x.device}")


def _params(
    g: Tensor, held: Tensor | None, spec: QuantSpec, first_group: int
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Per-row (Δ, offset, max X) of a ``[G, L]`` group matrix, each ``[G, 1]``; offset is min X or None
    (symmetric).

    Held-out entries are excluded from the statistics; a fully held-out row gets min = max = 0, hence Δ = 0.
    """
    if held is None:
        # amin + amax, not torch.aminmax(dim=1): the same values, but aminmax along a dim is ~10x slower on CPU
        # (torch 2.13, one thread: 0.48 vs 0.04 ms on a 256 × 576 activation, 2.9 vs 0.24 ms on a weight)
        lo, hi = g.amin(dim=1, keepdim=True), g.amax(dim=1, keepdim=True)
    else:
        lo = g.masked_fill(held, math.inf).amin(dim=1, keepdim=True)
        hi = g.masked_fill(held, -math.inf).amax(dim=1, keepdim=True)
        empty = held.all(dim=1, keepdim=True)
        if bool(empty.any()):
            lo = lo.masked_fill(empty, 0.0)
            hi = hi.masked_fill(empty, 0.0)
    if spec.scheme is Scheme.ASYMMETRIC:
        delta = (hi - lo) / spec.qmax
        offset: Tensor | None = lo
    else:
        delta = torch.maximum(hi, -lo) / spec.qmax
        offset = None
    # Δ is finite iff min and max are finite and their range does not overflow: a NaN or ±inf in min or max
    # makes (max − min) resp. max(max, −min) NaN or inf (torch.maximum propagates NaN). One check, not three.
    ok = torch.isfinite(delta)
    if not bool(ok.all()):
        bad = int((~ok).flatten().nonzero()[0]) + first_group
        lo_b, hi_b = float(lo.flatten()[bad - first_group]), float(hi.flatten()[bad - first_group])
        raise QuantizationError(
            f"{spec.describe()}: group {bad} has min={lo_b!r}, max={hi_b!r}; the non-held-out values must be "
            f"finite and their range must be finite in {g.dtype} (hold such elements out or clean the tensor)"
        )
    return delta, offset, hi


def _quantize_into(
    g: Tensor, out: Tensor, delta: Tensor, offset: Tensor | None, hi: Tensor, spec: QuantSpec
) -> None:
    """Write Q⁻¹(Q(·)) of every row of the ``[G, L]`` group matrix ``g`` into ``out`` (``[G, L]``).

    One output buffer and in-place steps (plus a 1-byte mask for the asymmetric top code): every op that
    allocates a weight-sized result page-faults fresh memory. With amin/amax instead of aminmax in
    :func:`_params`, fake-quantizing the 210 decoder weights of smollm2-135m-instruct (106M elements) takes
    0.25 s instead of ~1 s (two threads, measured; slicing the pass into cache-sized pieces did not help).
    """
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    qmax = spec.qmax
    if offset is None:
        torch.div(g, safe, out=out).round_().clamp_(-qmax, qmax).mul_(safe)
        return
    torch.sub(g, offset, out=out).div_(safe).round_().clamp_(0, qmax)
    top = (out - (qmax - 1)).clamp_(0, 1)  # 1.0 exactly where the code is 2^N − 1, else 0.0
    out.mul_(safe).add_(offset)
    # Q⁻¹(2^N − 1) = Δ·(2^N − 1) + min = max exactly: write max itself, not its float rounding (idempotence).
    # torch.lerp(a, b, w) is b − (b − a)(1 − w) for w ≥ ½ and a + w(b − a) below, hence exactly b at w = 1 and
    # exactly a at w = 0. A float 0/1 weight instead of a bool mask + torch.where: on CPU, comparisons into bool
    # and where() cost ~5x an arithmetic pass (torch 2.13, one thread: 0.19 vs 0.35 ms per 256 × 576 input).
    out.lerp_(hi.expand_as(out), top)


def _run(
    x: Tensor, spec: QuantSpec, hold_out: Tensor | None, want_step: bool, out: Tensor | None = None
) -> Tensor:
    flat = x.detach().reshape(-1).to(_compute_dtype(x))
    length = _group_len(x.shape, spec, flat.numel())
    parts = _split(flat, length)
    held_parts = _split(hold_out.reshape(-1), length) if hold_out is not None else [None] * len(parts)
    result = out.view(-1) if out is not None and out.dtype == flat.dtype else torch.empty_like(flat)
    out_parts = _split(result, length)
    first_group = 0
    for g, held, out in zip(parts, held_parts, out_parts, strict=True):  # at most 2: full groups + remainder
        delta, offset, hi = _params(g, held, spec, first_group)
        first_group += g.shape[0]
        if want_step:
            out.copy_(delta.expand_as(g))
        else:
            _quantize_into(g, out, delta, offset, hi, spec)
    return result.reshape(x.shape)


def _check_out(x: Tensor, out: Tensor | None, fn: str) -> None:
    if out is None:
        return
    if not isinstance(out, Tensor):
        raise TypeError(f"{fn}: out must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise QuantizationError(
            f"{fn}: out must be a contiguous {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}, got "
            f"{out.dtype} {tuple(out.shape)} on {out.device}{'' if out.is_contiguous() else ' (not contiguous)'}"
        )
    if out.numel() and out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        raise QuantizationError(f"{fn}: out must not share memory with x (no in-place quantization)")


def fake_quantize(
    x: Tensor, spec: QuantSpec, *, hold_out: Tensor | None = None, out: Tensor | None = None
) -> Tensor:
    """Quantize ``x`` with round-to-nearest, then dequantize: returns Q⁻¹(Q(x)) with x's shape and dtype.

    Asymmetric: Q(x) = clamp(round((x − min)/Δ), 0, 2^N − 1), Q⁻¹(q) = Δ·q + min, Δ = (max − min)/(2^N − 1).
    Symmetric:  Q(x) = clamp(round(x/Δ), −(2^(N−1) − 1), 2^(N−1) − 1), Q⁻¹(q) = Δ·q, Δ = max|x|/(2^(N−1) − 1).
    min, max and max|x| are taken per group (see :class:`Granularity`) over the elements that are not held out.

    ``hold_out``: optional bool mask of x's shape. Masked elements (the super outliers) do not enter their
    group's statistics and are returned bit-identically. A constant group (Δ = 0) round-trips exactly.

    ``out``: optional contiguous tensor of x's shape and dtype, not sharing memory with x, to write the result
    into (returned); e.g. one reusable buffer for many weights instead of a fresh allocation each.
    """
    _check_inputs(x, spec, hold_out, "fake_quantize")
    _check_out(x, out, "fake_quantize")
    if x.numel() == 0:
        return x.detach().clone() if out is None else out
    with torch.no_grad():
        result = _run(x, spec, hold_out, want_step=False, out=out).to(x.dtype)  # fresh or `out`: ours
        if out is not None and result.data_ptr() != out.data_ptr():
            result = out.copy_(result)  # half-precision input: computed in float32, then rounded into out
        result = result.view(x.shape)
        if hold_out is not None:
            torch.where(hold_out, x.detach(), result, out=result)
    return result if out is None else out


def quantization_step(x: Tensor, spec: QuantSpec, *, hold_out: Tensor | None = None) -> Tensor:
    """Δ of each element's group, broadcast to x's shape (float32; float64 for float64 input).

    Δ = (max − min)/(2^N − 1) (asymmetric) or max|x|/(2^(N−1) − 1) (symmetric), over the group's
    non-held-out elements; 0 for a degenerate (constant / all-zero / fully held-out) group. For every
    non-held-out element, |fake_quantize(x) − x| ≤ Δ/2 up to float rounding.
    """
    _check_inputs(x, spec, hold_out, "quantization_step")
    if x.numel() == 0:
        return torch.zeros(x.shape, dtype=_compute_dtype(x), device=x.device)
    with torch.no_grad():
        return _run(x, spec, hold_out, want_step=True)


def clip_outliers(x: Tensor, z: float, *, block_size: int | None) -> Tensor:
    """The paper's outlier clipping before RTN: per block, cap |x| at t = mean(|x|) + z·std(|x|), keeping the sign.

    out = x where |x| ≤ t (bit-identical), sign(x)·t elsewhere, with mean and the *population* std
    (correction 0, so a one-element block is well defined) of |x| taken over each block. Blocks are the
    contiguous runs of ``block_size`` elements of the flattened tensor, the last one shorter when block_size
    does not divide numel (with its own statistics); ``block_size=None`` means one block for the whole tensor.
    ``z`` must be finite and ≥ 0. Statistics are computed in float32 (float64 for float64 input); t is then
    rounded to x's dtype, so for half-precision input the cap is t rounded to that dtype (never above the
    original |x| of a clipped element). To protect a super weight, clip first and restore it afterwards (or
    pass it as ``hold_out`` to :func:`fake_quantize` of the original tensor at that position).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"clip_outliers: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise QuantizationError(f"clip_outliers: x must have a floating-point dtype, got {x.dtype}")
    if isinstance(z, bool) or not isinstance(z, int | float) or not math.isfinite(z) or z < 0:
        raise QuantizationError(f"clip_outliers: z must be a finite number >= 0, got {z!r}")
    if block_size is not None and (
        isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1
    ):
        raise QuantizationError(
            f"clip_outliers: block_size must be a positive int or None, got {block_size!r}"
        )
    if x.numel() == 0:
        return x.detach().clone()
    with torch.no_grad():
        src = x.detach().reshape(-1)
        flat = src.to(_compute_dtype(x))
        mag = flat.abs()
        length = mag.numel() if block_size is None else block_size
        out = torch.empty_like(src)
        # at most two pieces (full blocks + remainder); the threshold stays a [G, 1] column, broadcast
        for a, m, xs, o in zip(*(_split(v, length) for v in (flat, mag, src, out)), strict=True):
            std, mean = torch.std_mean(m, dim=1, correction=0, keepdim=True)
            t = mean.add_(std, alpha=float(z))
            torch.where(m > t, torch.copysign(t, a).to(x.dtype), xs, out=o)
        return out.reshape(x.shape)
