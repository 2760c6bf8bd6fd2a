"""Data-free super-weight detection (Yu et al., "The Super Weight in Large Language Models", section 3.2).

A super weight is one scalar ``W_down[row, col]`` of an early MLP down projection that, multiplied by a huge
input activation ``x[t, col]``, writes a *super activation* ``y[t, row]`` into the residual stream; zeroing it
destroys the model. Detection, one forward pass per round:

1. Hook the input ``x`` (the neuron activations, ``[tokens, intermediate]``) and the output ``y``
   (``[tokens, hidden]``) of every layer's down projection and record, per layer ℓ,
   ``in_max[ℓ] = max |x|`` and ``out_max[ℓ] = max |y|`` with their token position and channel.
2. Layer ℓ is a *spike layer* when both maxima stand far above the typical layer:
   ``in_max[ℓ] ≥ spike_factor · median_ℓ' in_max[ℓ']`` and ``out_max[ℓ] ≥ spike_factor · median_ℓ' out_max[ℓ']``
   (the median over all layers is robust to the few spike layers themselves).
3. At the earliest spike layer within the first ``max_depth`` fraction of the layers:
   ``row`` = the output channel of ``out_max``, ``t`` = its token, ``col`` = the input channel of the max
   ``|x[t, ·]|`` among the channels not already held out in that row. The super weight is ``W_down[row, col]``.
4. Zero every super weight found so far (inside an intervention, the model is never changed) and repeat until
   no spike layer remains or ``max_rounds`` is reached.

Why ``max_depth``: the paper's directory (its Table 2) lists super weights only in early layers; the last
layers of many models hold massive activations of their own that prepare the output and that the paper does not
count as super activations. The default keeps the first half of the layers.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import torch

from checks.adapter import ArchitectureAdapter
from checks.context import AuditContext
from checks.hooks import capture
from checks.interventions import set_down_proj_weight
from checks.registry import CheckParams, register_check

DEFAULT_PROMPT = "Apple Inc. is a worldwide tech company."  # the paper's detection prompt


@dataclass(frozen=True)
class LayerMaxima:
    """max |input| and max |output| of one layer's down projection, with where they occur."""

    layer: int
    input_max: float
    input_token: int
    input_channel: int
    output_max: float
    output_token: int
    output_channel: int


@dataclass(frozen=True)
class DetectionRound:
    """The evidence of one round: every layer's maxima and which layers counted as spikes."""

    index: int
    maxima: tuple[LayerMaxima, ...]
    input_median: float
    output_median: float
    spike_layers: tuple[int, ...]


@dataclass(frozen=True)
class SuperWeight:
    """``W_down[row, col]`` of ``layer`` and the super activation ``y[token, row]`` it creates."""

    layer: int
    row: int  # output channel = the hidden channel of the super activation
    col: int  # input channel = the intermediate neuron that carries the huge input
    weight: float
    activation: float  # y[token, row] in the round that found it
    input_activation: float  # x[token, col]
    token: int
    prompt: str

    @property
    def coordinates(self) -> tuple[int, int, int]:
        return (self.layer, self.row, self.col)

    def label(self) -> str:
        return f"L{self.layer}[{self.row}, {self.col}]"


@dataclass(frozen=True)
class SuperWeightDetection:
    """All super weights found on one prompt, in the order found, with every round's evidence."""

    prompt: str
    n_tokens: int
    super_weights: tuple[SuperWeight, ...]
    rounds: tuple[DetectionRound, ...]
    spike_factor: float
    max_depth: float

    @property
    def coordinates(self) -> list[tuple[int, int, int]]:
        return [sw.coordinates for sw in self.super_weights]

    @property
    def channels(self) -> list[int]:
        """Hidden channels of the super activations (sorted, unique)."""
        return sorted({sw.row for sw in self.super_weights})


def down_proj_maxima(
    adapter: ArchitectureAdapter, input_ids: torch.Tensor
) -> tuple[tuple[LayerMaxima, ...], dict[str, torch.Tensor]]:
    """One forward pass on a single sequence; per layer, max |x| and max |y| of the down projection.

    Also returns the captured down-projection inputs ``{module name: (1, tokens, intermediate)}``.
    """
    names = [layer.down_proj for layer in adapter.layers]
    with capture(adapter.model, names, what="input") as inputs, capture(adapter.model, names, what="output") as outputs, torch.no_grad():
        adapter.model(input_ids=input_ids)
    maxima = []
    for index, name in enumerate(names):
        x = inputs[name][0].abs()  # (tokens, intermediate)
        y = outputs[name][0].abs()  # (tokens, hidden)
        x_token, x_channel = divmod(int(x.argmax()), x.shape[1])
        y_token, y_channel = divmod(int(y.argmax()), y.shape[1])
        maxima.append(LayerMaxima(index, float(x[x_token, x_channel]), x_token, x_channel,
                                  float(y[y_token, y_channel]), y_token, y_channel))
    return tuple(maxima), inputs


def spike_layers(maxima: tuple[LayerMaxima, ...], spike_factor: float) -> tuple[tuple[int, ...], float, float]:
    """Layers whose input and output maxima are both ≥ spike_factor × the median over layers."""
    input_median = float(torch.tensor([m.input_max for m in maxima]).median())
    output_median = float(torch.tensor([m.output_max for m in maxima]).median())
    spikes = tuple(
        m.layer
        for m in maxima
        if m.input_max >= spike_factor * input_median and m.output_max >= spike_factor * output_median
    )
    return spikes, input_median, output_median


def detect_super_weights(
    adapter: ArchitectureAdapter,
    tokenizer,
    prompt: str = DEFAULT_PROMPT,
    *,
    spike_factor: float = 50.0,
    max_rounds: int = 8,
    max_depth: float = 0.5,
) -> SuperWeightDetection:
    """Find the super weights of ``adapter.model`` from one prompt (see the module docstring)."""
    if spike_factor <= 1:
        raise ValueError(f"spike_factor must be > 1, got {spike_factor}")
    if not 0 < max_depth <= 1:
        raise ValueError(f"max_depth must be in (0, 1], got {max_depth}")
    input_ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=True).input_ids
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt tokenizes to nothing")
    last_layer = max(0, int(max_depth * adapter.n_layers + 0.5) - 1)
    found: list[SuperWeight] = []
    rounds: list[DetectionRound] = []
    for index in range(max_rounds + 1):
        with ExitStack() as stack:
            for sw in found:
                stack.enter_context(set_down_proj_weight(adapter, sw.layer, sw.row, sw.col, value=0.0))
            maxima, inputs = down_proj_maxima(adapter, input_ids)
            spikes, in_median, out_median = spike_layers(maxima, spike_factor)
            rounds.append(DetectionRound(index, maxima, in_median, out_median, spikes))
            candidates = [layer for layer in spikes if layer <= last_layer]
            if not candidates or index == max_rounds:
                break
            new = _super_weight_at(adapter, inputs, maxima[candidates[0]], found, prompt)
        if new is None:
            break
        found.append(new)
    return SuperWeightDetection(prompt, int(input_ids.shape[1]), tuple(found), tuple(rounds), spike_factor, max_depth)


def _super_weight_at(
    adapter: ArchitectureAdapter,
    inputs: dict[str, torch.Tensor],
    spike: LayerMaxima,
    found: list[SuperWeight],
    prompt: str,
) -> SuperWeight | None:
    """row = channel of max |y|, col = channel of max |x[t]| not yet held out in that row."""
    name = adapter.layers[spike.layer].down_proj
    x_t = inputs[name][0, spike.output_token].abs().clone()  # (intermediate,)
    for sw in found:
        if sw.layer == spike.layer and sw.row == spike.output_channel:
            x_t[sw.col] = -1.0
    col = int(x_t.argmax())
    if x_t[col] < 0:
        return None
    weight = adapter.down_proj_weight(spike.layer)[spike.output_channel, col]
    return SuperWeight(
        layer=spike.layer,
        row=spike.output_channel,
        col=col,
        weight=float(weight),
        activation=spike.output_max,
        input_activation=float(inputs[name][0, spike.output_token, col]),
        token=spike.output_token,
        prompt=prompt,
    )


# ---------------------------------------------------------------------------------------------- audit check


class SuperWeightParams(CheckParams):
    prompt: str = DEFAULT_PROMPT
    spike_factor: float = 50.0  # both maxima ≥ 50 × the median layer: super activations are 100-1000× typical
    max_rounds: int = 8
    max_depth: float = 0.5


@dataclass(frozen=True)
class SuperWeightDirectory:
    """The detection on the audit's prompt, as reported."""

    detection: SuperWeightDetection

    def metrics(self) -> dict[str, object]:
        sws = self.detection.super_weights
        return {
            "n_super_weights": len(sws),
            "coordinates": [list(sw.coordinates) for sw in sws],
            "channels": self.detection.channels,
            "first_layer": sws[0].layer if sws else -1,
            "max_activation": max((abs(sw.activation) for sw in sws), default=0.0),
        }


def cached_detection(context: AuditContext, params: SuperWeightParams) -> SuperWeightDetection:
    """Detection is shared by every super-weight check of a session with the same parameters."""
    model = context.model
    key = ("superweights", params.prompt, params.spike_factor, params.max_rounds, params.max_depth)
    return context.memo(key, lambda: detect_super_weights(
        model.adapter, model.tokenizer, params.prompt, spike_factor=params.spike_factor,
        max_rounds=params.max_rounds, max_depth=params.max_depth))


@register_check(
    "superweights",
    params=SuperWeightParams,
    metrics=("n_super_weights", "coordinates", "channels", "first_layer", "max_activation"),
    area="superweights",
)
def superweights_audit(context: AuditContext, params: SuperWeightParams) -> SuperWeightDirectory:
    """Super-weight directory found data-free from one prompt (Yu et al. 2024, §3.2)."""
    return SuperWeightDirectory(cached_detection(context, params))
