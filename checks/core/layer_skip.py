"""Reuse the clean run below an intervention: a forward pass that starts at layer L.

An intervention at layer L (a head of layer L, a neuron of layer L, a weight of layer L) leaves the residual
stream entering layers ``0 … L`` unchanged. So the clean run's hidden state entering layer L, ``h_L`` (``hidden_states[L]``
of ``output_hidden_states=True``), can be fed straight into layer L, and layers ``0 … L−1`` need not run again:

    logits_intervened = head(layers_{L..N-1}(h_L))        (exact: the same floating-point operations as a full pass
                                                            for layers ≥ L, given the same batch composition)

Inside :func:`start_at_layer`, the model's own ``forward`` still builds the embeddings, the attention masks and
the rotary tables (cheap), but layers below L are swapped for a no-op that returns its input and layer L
receives ``h_L`` through a pre-hook. The swap is undone in ``finally``; parameters are never touched. ``h_L`` is
moved to layer L's device (accelerate's execution device when the model is dispatched over devices), so the
cache may sit anywhere, e.g. on the CPU while layer L runs on a GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lmaudit.checks.core.adapter import ArchitectureAdapter
from lmaudit.checks.core.devices import execution_device
from lmaudit.checks.core.hooks import hooks
from lmaudit.checks.core.interventions import InterventionError


class LayerOutOfRange(InterventionError, IndexError):
    """The start layer is not a layer of the model."""


class _Skipped(nn.Module):
    """Stands in for a decoder layer below the start layer: returns its hidden-state input unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


@contextmanager
def start_at_layer(adapter: ArchitectureAdapter, layer: int, hidden: torch.Tensor) -> Iterator[None]:
    """Within the block, a forward pass skips layers ``< layer`` and feeds ``hidden`` into ``layer``.

    ``hidden``: ``(batch, seq, hidden_size)``, the clean run's input to ``layer`` for exactly the batch that will
    be passed to the model (repeat it yourself for batched interventions).
    """
    if not 0 <= layer < adapter.n_layers:
        raise LayerOutOfRange(f"start_at_layer: start layer {layer} out of range 0..{adapter.n_layers - 1}")
    if layer == 0:
        yield
        return
    layer_list = adapter.layer_list
    originals = [layer_list[i] for i in range(layer)]
    device = execution_device(layer_list[layer])  # None: a parameter-free layer outside any dispatch

    def feed(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        given = args[0] if args else kwargs.get("hidden_states")
        if given is not None and given.shape != hidden.shape:
            raise InterventionError(f"start_at_layer: cached hidden state {tuple(hidden.shape)} does not match "
                                    f"the batch {tuple(given.shape)}")
        target = device if device is not None else given.device if given is not None else hidden.device
        fed = hidden.to(target)
        if args:
            return (fed, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fed}

    try:
        for i in range(layer):
            layer_list[i] = _Skipped()
        with hooks(pre=[(layer_list[layer], feed)]):
            yield
    finally:
        for i, module in enumerate(originals):
            layer_list[i] = module


def clean_hidden_states(model: nn.Module, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """One clean forward pass: ``(logits, hidden_states)`` where ``hidden_states[L]`` enters layer ``L``."""
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    return out.logits, tuple(out.hidden_states)
