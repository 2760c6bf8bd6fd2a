"""Python audits: the harness proves, on the model under audit, the two properties every other audit relies on.

1. Interventions restore the model bit for bit (each kind is applied and undone; every tensor is compared).
2. Starting a forward pass at layer L from the clean run's hidden state gives the full pass's logits, so the
   layer-skip speed-up used by the sweeps is exact for this architecture.
"""

from __future__ import annotations

import hashlib

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


def _digests(model: torch.nn.Module) -> dict[str, str]:
    return {k: hashlib.sha256(v.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in model.state_dict().items()}


def _ids(audit_model) -> torch.Tensor:
    tok = audit_model.tokenizer
    return tok(PROMPTS[:1], return_tensors="pt").input_ids


def test_interventions_restore_the_model(audit_model, audit_expect) -> None:
    model, adapter = audit_model.model, audit_model.adapter
    before = _digests(model)
    ids = _ids(audit_model)
    mid = adapter.n_layers // 2

    def halve(original: torch.Tensor, weight: torch.Tensor) -> None:
        torch.mul(original, 0.5, out=weight)

    interventions = [
        set_down_proj_weight(adapter, mid, 0, 0, value=0.0),
        ablate_heads(adapter, {mid: [0]}),
        scale_neurons(adapter, {mid: [0, 1]}, scale=3.0),
        replace_activation(adapter, mid, 0, 0, 1e3),
        transform_weights([adapter.down_proj(mid), adapter.attn_out(mid)], halve),
    ]
    for intervention in interventions:
        with torch.no_grad(), intervention:
            model(input_ids=ids, use_cache=False)
    after = _digests(model)
    changed = sorted(k for k in before if before[k] != after[k])
    audit_expect("changed_tensors", len(changed), equals=0)


def test_layer_skip_is_exact(audit_model, audit_expect) -> None:
    model, adapter = audit_model.model, audit_model.adapter
    ids = _ids(audit_model)
    logits, hidden = clean_hidden_states(model, ids)
    worst = 0.0
    for layer in (1, adapter.n_layers // 2, adapter.n_layers - 1):
        with torch.no_grad(), start_at_layer(adapter, layer, hidden[layer]):
            skipped = model(input_ids=ids, use_cache=False).logits
        worst = max(worst, float((skipped - logits).abs().max()))
    audit_expect("max_abs_logit_difference", worst, max=1e-4)
