"""Hypothesis strategies for sequences of interventions on a model seen through its adapter."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st

from lmaudit.checks.core import interventions
from lmaudit.checks.core.adapter import ArchitectureAdapter


@dataclass(frozen=True)
class InterventionSpec:
    """A named, printable recipe for one intervention (hypothesis shows these when a property fails)."""

    kind: str
    args: dict[str, Any]

    def enter(self, adapter: ArchitectureAdapter) -> AbstractContextManager[Any]:
        return BUILDERS[self.kind](adapter, **self.args)


def _quantize_layers(adapter: ArchitectureAdapter, layers: list[int], levels: int) -> Any:
    modules = [adapter.down_proj(i) for i in layers] + [adapter.attn_out(i) for i in layers]

    def fake_quantize(w: torch.Tensor, out: torch.Tensor) -> None:
        step = (w.max() - w.min()) / (levels - 1)
        out.copy_(torch.round((w - w.min()) / step) * step + w.min())

    return interventions.transform_weights(modules, fake_quantize)


def _zero_weights(adapter: ArchitectureAdapter, layer: int, role: str, cells: list[tuple[int, int]]) -> Any:
    module = adapter.down_proj(layer) if role == "down_proj" else adapter.attn_out(layer)
    rows = torch.tensor([r for r, _ in cells])
    cols = torch.tensor([c for _, c in cells])
    return interventions.zero_weights({module: (rows, cols)})


BUILDERS: dict[str, Callable[..., AbstractContextManager[Any]]] = {
    "set_weight": lambda a, layer, row, col, value: interventions.set_down_proj_weight(a, layer, row, col,
                                                                                      value=value),
    "scale_weight": lambda a, layer, row, col, scale: interventions.set_down_proj_weight(a, layer, row, col,
                                                                                        scale=scale),
    "ablate_heads": lambda a, heads, scale: interventions.ablate_heads(a, heads, scale=scale),
    "scale_neurons": lambda a, neurons, scale: interventions.scale_neurons(a, neurons, scale=scale),
    "replace_activation": lambda a, layer, token, channel, value: interventions.replace_activation(
        a, layer, token, channel, value),
    "quantize": _quantize_layers,
    "zero_weights": _zero_weights,
    "prune_down_proj": lambda a, coordinates: interventions.edit_down_proj_weights(a, coordinates, value=0.0),
}

finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32)


def interventions_for(adapter: ArchitectureAdapter, *, seq_len: int) -> st.SearchStrategy[InterventionSpec]:
    """Any one intervention with valid coordinates for ``adapter``'s model and prompts of ``seq_len`` tokens."""
    n_layers, n_heads = adapter.n_layers, adapter.heads.n_heads
    hidden, inter = adapter.hidden_size, adapter.intermediate_size
    attn_in = min(inter, adapter.heads.n_heads * adapter.heads.head_dim)
    layer = st.integers(0, n_layers - 1)
    coords = st.fixed_dictionaries({"layer": layer, "row": st.integers(0, hidden - 1),
                                    "col": st.integers(0, inter - 1)})
    return st.one_of(
        coords.map(lambda c: c).flatmap(lambda c: finite.map(lambda v: InterventionSpec("set_weight",
                                                                                        {**c, "value": v}))),
        coords.flatmap(lambda c: finite.map(lambda s: InterventionSpec("scale_weight", {**c, "scale": s}))),
        st.builds(lambda heads, s: InterventionSpec("ablate_heads", {"heads": heads, "scale": s}),
                  st.dictionaries(layer, st.lists(st.integers(0, n_heads - 1), min_size=1, max_size=3),
                                  min_size=1), st.sampled_from([0.0, 0.5, 2.0])),
        st.builds(lambda neurons, s: InterventionSpec("scale_neurons", {"neurons": neurons, "scale": s}),
                  st.dictionaries(layer, st.lists(st.integers(0, inter - 1), min_size=1, max_size=8),
                                  min_size=1), st.sampled_from([0.0, -1.0, 3.0])),
        st.builds(lambda lyr, t, c, v: InterventionSpec("replace_activation",
                                                        {"layer": lyr, "token": t, "channel": c, "value": v}),
                  layer, st.integers(0, seq_len - 1), st.integers(0, hidden - 1), finite),
        st.builds(lambda layers, levels: InterventionSpec("quantize", {"layers": layers, "levels": levels}),
                  st.lists(layer, min_size=1, max_size=n_layers, unique=True), st.sampled_from([4, 16, 256])),
        # attn_out is [hidden, n_heads*head_dim]; both index spaces below fit inside it and inside down_proj
        st.builds(lambda lyr, role, cells: InterventionSpec("zero_weights",
                                                            {"layer": lyr, "role": role, "cells": cells}),
                  layer, st.sampled_from(["down_proj", "attn_out"]),
                  st.lists(st.tuples(st.integers(0, hidden - 1), st.integers(0, attn_in - 1)), min_size=1,
                           max_size=5)),
        st.builds(lambda cs: InterventionSpec("prune_down_proj", {"coordinates": cs}),
                  st.lists(st.tuples(layer, st.integers(0, hidden - 1), st.integers(0, inter - 1)), min_size=1,
                           max_size=4)),
    )
