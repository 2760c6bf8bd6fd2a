"""Data-free super-weight detection, confirmed causally (Yu et al. 2024, "The Super Weight in Large Language
Models", §3.2).

A super weight is one scalar ``W_down[row, col]`` of a layer's MLP down projection that, multiplied by a huge
neuron activation ``x[t, col]``, writes a *super activation* into channel ``row`` of the residual stream at token
``t``; the super activation then persists through the following layers. Detection on one prompt:

1. **Scan** (one forward pass). For every layer ℓ (all of them: there is no depth cut)::

       in_max[ℓ]  = max_{t,k} |x_ℓ[t, k]|     x = the down projection's input (the neuron activations)
       out_max[ℓ] = max_{t,c} |w_ℓ[t, c]|     w = what the MLP branch adds to the residual stream: the output of
                                              ``adapter.ffn_write_module(ℓ)``, i.e. the post-FFN norm of
                                              Gemma 2/3 and OLMo 2 ("sandwich norms"), else the down projection

   ℓ is a *spike layer* when ``in_max[ℓ] ≥ spike_factor · median_ℓ' in_max[ℓ']`` and the same holds for
   ``out_max`` (the median ignores the few spikes themselves).
2. **Candidate**, at the earliest spike layer not yet ruled out: ``row`` = the channel of ``out_max``, ``t`` =
   its token, ``col = argmax_k |W[row, k] · x[t, k]|``: the largest *contribution* to the spike (not the largest
   input, which may meet a small weight).
3. **Causal test** (one forward pass). In the otherwise unedited model, zero the candidate together with the
   super weights already confirmed in the same layer and row (several weights can write one super activation)
   and compare the residual stream in channel ``row`` at token ``t`` over the next ``confirm_layers`` layers
   ``D = ℓ+1 … ℓ+confirm_layers`` (those that exist)::

       collapse = max_{ℓ'∈D} |h_ℓ'[t, row]| (unedited)  /  max_{ℓ'∈D} |h_ℓ'[t, row]| (candidate zeroed)

   ``collapse ≥ collapse_factor``: confirmed. Otherwise, while layer ℓ still spikes in the same row, the next
   largest contribution of that row joins the candidate and the test repeats. When the spike is gone and the
   residual stream did not collapse, the spike is a *massive activation* that does not make a persistent super
   activation (typically a late layer writing against the super activation before the output, or the last
   layer, which has no later layer to persist in): it is reported in
   :attr:`SuperWeightDetection.massive_activations`, never as a super weight.
4. Every spike layer of a scan is tried in turn (a late spike that writes *against* the super activation exists
   only while the super activation does, so it is tested before anything is zeroed). Then, if something was
   confirmed, zero every confirmed super weight and scan again (the paper's iterative re-detection), until a scan
   confirms nothing or ``max_super_weights`` are confirmed.

Prompts are encoded under the BOS policy of :func:`lmaudit.checks.core.logprobs.encode_prompts`, or without
the BOS token (``bos=False``: prompt invariance, where a BOS in front would make every prompt start alike).
Several prompts are searched together (:func:`detect_many`): each step is one right-padded batched pass per
group of prompts that need the same weights zeroed, with padded positions masked out of the maxima. Every pass
runs under :func:`lmaudit.checks.core.hooks.nonfinite_guard`: NaN or inf raises
:class:`~lmaudit.checks.core.errors.NonFiniteOutputError` naming the layer, never "no super weight".
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lmaudit.checks.core.accuracy import no_logits
from lmaudit.checks.core.adapter import ArchitectureAdapter
from lmaudit.checks.core.errors import LmAuditError, PremiseMissing
from lmaudit.checks.core.hooks import first_tensor, hooks, nonfinite_guard
from lmaudit.checks.core.interventions import edit_down_proj_weights
from lmaudit.checks.core.loading import LoadedModel
from lmaudit.checks.core.logprobs import bos_prefix, encode_prompts, right_pad
from lmaudit.checks.core.outliers import Coordinate
from lmaudit.checks.core.results import CheckResult, metric

DEFAULT_PROMPT = "Apple Inc. is a worldwide tech company."  # the paper's detection prompt


@dataclass(frozen=True)
class DetectionSettings:
    """What decides a detection; every field is relative to the model (factors and layer counts, no values)."""

    spike_factor: float = 50.0  # super activations stand 100-1000x above the median layer's maximum; ordinary < 10x
    collapse_factor: float = 10.0  # zeroing a super weight must shrink its channel's residual spike 10-fold
    confirm_layers: int = 3  # "persists through the following layers": judged on the next 3 (those that exist)
    max_super_weights: int = 8  # the paper's directory lists at most 6 per model

    def __post_init__(self) -> None:
        if not self.spike_factor > 1:
            raise LmAuditError(f"spike_factor must be > 1, got {self.spike_factor}")
        if not self.collapse_factor > 1:
            raise LmAuditError(f"collapse_factor must be > 1, got {self.collapse_factor}")
        for name in ("confirm_layers", "max_super_weights"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LmAuditError(f"{name} must be an int >= 1, got {value!r}")


# ------------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class LayerMaxima:
    """max |down-projection input| and max |residual write| of one layer, with where they occur."""

    layer: int
    input_max: float
    input_token: int
    input_channel: int
    output_max: float  # of what the layer writes into the residual stream (post-FFN norm output when it has one)
    output_token: int
    output_channel: int


@dataclass(frozen=True)
class DetectionRound:
    """One scan: every layer's maxima with the confirmed super weights zeroed, and which layers spiked."""

    index: int
    held_out: tuple[Coordinate, ...]
    maxima: tuple[LayerMaxima, ...]
    input_median: float
    output_median: float
    spike_layers: tuple[int, ...]


@dataclass(frozen=True)
class CausalTest:
    """One causal test: the residual spike in ``row`` at ``token`` over ``layers``, unedited and with ``zeroed``."""

    layer: int
    row: int
    token: int
    zeroed: tuple[Coordinate, ...]
    layers: tuple[int, ...]  # D: the residual stream entering these layers is compared
    residual_unedited: float  # max over D of |h[token, row]|
    residual_zeroed: float
    collapse: float  # residual_unedited / residual_zeroed
    still_spiking: bool  # layer still spikes in the same row with the candidate zeroed
    confirmed: bool


@dataclass(frozen=True)
class SuperWeight:
    """``W_down[row, col]`` of ``layer``: confirmed to make the super activation in channel ``row`` at ``token``."""

    layer: int
    row: int  # output channel = the residual channel of the super activation
    col: int  # input channel = the neuron whose huge activation it multiplies
    weight: float
    input_activation: float  # x[token, col] (signed)
    contribution: float  # weight · input_activation: this weight's share of the down projection's output
    activation: float  # y[token, row]: the down projection's output, every weight of the row present (signed)
    write: float  # what the layer adds to the residual stream there (= activation without a post-FFN norm)
    token: int  # position in the encoded prompt (BOS included when the policy adds one)
    collapse: float  # of the causal test that confirmed it
    prompt: str

    @property
    def coordinates(self) -> Coordinate:
        return (self.layer, self.row, self.col)

    def label(self) -> str:
        return f"L{self.layer}[{self.row}, {self.col}]"


@dataclass(frozen=True)
class MassiveActivation:
    """A spike that failed the causal test: zeroing ``cols`` did not collapse the residual stream downstream."""

    layer: int
    row: int
    cols: tuple[int, ...]
    token: int
    input_max: float
    write: float  # signed write into the residual stream at (token, row)
    collapse: float  # NaN when the layer has no later layer to test on
    reason: str

    def label(self) -> str:
        zeroed = f"neurons {', '.join(map(str, self.cols))}" if self.cols else "not testable"
        return f"L{self.layer}[{self.row}] ({zeroed})"


@dataclass(frozen=True)
class SuperWeightDetection:
    """Every super weight confirmed on one prompt, in the order found, and all the evidence."""

    prompt: str
    n_tokens: int
    bos: bool  # whether the encoded prompt starts with the BOS token
    first_token: str  # the first token of the prompt as text (what invariance varies)
    n_layers: int
    super_weights: tuple[SuperWeight, ...]
    massive_activations: tuple[MassiveActivation, ...]
    rounds: tuple[DetectionRound, ...]
    tests: tuple[CausalTest, ...]
    settings: DetectionSettings
    seconds: float

    @property
    def coordinates(self) -> list[Coordinate]:
        return [sw.coordinates for sw in self.super_weights]

    @property
    def coordinate_set(self) -> tuple[Coordinate, ...]:
        """The coordinates sorted (the order found may differ between prompts that find the same weights)."""
        return tuple(sorted(self.coordinates))

    @property
    def channels(self) -> list[int]:
        """Residual channels of the super activations (sorted, unique)."""
        return sorted({sw.row for sw in self.super_weights})

    def labels(self) -> str:
        return ", ".join(sw.label() for sw in self.super_weights) or "none"

    def why_none(self) -> str:
        """What was looked for and what was found, when no super weight was confirmed."""
        prompt = f"on the prompt {self.prompt[:60]!r}"
        first = self.rounds[0] if self.rounds else None
        if first is None or not first.spike_layers:
            if first is None:
                return f"no scan ran {prompt}"
            top_in = max(first.maxima, key=lambda m: m.input_max)
            top_out = max(first.maxima, key=lambda m: m.output_max)
            return (f"no layer spiked {prompt}: a spike needs both max |down-projection input| and max |residual "
                    f"write| ≥ {self.settings.spike_factor:g}× the median layer's; the largest were "
                    f"{top_in.input_max / max(first.input_median, 1e-30):.1f}× (input, layer {top_in.layer}) and "
                    f"{top_out.output_max / max(first.output_median, 1e-30):.1f}× (write, layer {top_out.layer})")
        seen = "; ".join(f"{m.label()}: {m.reason}" for m in self.massive_activations) or "none tested"
        return (f"spike layers {list(first.spike_layers)} {prompt}, but no candidate made a persistent super "
                f"activation (zeroing it must shrink the residual spike ≥ {self.settings.collapse_factor:g}× over "
                f"the next {self.settings.confirm_layers} layers): {seen}")

    def require(self) -> tuple[SuperWeight, ...]:
        """The confirmed super weights; :class:`PremiseMissing` (with :meth:`why_none`) when there is none."""
        if not self.super_weights:
            raise PremiseMissing(f"no confirmed super weight: {self.why_none()}")
        return self.super_weights


@dataclass(frozen=True)
class SuperWeightDirectory(CheckResult):
    """The confirmed super weights of the model (its row of the paper's Table 2), with the evidence."""

    detection: SuperWeightDetection

    @metric
    def n_super_weights(self) -> int:
        return len(self.detection.super_weights)

    @metric
    def coordinates(self) -> list[list[int]]:
        return [list(c) for c in self.detection.coordinates]

    @metric
    def channels(self) -> list[int]:
        return self.detection.channels

    @metric
    def first_layer(self) -> int:
        return min(sw.layer for sw in self.detection.super_weights)

    @metric
    def first_layer_fraction(self) -> float:
        """The first super weight's layer over the number of layers: how early in the depth it sits."""
        return self.first_layer / self.detection.n_layers

    @metric
    def max_activation(self) -> float:
        return max(abs(sw.activation) for sw in self.detection.super_weights)

    @metric
    def min_collapse(self) -> float:
        """The weakest confirmation: how many times the residual spike shrank when the super weights were zeroed."""
        return min(sw.collapse for sw in self.detection.super_weights)

    @metric
    def n_massive_activations(self) -> int:
        """Spikes ruled out by the causal test (reported apart, not super weights)."""
        return len(self.detection.massive_activations)

    @metric
    def seconds(self) -> float:
        return self.detection.seconds


# ------------------------------------------------------------------------------------------------ one pass


@dataclass
class _Row:
    """One prompt's share of one forward pass."""

    maxima: tuple[LayerMaxima, ...]
    down_value: Tensor  # (n_layers,) signed down-projection output at each layer's (output_token, output_channel)
    write_value: Tensor  # (n_layers,) signed residual write there
    x_at_out: Tensor  # (n_layers, intermediate) signed neuron activations at each layer's output_token
    hidden: Tensor  # (n_layers + 1, T, hidden): the residual stream entering each layer (last: after the final norm)


@torch.no_grad()
def _forward(adapter: ArchitectureAdapter, seqs: Sequence[Sequence[int]]) -> list[_Row]:
    """One forward pass over ``seqs`` (right-padded); per sequence the maxima of every layer (real tokens only)."""
    n, hidden_size = adapter.n_layers, adapter.hidden_size
    ids, mask, _ = right_pad(seqs, adapter.device)  # padded with id 0, masked out
    keep = mask.bool()[..., None]  # (b, T, 1)
    rows = torch.arange(len(seqs), device=ids.device)
    down: dict[int, tuple[Tensor, Tensor]] = {}
    stats: list[dict[str, Tensor]] = [{} for _ in range(n)]

    def on_down(layer: int) -> Any:
        def fn(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            down[layer] = (args[0].detach().float(), first_tensor(output).detach().float())  # x (b,T,I), y (b,T,H)
            if adapter.ffn_write_module(layer) is module:
                on_write(layer, down[layer][1])

        return fn

    def on_write(layer: int, w: Tensor) -> None:
        x, y = down.pop(layer)
        in_max, in_flat = (x.abs() * keep).flatten(1).max(dim=1)  # (b,)
        out_max, out_flat = (w.abs() * keep).flatten(1).max(dim=1)
        token, channel = out_flat // hidden_size, out_flat % hidden_size
        stats[layer] = {"in_max": in_max, "in_flat": in_flat, "out_max": out_max, "out_flat": out_flat,
                        "write": w[rows, token, channel], "down": y[rows, token, channel], "x": x[rows, token]}

    def on_post_norm(layer: int) -> Any:
        def fn(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            on_write(layer, first_tensor(output).detach().float())

        return fn

    forward = [(adapter.down_proj(i), on_down(i)) for i in range(n)]
    forward += [(adapter.ffn_write_module(i), on_post_norm(i)) for i in range(n)
                if adapter.ffn_write_module(i) is not adapter.down_proj(i)]
    with nonfinite_guard(adapter), hooks(forward=forward):
        out = adapter.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False,
                            **no_logits(adapter.model))  # only the residual stream is needed
    hidden = torch.stack([h.detach().float() for h in out.hidden_states])  # (n+1, b, T, H)
    intermediate = stats[0]["x"].shape[1]
    result = []
    for b, seq in enumerate(seqs):
        maxima = []
        for layer, s in enumerate(stats):
            in_token, in_channel = divmod(int(s["in_flat"][b]), intermediate)
            out_token, out_channel = divmod(int(s["out_flat"][b]), hidden_size)
            maxima.append(LayerMaxima(layer, float(s["in_max"][b]), in_token, in_channel, float(s["out_max"][b]),
                                      out_token, out_channel))
        result.append(_Row(tuple(maxima), torch.stack([s["down"][b] for s in stats]),
                           torch.stack([s["write"][b] for s in stats]), torch.stack([s["x"][b] for s in stats]),
                           hidden[:, b, : len(seq)]))
    return result


def spike_layers(maxima: Sequence[LayerMaxima], spike_factor: float) -> tuple[tuple[int, ...], float, float]:
    """``(spike layers, input median, output median)``: both maxima ≥ ``spike_factor`` × the median layer's."""
    input_median = statistics.median(m.input_max for m in maxima)
    output_median = statistics.median(m.output_max for m in maxima)
    spikes = tuple(m.layer for m in maxima
                   if m.input_max >= spike_factor * input_median and m.output_max >= spike_factor * output_median)
    return spikes, float(input_median), float(output_median)


def _largest_contribution(adapter: ArchitectureAdapter, layer: int, row: int, x: Tensor,
                          exclude: set[int]) -> tuple[int, float, float]:
    """``(col, x[col], W[row, col]·x[col])`` maximising ``|W[row, col]·x[col]|`` over columns not in ``exclude``."""
    contribution = adapter.down_proj_weight(layer)[row].detach().float().to(x.device) * x  # (intermediate,)
    ranked = contribution.abs()
    if exclude:
        ranked[list(exclude)] = -1.0
    col = int(ranked.argmax())
    return col, float(x[col]), float(contribution[col])


# ------------------------------------------------------------------------------------------------ search


@dataclass
class _Candidate:
    layer: int
    row: int
    token: int
    cols: list[int]
    inputs: list[tuple[float, float]]  # (x[col], contribution) per col, when chosen
    scan: _Row  # the scan it was chosen in
    recorded: int = 0  # cols already confirmed (the group keeps growing while the layer still spikes in the row)


@dataclass
class _Search:
    """The detection state of one prompt; :meth:`zeroed` says which pass it needs next."""

    prompt: str
    ids: list[int]
    settings: DetectionSettings
    n_layers: int
    found: list[SuperWeight] = field(default_factory=list)
    massive: list[MassiveActivation] = field(default_factory=list)
    rounds: list[DetectionRound] = field(default_factory=list)
    tests: list[CausalTest] = field(default_factory=list)
    unedited: _Row | None = None  # the first scan: nothing zeroed
    scan: _Row | None = None
    queue: list[int] = field(default_factory=list)  # spike layers of the latest scan not tried yet
    ruled_out: set[tuple[int, int]] = field(default_factory=set)  # (layer, row) of massive activations
    candidate: _Candidate | None = None
    confirmed_in_scan: bool = False
    done: bool = False

    def zeroed(self) -> tuple[Coordinate, ...]:
        """The scan context (every confirmed super weight), or the candidate's causal-test context."""
        if self.candidate is None:
            return tuple(sw.coordinates for sw in self.found)
        c = self.candidate
        same = [sw.coordinates for sw in self.found if (sw.layer, sw.row) == (c.layer, c.row) and sw.col not in c.cols]
        return (*same, *((c.layer, c.row, col) for col in c.cols))

    def take(self, adapter: ArchitectureAdapter, row: _Row) -> None:
        """Consume the result of the pass :meth:`zeroed` asked for."""
        if self.candidate is None:
            self._scanned(adapter, row)
        else:
            self._tested(adapter, row)

    def _scanned(self, adapter: ArchitectureAdapter, row: _Row) -> None:
        if self.unedited is None:
            self.unedited = row
        spikes, in_median, out_median = spike_layers(row.maxima, self.settings.spike_factor)
        self.rounds.append(DetectionRound(len(self.rounds), tuple(sw.coordinates for sw in self.found), row.maxima,
                                          in_median, out_median, spikes))
        self.scan, self.queue = row, list(spikes)
        self._next_candidate(adapter)

    def _next_candidate(self, adapter: ArchitectureAdapter) -> None:
        """The next spike layer of the latest scan to test; when none is left, scan again if this scan confirmed
        something (zeroing it may uncover more), else stop."""
        assert self.scan is not None
        while self.queue and len(self.found) < self.settings.max_super_weights:
            layer = self.queue.pop(0)
            m = self.scan.maxima[layer]
            if (layer, m.output_channel) in self.ruled_out or any(
                    (sw.layer, sw.row) == (layer, m.output_channel) for sw in self.found):
                continue  # ruled out, or its super activation is confirmed (its group grew while it spiked)
            if layer == self.n_layers - 1:  # nothing downstream: it cannot be a persistent super activation
                self._rule_out(layer, m.output_channel, m.output_token, (), float("nan"),
                               "the last layer: no later layer for a super activation to persist in")
                continue
            taken = {sw.col for sw in self.found if (sw.layer, sw.row) == (layer, m.output_channel)}
            col, x, contribution = _largest_contribution(adapter, layer, m.output_channel, self.scan.x_at_out[layer],
                                                         taken)
            self.candidate = _Candidate(layer, m.output_channel, m.output_token, [col], [(x, contribution)],
                                        self.scan)
            return
        if self.confirmed_in_scan and len(self.found) < self.settings.max_super_weights:
            self.scan, self.confirmed_in_scan = None, False  # scan again with the new super weights zeroed
        else:
            self.done = True

    def _tested(self, adapter: ArchitectureAdapter, row: _Row) -> None:
        c, settings = self.candidate, self.settings
        assert c is not None and self.unedited is not None
        layers = tuple(range(c.layer + 1, min(c.layer + 1 + settings.confirm_layers, self.n_layers)))
        before = float(self.unedited.hidden[list(layers), c.token, c.row].abs().max())
        after = float(row.hidden[list(layers), c.token, c.row].abs().max())
        collapse = before / max(after, 1e-30)
        m = row.maxima[c.layer]
        still = (c.layer in spike_layers(row.maxima, settings.spike_factor)[0] and m.output_channel == c.row
                 and m.output_token == c.token)
        confirmed = collapse >= settings.collapse_factor
        self.tests.append(CausalTest(c.layer, c.row, c.token, self.zeroed(), layers, before, after, collapse, still,
                                     confirmed))
        if confirmed:
            weights = adapter.down_proj_weight(c.layer)
            for col, (x, contribution) in zip(c.cols[c.recorded :], c.inputs[c.recorded :], strict=True):
                self.found.append(SuperWeight(
                    c.layer, c.row, col, float(weights[c.row, col].detach()), x, contribution,
                    float(c.scan.down_value[c.layer]), float(c.scan.write_value[c.layer]), c.token, collapse,
                    self.prompt))
            c.recorded, self.confirmed_in_scan = len(c.cols), True
        if still and len(self.found) - c.recorded + len(c.cols) < settings.max_super_weights:
            # the layer still spikes in this row: the next largest contribution joins (the paper's re-detection)
            taken = set(c.cols) | {sw.col for sw in self.found if (sw.layer, sw.row) == (c.layer, c.row)}
            col, x, contribution = _largest_contribution(adapter, c.layer, c.row, row.x_at_out[c.layer], taken)
            c.cols.append(col)
            c.inputs.append((x, contribution))
        elif c.recorded:
            self.candidate = None
            self._next_candidate(adapter)  # the other spike layers of this scan first (a canceller may need it)
        else:
            why = ("the layer still spikes with every weight it may zero" if still else
                   f"zeroing it removed the spike, but the residual stream in channel {c.row} over layers "
                   f"{layers[0]}-{layers[-1]} changed by ×{collapse:.3g} (a super activation collapses "
                   f"≥ {settings.collapse_factor:g}×)")
            self.candidate = None
            self._rule_out(c.layer, c.row, c.token, tuple(c.cols), collapse, why)
            self._next_candidate(adapter)

    def _rule_out(self, layer: int, row: int, token: int, cols: tuple[int, ...], collapse: float,
                  reason: str) -> None:
        assert self.scan is not None
        self.ruled_out.add((layer, row))
        self.massive.append(MassiveActivation(layer, row, cols, token, self.scan.maxima[layer].input_max,
                                              float(self.scan.write_value[layer]), collapse, reason))


def encode(tokenizer: Any, prompts: Sequence[str], *, bos: bool = True) -> list[list[int]]:
    """Token ids under the BOS policy, or without the BOS token (``bos=False``); an empty result is an error."""
    encoded = encode_prompts(tokenizer, prompts)
    if not bos:
        encoded = [ids[len(bos_prefix(tokenizer)) :] for ids in encoded]
    empty = [p for p, ids in zip(prompts, encoded, strict=True) if not ids]
    if empty:
        raise LmAuditError(f"prompt(s) {empty[:3]!r} encode to no tokens")
    return encoded


@torch.no_grad()
def detect_many(model: LoadedModel, prompts: Sequence[str], *, bos: bool = True,
                settings: DetectionSettings = DetectionSettings()) -> list[SuperWeightDetection]:
    """Detect on every prompt independently (module docstring); passes are batched across prompts that need the
    same weights zeroed. Returns one :class:`SuperWeightDetection` per prompt, in order."""
    if isinstance(prompts, str) or not prompts:
        raise LmAuditError("pass a non-empty list of prompts")
    started = time.perf_counter()
    adapter, tokenizer = model.adapter, model.tokenizer
    searches = [_Search(p, ids, settings, adapter.n_layers)
                for p, ids in zip(prompts, encode(tokenizer, prompts, bos=bos), strict=True)]
    # each pass confirms a weight, grows a candidate or rules a (layer, row) out: bounded by the settings
    for _ in range(4 * settings.max_super_weights + 4 * adapter.n_layers):
        groups: dict[tuple[Coordinate, ...], list[_Search]] = {}
        for search in searches:
            if not search.done:
                groups.setdefault(search.zeroed(), []).append(search)
        if not groups:
            break
        for zeroed, members in groups.items():
            with edit_down_proj_weights(adapter, zeroed, value=0.0):
                rows = _forward(adapter, [s.ids for s in members])
            for search, row in zip(members, rows, strict=True):
                search.take(adapter, row)
    seconds = time.perf_counter() - started
    has_bos = bos and bool(bos_prefix(tokenizer))
    return [SuperWeightDetection(s.prompt, len(s.ids), has_bos, tokenizer.decode(s.ids[int(has_bos):][:1]),
                                 adapter.n_layers, tuple(s.found), tuple(s.massive), tuple(s.rounds), tuple(s.tests),
                                 settings, seconds)
            for s in searches]


def detect(model: LoadedModel, prompt: str = DEFAULT_PROMPT, *, bos: bool = True,
           settings: DetectionSettings = DetectionSettings()) -> SuperWeightDetection:
    """The super weights of ``model`` found from one prompt (module docstring)."""
    return detect_many(model, [prompt], bos=bos, settings=settings)[0]
