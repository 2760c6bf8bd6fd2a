"""Simulated round-to-nearest quantization of a whole model, naive and super-outlier-aware (Yu et al., "The
Super Weight in Large Language Models", arXiv:2411.07191, §4 "Super-outlier aware quantization").

Two schemes, each in a *naive* and an *aware* variant, applied to every Linear inside the decoder layers
(``adapter.decoder_linears()``; embeddings, final norm and unembedding stay in full precision):

**Weight-only, blockwise** (:class:`WeightOnlyScheme`): asymmetric min-max RTN of each weight in contiguous
blocks of B elements of the flattened ``[out, in]`` matrix (:mod:`lmaudit.checks.quantization.quantizers`).

* naive:  W_q = Q⁻¹(Q(W))
* aware:  W_q = RESTORE(Q⁻¹(Q(CLIP_z(W))))  — clip every block at t = mean|W| + z·std|W| (statistics of the
  block), quantize with the super weights held out of the block statistics, and put the super weights back in
  full precision. z is chosen by :func:`search_clip_z`: the candidate with the lowest mean NLL on a calibration
  slice of the corpus (windows *after* the evaluation windows, so never the evaluated text); ``inf`` = no
  clipping is always a candidate, so the aware scheme is never worse than "hold out only" on that slice.

**W8A8, simulated** (:class:`W8A8Scheme`): every decoder Linear's weight is RTN-quantized to 8 bits per tensor
(asymmetric min-max) once, and its *input* activations are fake-quantized to 8 bits (symmetric absmax) on every
forward pass, either per token (one scale per row of ``x[..., features]``) or per tensor. "Per tensor" is one
scale per *sequence* (``x[b]``), so a window's perplexity never depends on which windows share its batch.

* naive: W_q as above; x_q = Q⁻¹(Q(x)).
* aware: the super weights are held out of their weight's scale and kept in full precision; in the input of the
  super weight's down projection, the super activation's source ``x[:, token, col]`` (the huge neuron
  activation that the super weight multiplies into the super activation ``y[token, row]``) is REPLACEd by the
  median of its quantization group, the group is quantized, and the original value is RESTOREd. Because the
  median lies inside [min, max] of the other elements, that is exactly ``fake_quantize(x, hold_out=mask)``
  (tested in tests/test_quantization.py). The super activation ``y[token, row]`` itself is a down-projection
  *output*, which no Linear reads before the next RMSNorm; in the normalized inputs of the later layers its
  channel is not an outlier (measured on smollm2-135m-instruct: |x| ≈ 1 at token 0 of layer 12), so nothing
  else needs holding out.

Super outliers are an *input* (:class:`SuperOutliers`, built from the super-weight area's
:class:`~lmaudit.checks.core.outliers.SuperWeightSites`); nothing here knows where a model keeps them.

Every scheme is a context manager built from :func:`lmaudit.checks.core.interventions.transform_weights` (weights
fake-quantized once on entry, originals copied back bit for bit on exit) and
:func:`lmaudit.checks.core.interventions.transform_inputs` (activations). The model object is never replaced or copied.

Memory (:class:`MemoryMeter`): the resident set size of the process is sampled from ``/proc/self/statm``
every 5 ms by a background thread while a scheme is entered and evaluated (``tracemalloc`` cannot see torch's
allocator). ``peak_bytes`` = model parameter bytes + (peak RSS − RSS on entry): the model plus everything the
quantized evaluation adds (the saved weight copies, quantization temporaries, activations, logits).
``saved_bytes`` counts the weight copies exactly (numel × element size of every transformed weight).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor, nn

from lmaudit.checks.core.adapter import ArchitectureAdapter
from lmaudit.checks.core.interventions import transform_inputs, transform_weights
from lmaudit.checks.core.outliers import SuperWeightSites
from lmaudit.checks.core.perplexity import perplexity_from_nll, window_nll
from lmaudit.checks.quantization.quantizers import (
    Granularity,
    QuantSpec,
    Scheme,
    clip_outliers,
    fake_quantize,
)

__all__ = [
    "DEFAULT_Z_CANDIDATES",
    "ActivationGranularity",
    "ClipSearch",
    "MemoryMeter",
    "MemoryUse",
    "QuantScheme",
    "SuperOutliers",
    "W8A8Scheme",
    "WeightOnlyScheme",
    "activation_quantizer",
    "model_bytes",
    "quantize_weight",
    "quantized",
    "recovery",
    "search_clip_z",
]

# Clipping thresholds tried by search_clip_z (in std of |W| above the block's mean |W|): mild (8σ, only
# extreme outliers) and aggressive (4σ); inf = no clipping (the aware scheme then only holds the super weights
# out). Three candidates keep the search at three quantize-and-score passes on the calibration slice.
DEFAULT_Z_CANDIDATES: tuple[float, ...] = (math.inf, 8.0, 4.0)


# ------------------------------------------------------------------------------------------------ super outliers


@dataclass(frozen=True)
class SuperOutliers:
    """What the aware schemes hold out.

    ``weights``: super weights as ``(layer, row, col)`` of ``W_down[layer]`` (``[out, in]`` view).
    ``tokens``: for each super weight, the token position of its super activation (0 = the first token); the
    held-out activation is the down projection's *input* ``x[:, token, col]``.
    """

    weights: tuple[tuple[int, int, int], ...]
    tokens: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.weights) != len(self.tokens):
            raise ValueError(f"{len(self.weights)} super weights but {len(self.tokens)} token positions")

    @classmethod
    def from_coordinates(cls, weights: Iterable[tuple[int, int, int]], token: int = 0) -> SuperOutliers:
        coords = tuple((int(a), int(b), int(c)) for a, b, c in weights)
        return cls(coords, (int(token),) * len(coords))

    @classmethod
    def from_detection(cls, detection: object) -> SuperOutliers:
        """From a :class:`lmaudit.checks.superweights.detect.SuperWeightDetection` (its ``super_weights``)."""
        sws = detection.super_weights  # type: ignore[attr-defined]
        return cls(tuple(sw.coordinates for sw in sws), tuple(int(sw.token) for sw in sws))

    @classmethod
    def from_sites(cls, sites: SuperWeightSites) -> SuperOutliers:
        """From the super-weight area's :class:`~lmaudit.checks.core.outliers.SuperWeightSites`: each super weight
        ``(layer, row, col)`` with the token of the super activation it writes into channel ``row`` of ``layer``
        (token 0, where super activations sit, when the sites record none for it)."""
        token = {(a.layer, a.channel): a.token for a in sites.activations}
        weights = tuple((int(layer), int(row), int(col)) for layer, row, col in sites.coordinates)
        return cls(weights, tuple(int(token.get((layer, row), 0)) for layer, row, _ in weights))

    def __bool__(self) -> bool:
        return bool(self.weights)

    def weight_masks(self, adapter: ArchitectureAdapter) -> dict[nn.Module, Tensor]:
        """``{down_proj module: bool mask of its [out, in] weight}`` with the super weights set."""
        masks: dict[nn.Module, Tensor] = {}
        for layer, row, col in self.weights:
            module = adapter.down_proj(layer)
            weight = adapter.weight(module)  # [out, in], also when accelerate offloaded it
            if module not in masks:
                masks[module] = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
            masks[module][row, col] = True
        return masks

    def activation_positions(self, adapter: ArchitectureAdapter) -> dict[nn.Module, tuple[tuple[int, int], ...]]:
        """``{down_proj module: ((token, input channel), ...)}``: the super activations' sources."""
        out: dict[nn.Module, list[tuple[int, int]]] = {}
        for (layer, _row, col), token in zip(self.weights, self.tokens, strict=True):
            out.setdefault(adapter.down_proj(layer), []).append((token, col))
        return {module: tuple(sorted(set(pos))) for module, pos in out.items()}


# ------------------------------------------------------------------------------------------------ schemes


class ActivationGranularity(str, Enum):
    """One activation scale per token (row of ``x[..., features]``) or per tensor (per sequence ``x[b]``)."""

    PER_TOKEN = "per_token"
    PER_TENSOR = "per_tensor"


@dataclass(frozen=True)
class WeightOnlyScheme:
    """Weight-only RTN, blockwise: ``bits``-bit asymmetric min-max per block of ``block_size`` elements."""

    bits: int = 4
    block_size: int = 128**2

    @property
    def weight_spec(self) -> QuantSpec:
        return QuantSpec(self.bits, Scheme.ASYMMETRIC, Granularity.BLOCKWISE, self.block_size)

    @property
    def label(self) -> str:
        side = math.isqrt(self.block_size)
        block = f"{side}²" if side * side == self.block_size else str(self.block_size)
        return f"W{self.bits} block {block}"


@dataclass(frozen=True)
class W8A8Scheme:
    """Weights 8-bit per tensor (asymmetric), input activations of every decoder Linear 8-bit (symmetric)."""

    activations: ActivationGranularity = ActivationGranularity.PER_TOKEN
    weight_bits: int = 8
    activation_bits: int = 8

    @property
    def weight_spec(self) -> QuantSpec:
        return QuantSpec(self.weight_bits, Scheme.ASYMMETRIC, Granularity.PER_TENSOR)

    @property
    def activation_spec(self) -> QuantSpec:
        # PER_CHANNEL on a 2-D view = one scale per row: a token (per token) or a whole sequence (per tensor)
        return QuantSpec(self.activation_bits, Scheme.SYMMETRIC, Granularity.PER_CHANNEL)

    @property
    def label(self) -> str:
        where = "per-token" if self.activations is ActivationGranularity.PER_TOKEN else "per-tensor"
        return f"W{self.weight_bits}A{self.activation_bits} {where}"


QuantScheme = WeightOnlyScheme | W8A8Scheme


def recovery(ppl_fp: float, ppl_naive: float, ppl_aware: float) -> float:
    """Share of the naive scheme's perplexity damage that the aware scheme removes:

        recovery = (PPL_naive − PPL_aware) / (PPL_naive − PPL_fp)

    1 = the aware scheme is as good as full precision, 0 = no better than naive, < 0 = worse than naive, > 1 =
    better than full precision. NaN when the naive scheme does no damage (PPL_naive ≤ PPL_fp): there is then
    nothing to recover, and a threshold on the perplexity ratio is the meaningful gate.
    """
    damage = ppl_naive - ppl_fp
    if not damage > 0:
        return math.nan
    return (ppl_naive - ppl_aware) / damage


# ------------------------------------------------------------------------------------------------ transforms


def quantize_weight(
    weight: Tensor, spec: QuantSpec, *, hold_out: Tensor | None = None, clip_z: float | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """``RESTORE(Q⁻¹(Q(CLIP_z(W))))``: clip per block (block = ``spec.block_size``, or the whole tensor),
    quantize with ``hold_out`` excluded from the group statistics, and return the held-out elements unchanged.

    ``clip_z=None`` or ``inf``: no clipping. ``hold_out=None`` and ``clip_z=None``: plain RTN (naive).
    ``out``: optional buffer for the result (see :func:`lmaudit.checks.quantization.quantizers.fake_quantize`).
    """
    if out is not None and not out.is_contiguous():
        # a transposed view (GPT-2's Conv1D keeps [in, out]): blocks follow the [out, in] view, so quantize into
        # a fresh tensor and copy it into the view
        return out.copy_(quantize_weight(weight, spec, hold_out=hold_out, clip_z=clip_z))
    source = weight
    if clip_z is not None and math.isfinite(clip_z):
        clipped = clip_outliers(weight, clip_z, block_size=spec.block_size)
        source = clipped if hold_out is None else torch.where(hold_out, weight, clipped, out=clipped)
    return fake_quantize(source, spec, hold_out=hold_out, out=out)


def activation_quantizer(
    spec: QuantSpec, granularity: ActivationGranularity, hold: Sequence[tuple[int, int]] = (),
) -> Callable[[Tensor], Tensor]:
    """``fn(x) -> x_q`` for a Linear's input ``x`` (``(batch, tokens, features)`` or ``(tokens, features)``).

    Per token: one group per row of ``x.reshape(-1, features)``; per tensor: one group per sequence.
    ``hold``: ``(token, channel)`` positions held out of their group's scale and restored bit for bit, in every
    sequence of the batch (the super activation: REPLACE by the median, quantize, RESTORE).

    Linears that read the same input tensor (q/k/v, gate/up) share one quantization: ``fn`` returns its previous
    output when called again on the very same, unmodified tensor object (``x is last`` and same ``_version``), so
    a decoder layer quantizes 4 inputs, not 7. It runs on torch's thread pool as set: switching to one thread
    and back around each call (tried) costs more than it saves on a quiet machine (smollm2-135m-instruct, W8A8
    per token, Σ of per-window minima over 4 repetitions: 1.35x full precision with the switch, 1.19x without).
    Cost of the quantization itself, one thread: ~0.3 ms per 256 × 576 input and ~0.8 ms per 256 × 1536 one.
    The result is bit-identical to quantizing each Linear's input on its own, group by group, with the literal
    median REPLACE / RESTORE (tests/test_quantization.py checks the logits of a whole model).
    """

    last: list[object] = [None, -1, None]  # (input, its _version, output) of the previous call

    def fn(x: Tensor) -> Tensor:
        if last[0] is x and last[1] == x._version:  # q/k/v (and gate/up) read the same tensor: quantize once
            return last[2]  # type: ignore[return-value]
        out = _quantize(x)
        last[:] = [x, x._version, out]
        return out

    def _quantize(x: Tensor) -> Tensor:
        mask = None
        if hold:
            mask = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
            for token, channel in hold:
                if token < x.shape[-2]:
                    mask[..., token, channel] = True
        if granularity is ActivationGranularity.PER_TOKEN:
            return fake_quantize(x, spec, hold_out=mask)
        rows = x.shape[0] if x.dim() == 3 else 1
        view = x.reshape(rows, -1)  # (sequences, tokens·features)
        held = None if mask is None else mask.reshape(rows, -1)
        return fake_quantize(view, spec, hold_out=held).reshape(x.shape)

    return fn


@contextmanager
def quantized(
    adapter: ArchitectureAdapter, scheme: QuantScheme, outliers: SuperOutliers | None = None, *,
    clip_z: float | None = None,
) -> Iterator[int]:
    """Inside the block the model computes with ``scheme``; yields the bytes of the saved weight copies.

    ``outliers=None`` (and ``clip_z=None``) is the naive scheme; with ``outliers`` it is the aware one (plus
    clipping at ``clip_z`` for weight-only schemes). Weights are quantized once on entry and restored bit for bit
    on exit; activation quantization (W8A8) runs as a pre-hook on every forward pass.
    """
    if clip_z is not None and isinstance(scheme, W8A8Scheme):
        raise ValueError("clip_z applies to weight-only schemes; W8A8 does not clip")
    linears = adapter.decoder_linears()
    masks = outliers.weight_masks(adapter) if outliers is not None else {}
    spec = scheme.weight_spec
    plain = [m for m in linears.values() if m not in masks]
    saved = sum(w.numel() * w.element_size() for w in map(adapter.weight, linears.values()))
    with ExitStack() as stack:
        stack.enter_context(transform_weights(
            plain, lambda w, out: quantize_weight(w, spec, clip_z=clip_z, out=out)))
        for module, mask in masks.items():
            stack.enter_context(transform_weights(
                [module], lambda w, out, mask=mask: quantize_weight(w, spec, hold_out=mask, clip_z=clip_z, out=out)))
        if isinstance(scheme, W8A8Scheme):
            positions = outliers.activation_positions(adapter) if outliers is not None else {}
            act = scheme.activation_spec
            stack.enter_context(transform_inputs(
                [m for m in linears.values() if m not in positions],
                activation_quantizer(act, scheme.activations)))
            for module, hold in positions.items():
                stack.enter_context(transform_inputs([module], activation_quantizer(act, scheme.activations, hold)))
        yield saved


# ------------------------------------------------------------------------------------------------ z search


@dataclass(frozen=True)
class ClipSearch:
    """The clipping threshold z chosen on the calibration slice: mean NLL (nats/token) per candidate."""

    candidates: tuple[float, ...]
    calibration_nll: tuple[float, ...]
    z: float
    calibration_tokens: int

    @property
    def margin(self) -> float:
        """Mean NLL of the runner-up minus the chosen one (nats/token): how clear the choice was (NaN alone)."""
        ordered = sorted(v for v in self.calibration_nll if math.isfinite(v))
        return ordered[1] - ordered[0] if len(ordered) > 1 else math.nan


def search_clip_z(
    adapter: ArchitectureAdapter, scheme: WeightOnlyScheme, outliers: SuperOutliers, calibration: Tensor, *,
    candidates: Sequence[float] = DEFAULT_Z_CANDIDATES, batch_size: int = 4,
) -> ClipSearch:
    """argmin over ``candidates`` of the aware scheme's mean NLL on ``calibration`` windows (ties: the first
    candidate, so list milder clipping first). One weight quantization and one forward pass per candidate."""
    if not candidates:
        raise ValueError("search_clip_z needs at least one candidate z")
    nlls = []
    for z in candidates:
        with quantized(adapter, scheme, outliers, clip_z=z):
            nll = window_nll(adapter.model, calibration, batch_size=batch_size)
        nlls.append(perplexity_from_nll(nll, calibration)[1])
    best = min(range(len(nlls)), key=lambda i: (nlls[i] if math.isfinite(nlls[i]) else math.inf, i))
    n_tokens = int(calibration.shape[0] * (calibration.shape[1] - 1))
    return ClipSearch(tuple(float(z) for z in candidates), tuple(nlls), float(candidates[best]), n_tokens)


# ------------------------------------------------------------------------------------------------ memory


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (shared tensors, e.g. tied embeddings, counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class MemoryUse:
    """Memory of one quantized evaluation (see the module docstring for the method); plain numbers."""

    model_bytes: int
    saved_bytes: int  # exact: the weight copies transform_weights keeps
    rss_start_bytes: int
    rss_peak_bytes: int
    peak_bytes: int  # model_bytes + (rss_peak_bytes − rss_start_bytes)
    peak_ratio: float  # peak_bytes / model_bytes
    method: str = "RSS sampled from /proc/self/statm every 5 ms; peak = model + (peak RSS − RSS on entry)"

    @classmethod
    def measured(cls, model_size: int, saved: int, rss_start: int, rss_peak: int) -> MemoryUse:
        peak = model_size + max(0, rss_peak - rss_start)
        return cls(model_size, saved, rss_start, rss_peak, peak, peak / model_size)


class MemoryMeter:
    """Context manager sampling this process's RSS in a thread; ``.use(model_bytes, saved_bytes)`` afterwards.

    Falls back to ``resource.getrusage`` maxrss (which only sees new process-wide peaks) off Linux.
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.start = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> MemoryMeter:
        if os.path.exists("/proc/self/statm"):
            self.start = self.peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        else:  # pragma: no cover - non-Linux
            import resource

            self.start = self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())
        else:  # pragma: no cover
            import resource

            self.peak = max(self.peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

    def use(self, model_size: int, saved: int) -> MemoryUse:
        return MemoryUse.measured(model_size, saved, self.start, self.peak)


# ------------------------------------------------------------------------------------------------ evaluation


@dataclass(frozen=True)
class QuantizedEval:
    """Perplexity of one variant (naive or aware) of a scheme on each corpus, with its cost."""

    perplexity: dict[str, float]  # corpus name -> PPL (pinned definition, lmaudit.checks.core.perplexity)
    quantize_s: float  # entering the scheme: weight fake-quantization (once)
    eval_s: dict[str, float]  # corpus name -> seconds of window_nll
    memory: MemoryUse

    @property
    def seconds(self) -> float:
        """Quantizing plus scoring every corpus."""
        return self.quantize_s + sum(self.eval_s.values())


def evaluate_quantized(
    adapter: ArchitectureAdapter, scheme: QuantScheme, windows: Mapping[str, Tensor], *,
    outliers: SuperOutliers | None = None, clip_z: float | None = None, batch_size: int = 4,
) -> QuantizedEval:
    """Enter ``quantized(...)`` once and score every corpus's windows inside it (``window_nll``)."""
    ppl: dict[str, float] = {}
    seconds: dict[str, float] = {}
    with MemoryMeter() as meter:
        started = time.perf_counter()
        with quantized(adapter, scheme, outliers, clip_z=clip_z) as saved:
            quantize_s = time.perf_counter() - started
            for name, w in windows.items():
                t0 = time.perf_counter()
                nll = window_nll(adapter.model, w, batch_size=batch_size)
                seconds[name] = time.perf_counter() - t0
                ppl[name] = perplexity_from_nll(nll, w)[0]
    return QuantizedEval(ppl, quantize_s, seconds, meter.use(model_bytes(adapter.model), saved))
