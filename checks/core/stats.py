"""Statistics the audits share: rank and linear correlation, the exact sign test, seeded draws, spreads.

One copy of each, so every area computes "significant", "correlated" and "random control" the same way.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

Neuron = tuple[int, int]  # (layer, neuron index: an input channel of that layer's down projection)

# Seed streams: what ranks (chooses neurons, heads, clip thresholds) is drawn from another stream than what
# judges, so a selection never sees the data it is measured on. ``derived_seed(seed, stream)``.
STREAMS = {"evaluate": 0, "rank": 1, "confirm": 2, "control": 3, "train": 4, "calibrate": 5}
_STREAM_STRIDE = 1000


def derived_seed(seed: int, stream: str) -> int:
    """The seed of ``stream`` for session seed ``seed``: ``seed + 1000·STREAMS[stream]`` (disjoint for
    session seeds below 1000)."""
    if stream not in STREAMS:
        raise ValueError(f"unknown seed stream {stream!r}; choose one of {', '.join(STREAMS)}")
    return int(seed) + _STREAM_STRIDE * STREAMS[stream]


def pearson(x: Sequence[float] | torch.Tensor, y: Sequence[float] | torch.Tensor) -> float:
    """Pearson correlation (float64); NaN when either side is constant or has fewer than 2 values."""
    tx, ty = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    if tx.shape != ty.shape:
        raise ValueError(f"pearson: shapes {tuple(tx.shape)} and {tuple(ty.shape)} differ")
    if tx.numel() < 2:
        return math.nan
    tx, ty = tx - tx.mean(), ty - ty.mean()
    denominator = float(tx.norm() * ty.norm())
    return float((tx * ty).sum()) / denominator if denominator > 0 else math.nan


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ: the Pearson correlation of the ranks. NaN with fewer than 3 pairs, a non-finite value, or a
    constant side."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} x values but {len(y)} y values")
    if len(x) < 3 or not all(math.isfinite(v) for v in (*x, *y)):
        return math.nan
    return pearson(ranks(list(x)), ranks(list(y)))


def sign_test_p(successes: int, failures: int) -> float:
    """One-sided exact sign test: ``P(Binom(n, ½) ≥ successes)`` with ``n = successes + failures`` (1 when n=0).

    E.g. an ablation that breaks ``b`` prompts and fixes ``c``: the p-value of "it breaks more than it fixes"."""
    n = successes + failures
    return sum(math.comb(n, k) for k in range(successes, n + 1)) / 2**n if n else 1.0


def bonferroni(alpha: float, n_tests: int) -> float:
    """The per-test level that keeps the family-wise error at ``alpha`` over ``n_tests`` tests."""
    return alpha / max(1, n_tests)


def random_neurons(layers: Sequence[int], width: int, k: int, *, seed: int,
                   exclude: Sequence[Neuron] = ()) -> tuple[Neuron, ...]:
    """``k`` distinct neurons drawn uniformly from ``layers`` (each ``width`` wide), none in ``exclude``;
    seeded with a ``torch.Generator`` so a draw is the same on every machine."""
    layers = list(layers)
    excluded = {layers.index(layer) * width + n for layer, n in exclude if layer in layers}
    if k > len(layers) * width - len(excluded):
        raise ValueError(f"cannot draw {k} neurons from {len(layers)} layers x {width} minus {len(excluded)}")
    order = torch.randperm(len(layers) * width, generator=torch.Generator().manual_seed(seed)).tolist()
    picked = [i for i in order if i not in excluded][:k]
    return tuple((layers[i // width], i % width) for i in picked)


def layer_range(n_layers: int, start: float, stop: float = 1.0) -> list[int]:
    """The layers between fractions ``start`` and ``stop`` of the depth, e.g. ``(0.8, 1.0)``: the last 20 % of
    the layers (at least one). Parameters relative to the model instead of layer numbers."""
    if not 0 <= start < stop <= 1:
        raise ValueError(f"layer fractions must satisfy 0 <= start < stop <= 1, got {start}, {stop}")
    first = min(n_layers - 1, int(math.floor(start * n_layers)))
    last = max(first + 1, int(math.ceil(stop * n_layers)))
    return list(range(first, min(last, n_layers)))


@dataclass(frozen=True)
class Spread:
    """A control measured over several seeded draws: mean, standard deviation, extremes, and the count."""

    mean: float
    std: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        values = [float(v) for v in values]
        if not values:
            return cls(math.nan, math.nan, math.nan, math.nan, 0)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.fmean(values), std, min(values), max(values), len(values))

    STATS = ("mean", "std", "min", "max")

    @classmethod
    def metric_names(cls, template: str) -> tuple[str, ...]:
        """The names :meth:`metrics` gives: ``template`` with ``{}`` replaced by mean, std, min and max."""
        return tuple(template.format(stat) for stat in cls.STATS)

    def metrics(self, template: str) -> dict[str, float]:
        """The spread as metrics named by ``template`` (``"control_{}_accuracy"``), for ``@metric_group``."""
        return {template.format(stat): getattr(self, stat) for stat in self.STATS}

    def upper(self, z: float = 1.645) -> float:
        """A one-sided normal bound on a new draw, ``mean + z·std`` (z = 1.645: 95 %)."""
        return self.mean + z * self.std

    def lower(self, z: float = 1.645) -> float:
        return self.mean - z * self.std
