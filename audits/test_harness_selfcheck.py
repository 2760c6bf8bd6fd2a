"""Python audits: the harness proves, on the model under audit, the two properties every other audit relies on.

1. Interventions restore the model bit for bit (each kind is applied and undone; every tensor is compared).
2. Starting a forward pass at layer L from the clean run's hidden state gives the full pass's logits, so the
   layer-skip speed-up used by the sweeps is exact for this architecture.

The measurements are plain functions (:func:`changed_tensors`, :func:`layer_skip_difference`) so that
``tests/test_plugin.py`` can show each gate failing: a leaky intervention, a wrong hidden state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch

from lmaudit.checks.core.interventions import (
    ablate_heads,
    replace_activation,
    scale_neurons,
    set_down_proj_weight,
    transform_weights,
)
from lmaudit.checks.core.layer_skip import clean_hidden_states, start_at_layer

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
RESTORED = {"equals": 0}  # every tensor bit for bit: one changed tensor is a broken intervention
EXACT_SKIP = {"max": 1e-4}  # float32 logits agree to rounding; a wrong hidden state moves them by O(1)


def _digests(model: torch.nn.Module) -> dict[str, str]:
    return {k: hashlib.sha256(v.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in model.state_dict().items()}


def _ids(loaded: Any) -> torch.Tensor:
    return loaded.tokenizer(PROMPTS[:1], return_tensors="pt").input_ids


def every_kind_of_intervention(adapter: Any) -> list[AbstractContextManager[Any]]:
    """One intervention of each kind, on the middle layer."""
    mid = adapter.n_layers // 2

    def halve(original: torch.Tensor, weight: torch.Tensor) -> None:
        torch.mul(original, 0.5, out=weight)

    return [
        set_down_proj_weight(adapter, mid, 0, 0, value=0.0),
        ablate_heads(adapter, {mid: [0]}),
        scale_neurons(adapter, {mid: [0, 1]}, scale=3.0),
        replace_activation(adapter, mid, 0, 0, 1e3),
        transform_weights([adapter.down_proj(mid), adapter.attn_out(mid)], halve),
    ]


def changed_tensors(loaded: Any, interventions: Iterable[AbstractContextManager[Any]]) -> list[str]:
    """The state-dict entries that differ after applying and leaving each intervention around a forward pass."""
    before = _digests(loaded.model)
    ids = _ids(loaded)
    for intervention in interventions:
        with torch.no_grad(), intervention:
            loaded.model(input_ids=ids, use_cache=False)
    after = _digests(loaded.model)
    return sorted(k for k in before if before[k] != after[k])


def layer_skip_difference(loaded: Any, *, hidden_for: Callable[[tuple[torch.Tensor, ...], int], torch.Tensor]
                          | None = None) -> float:
    """max |logits(start at L from hidden) - logits(full pass)| over three layers L; ``hidden_for(hidden, L)``
    picks the state fed into layer L (default: the clean run's input to L)."""
    model, adapter = loaded.model, loaded.adapter
    ids = _ids(loaded)
    logits, hidden = clean_hidden_states(model, ids)
    pick = hidden_for or (lambda states, layer: states[layer])
    worst = 0.0
    for layer in sorted({1, adapter.n_layers // 2, adapter.n_layers - 1}):
        with torch.no_grad(), start_at_layer(adapter, layer, pick(hidden, layer)):
            skipped = model(input_ids=ids, use_cache=False).logits
        worst = max(worst, float((skipped - logits).abs().max()))
    return worst


def test_interventions_restore_the_model(audit_model, audit_expect) -> None:
    """Every kind of intervention, applied around a forward pass and left, restores every tensor bit for bit (the
    premise of every audit that edits the model under audit: it must not change what later audits measure)."""
    changed = changed_tensors(audit_model, every_kind_of_intervention(audit_model.adapter))
    audit_expect("changed_tensors", len(changed), **RESTORED)


def test_layer_skip_is_exact(audit_model, audit_expect) -> None:
    """Starting at layer L from the clean run's hidden state gives the full pass's logits (the premise of the
    sweeps' layer-skip speed-up on this architecture)."""
    audit_expect("max_abs_logit_difference", layer_skip_difference(audit_model), **EXACT_SKIP)
