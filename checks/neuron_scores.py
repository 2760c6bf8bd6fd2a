"""Comparative Neuron Analysis core: coefficient and importance of every FFN neuron for one target token.

Yu & Ananiadou, "Interpreting Arithmetic Mechanism in LLMs through Comparative Neuron Analysis" (EMNLP 2024),
built on their "Neuron-Level Knowledge Attribution in Large Language Models" (2024). At the last prompt
position, layer ℓ's FFN output is a sum over its neurons ``k`` of ``m_k · fc2_k``, where ``m_k`` is the neuron's
activation (the ``k``-th input channel of the down projection) and ``fc2_k`` is column ``k`` of ``W_down``
(:meth:`~checks.adapter.ArchitectureAdapter.down_proj_weight`). For a target token ``w``::

    coefficient_k = m_k
    importance_k  = log p(w | r + m_k·fc2_k) − log p(w | r)
    p(· | x)      = softmax(adapter.logits(x))       (the model's own final norm, unembedding and soft-cap)

``r`` is the residual stream of that layer *without* the FFN's contribution, taken from the clean run as
``r = h_{ℓ+1} − y_ℓ``, where ``h_{ℓ+1}`` is the decoder layer's output and ``y_ℓ`` the down projection's output
(bias included). So:

- sequential-residual models (Llama, Mistral, Qwen, Gemma, OLMo, Phi-3, GPT-2): ``r`` is the residual stream after
  attention, the input of the MLP branch's residual add;
- parallel-residual models (GPT-NeoX): ``r = h_ℓ + attn(h_ℓ)``, the residual stream plus the attention branch,
  i.e. everything the layer adds except the MLP;
- models with a norm *after* the FFN (Gemma 2/3, OLMo 2: ``h_{ℓ+1} = r + norm(y_ℓ)``): ``r`` is then not the
  attention residual and ``m_k·fc2_k`` is added before that norm; the scores are an approximation there.

Normalisation: ``log p`` is ``log_softmax`` over the full vocabulary of the logits of the *final* norm applied to
``r + m_k·fc2_k`` (no renormalisation of the layer's own norms). The target is tokenised as the model would see
it after the prompt under the BOS policy of :mod:`checks.logprobs`: the prompt is
``encode_prompts([prompt])`` (one BOS when the tokenizer has one) and ``w`` is the first token of
``encode_continuations([target])`` (tokenised alone, no special tokens). Pass ``target`` with its leading space
when the template has one (``"3 plus 5 is"`` + ``" 8"``; ``"3+5="`` + ``"8"``).

Cost: one forward pass for all prompts (right-padded, so every prompt's last token sees exactly its own
tokens), then one vectorized pass per layer — no per-neuron forward passes. Two exact evaluations of
``adapter.logits(r + m_k·fc2_k)`` for all ``k`` at once:

- generic: ``R = r + m[:, None]·fc2ᵀ`` ``(chunk, hidden)`` through ``adapter.logits`` (any final norm);
  ``intermediate × hidden × vocab`` multiply-adds per prompt and layer;
- factorized, when the final norm is an RMSNorm (``norm(x) = γ(x) ⊙ x / s(x)``, ``s(x) = sqrt(mean(x²) + ε)``)
  and the unembedding has no bias: with ``lin(x) = norm(x)·s(x)`` (linear in ``x``),
  ``U_k = W_U·lin(fc2_k)`` (computed once per layer, shared by all prompts) and ``a = W_U·lin(r)``::

      logits_k = cap((a + m_k·U_k) / s(r + m_k·fc2_k)),   s² = (|r|² + 2 m_k r·fc2_k + m_k² |fc2_k|²)/d + ε

  so each extra prompt costs only ``intermediate × vocab`` elementwise work. The factorized scores of a few
  neurons are checked against the generic path on every call; a mismatch above 1e-3 falls back to generic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from checks.adapter import ArchitectureAdapter, adapter_for
from checks.hooks import capture
from checks.logprobs import encode_continuations, encode_prompts

# Neurons per vectorized unembedding pass: (chunk, vocab) float32 logits; 512 x 49k ≈ 100 MB.
DEFAULT_CHUNK = 512


@dataclass(frozen=True)
class NeuronScores:
    """CNA scores of every FFN neuron for one prompt and target, at the prompt's last position.

    ``coefficient[ℓ, k] = m_k``; ``importance[ℓ, k] = log p(w | r + m_k·fc2_k) − log p(w | r)``;
    ``base_logprob[ℓ] = log p(w | r_ℓ)``. Layers that were not scored hold NaN.
    Shapes: ``coefficient``, ``importance`` ``(n_layers, intermediate)``; ``base_logprob`` ``(n_layers,)``.
    """

    prompt: str
    target: str
    target_id: int
    coefficient: torch.Tensor
    importance: torch.Tensor
    base_logprob: torch.Tensor

    @property
    def layers(self) -> list[int]:
        """The layers that were scored."""
        return [int(i) for i in torch.nonzero(~torch.isnan(self.base_logprob)).flatten()]


def encode(tokenizer: Any, text: str) -> list[int]:
    """The token ids the model sees for a prompt (the BOS policy of :func:`checks.logprobs.encode_prompts`)."""
    return encode_prompts(tokenizer, [text])[0]


def target_token_id(tokenizer: Any, prompt: str, target: str) -> int:
    """First token of ``target`` tokenised as a continuation of ``prompt`` (see the module docstring)."""
    if not target:
        raise ValueError("target must be a non-empty string")
    return int(encode_continuations(tokenizer, [target])[0][0])


def pad_right(tokenizer: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, last)``: right-padded batch and each row's last real position."""
    encoded = [encode(tokenizer, p) for p in prompts]
    if any(not ids for ids in encoded):
        raise ValueError("a prompt tokenises to nothing")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    last = mask.sum(dim=1) - 1  # (batch,)
    return input_ids, mask, last


@torch.no_grad()
def layer_importance(
    adapter: ArchitectureAdapter, residual: torch.Tensor, coefficient: torch.Tensor, layer: int, target_id: int,
    *, chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(importance (intermediate,), base_logprob ())`` of every neuron of ``layer`` for one residual ``r``.

    ``residual``: ``(hidden,)`` = ``r``; ``coefficient``: ``(intermediate,)`` = ``m``. Vectorized over chunks of
    neurons: ``R = r + m[:, None] · fc2ᵀ`` ``(chunk, hidden)`` goes through ``adapter.logits`` in one call.
    """
    fc2 = adapter.down_proj_weight(layer)  # (hidden, intermediate)
    residual = residual.to(fc2.dtype)
    coefficient = coefficient.to(fc2.dtype)
    base = torch.log_softmax(adapter.logits(residual[None]).float(), dim=-1)[0, target_id]
    out = torch.empty(fc2.shape[1], dtype=torch.float32)
    for start in range(0, fc2.shape[1], chunk):
        stop = min(start + chunk, fc2.shape[1])
        added = (fc2[:, start:stop] * coefficient[start:stop]).T  # (chunk, hidden)
        logprobs = torch.log_softmax(adapter.logits(residual + added).float(), dim=-1)  # (chunk, vocab)
        out[start:stop] = logprobs[:, target_id].cpu() - base.cpu()
    return out, base.cpu()


def _check_layers(adapter: ArchitectureAdapter, layers: Sequence[int] | None) -> list[int]:
    if layers is None:
        return list(range(adapter.n_layers))
    chosen = sorted(set(int(layer) for layer in layers))
    for layer in chosen:
        adapter.layer(layer)  # raises IndexError with the valid range
    return chosen


def _rms_eps(adapter: ArchitectureAdapter) -> float | None:
    """``ε`` of an RMSNorm final norm (the factorized path's condition), else ``None``."""
    norm = adapter.final_norm
    if not type(norm).__name__.endswith("RMSNorm") or getattr(adapter.unembedding, "bias", None) is not None:
        return None
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return None if eps is None else float(eps)


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.sqrt(x.float().pow(2).mean(-1) + eps)


@torch.no_grad()
def factorized_layer_importance(
    adapter: ArchitectureAdapter, residuals: torch.Tensor, coefficients: torch.Tensor, layer: int,
    target_ids: Sequence[int], eps: float, *, chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The factorized path (module docstring) for ``B`` prompts of one layer: ``(importance (B, I), base (B,))``.

    ``residuals``: ``(B, hidden)`` = ``r``; ``coefficients``: ``(B, I)`` = ``m``.
    """
    fc2 = adapter.down_proj_weight(layer).float()  # (hidden, I)
    r = residuals.float()
    d = fc2.shape[0]
    cap = float(adapter.final_logit_softcapping or 0.0)

    def lin(x: torch.Tensor) -> torch.Tensor:  # the linear part of the final norm: norm(x)·s(x)
        x = x.to(adapter.dtype)
        return (adapter.final_norm(x).float() * _rms(x, eps)[..., None]).to(adapter.dtype)

    def capped(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z / cap) * cap if cap else z

    targets = torch.as_tensor(list(target_ids))
    rows = torch.arange(len(r))
    a = adapter.unembedding(lin(r)).float()  # (B, vocab)
    base = torch.log_softmax(capped(a / _rms(r, eps)[:, None]), dim=-1)[rows, targets]  # (B,)
    r_sq = r.pow(2).sum(-1)  # (B,)
    out = torch.empty(coefficients.shape, dtype=torch.float32)
    for start in range(0, fc2.shape[1], chunk):
        stop = min(start + chunk, fc2.shape[1])
        f = fc2[:, start:stop]  # (hidden, c)
        u = adapter.unembedding(lin(f.T)).float()  # (c, vocab)
        f_sq, r_dot_f = f.pow(2).sum(0), r @ f  # (c,), (B, c)
        for b in range(len(r)):
            m = coefficients[b, start:stop].float()  # (c,)
            s = torch.sqrt((r_sq[b] + 2 * m * r_dot_f[b] + m * m * f_sq) / d + eps)  # (c,)
            z = capped((a[b] + m[:, None] * u) / s[:, None])  # (c, vocab)
            out[b, start:stop] = (z[:, targets[b]] - torch.logsumexp(z, dim=-1)) - base[b]
    return out, base


@torch.no_grad()
def batched_neuron_scores(
    model: Any, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], *,
    layers: Sequence[int] | None = None, chunk: int = DEFAULT_CHUNK, adapter: ArchitectureAdapter | None = None,
) -> list[NeuronScores]:
    """:func:`neuron_scores` for many prompts with one forward pass (right-padded batch)."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if not prompts:
        return []
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    adapter = adapter or adapter_for(model)
    chosen = _check_layers(adapter, layers)
    target_ids = [target_token_id(tokenizer, p, t) for p, t in zip(prompts, targets, strict=True)]
    input_ids, mask, last = pad_right(tokenizer, prompts)
    layer_modules = {f"layer{layer}": adapter.layer_list[layer] for layer in chosen}
    down_modules = {f"down{layer}": adapter.down_proj(layer) for layer in chosen}
    with capture(layer_modules, what="output") as layer_cap, capture(down_modules, what="both") as cap:
        model(input_ids=input_ids.to(adapter.device), attention_mask=mask.to(adapter.device), use_cache=False)

    n, n_layers, inter = len(prompts), adapter.n_layers, adapter.intermediate_size
    coefficient = torch.full((n, n_layers, inter), float("nan"))
    importance = torch.full((n, n_layers, inter), float("nan"))
    base = torch.full((n, n_layers), float("nan"))
    rows = torch.arange(n)
    eps = _rms_eps(adapter)
    for layer in chosen:
        h_next = layer_cap.output(f"layer{layer}")[rows, last]  # (n, hidden)
        m = cap.input(f"down{layer}")[rows, last]  # (n, intermediate)
        r = h_next - cap.output(f"down{layer}")[rows, last]  # (n, hidden): the residual without the FFN
        coefficient[:, layer] = m.float().cpu()
        if eps is not None:
            imp, b = factorized_layer_importance(adapter, r, m, layer, target_ids, eps, chunk=chunk)
            if _agrees(adapter, r[0], m[0], layer, target_ids[0], imp[0], b[0]):
                importance[:, layer], base[:, layer] = imp.cpu(), b.cpu()
                continue
            eps = None  # the final norm is not the RMSNorm the factorization assumes: generic from now on
        for i in range(n):
            importance[i, layer], base[i, layer] = layer_importance(adapter, r[i], m[i], layer, target_ids[i],
                                                                    chunk=chunk)
    return [
        NeuronScores(prompt=p, target=t, target_id=tid, coefficient=coefficient[i], importance=importance[i],
                     base_logprob=base[i])
        for i, (p, t, tid) in enumerate(zip(prompts, targets, target_ids, strict=True))
    ]


def _agrees(adapter: ArchitectureAdapter, r: torch.Tensor, m: torch.Tensor, layer: int, target_id: int,
            importance: torch.Tensor, base: torch.Tensor, n_check: int = 4) -> bool:
    """The factorized scores of the ``n_check`` largest-|m| neurons equal the generic path's (abs 1e-3)."""
    check = torch.topk(m.abs().float(), min(n_check, m.shape[0])).indices
    fc2 = adapter.down_proj_weight(layer)
    resid = r.to(fc2.dtype) + (fc2[:, check] * m[check].to(fc2.dtype)).T  # (n_check, hidden)
    logprobs = torch.log_softmax(adapter.logits(resid).float(), dim=-1)[:, target_id].cpu()
    generic_base = torch.log_softmax(adapter.logits(r.to(fc2.dtype)[None]).float(), dim=-1)[0, target_id].cpu()
    return (bool(torch.allclose(importance[check.cpu()].cpu(), logprobs - generic_base, atol=1e-3))
            and abs(float(base) - float(generic_base)) < 1e-3)


def neuron_scores(
    model: Any, tokenizer: Any, prompt: str, target: str, *, layers: Sequence[int] | None = None,
    chunk: int = DEFAULT_CHUNK, adapter: ArchitectureAdapter | None = None,
) -> NeuronScores:
    """CNA coefficient and importance of every neuron of ``layers`` (default all) for ``target`` after ``prompt``.

    ``importance_k = log p(w | r + m_k·fc2_k) − log p(w | r)`` (Yu & Ananiadou 2024); see the module docstring
    for ``r``, the target token and the normalisation.
    """
    return batched_neuron_scores(model, tokenizer, [prompt], [target], layers=layers, chunk=chunk,
                                 adapter=adapter)[0]


def top_neurons(scores: NeuronScores | torch.Tensor, k: int, *, by: str = "importance") -> list[tuple[int, int, float]]:
    """The ``k`` neurons with the largest score as ``(layer, neuron, value)``, best first (NaN layers skipped).

    ``scores``: a :class:`NeuronScores` (ranked by ``by`` = ``"importance"`` or ``"coefficient"``) or any
    ``(n_layers, intermediate)`` tensor.
    """
    table = getattr(scores, by) if isinstance(scores, NeuronScores) else scores
    flat = torch.nan_to_num(table.float(), nan=float("-inf")).flatten()
    k = min(int(k), int(torch.isfinite(flat).sum()))
    if k <= 0:
        return []
    values, index = torch.topk(flat, k)
    width = table.shape[1]
    return [(int(i) // width, int(i) % width, float(v)) for v, i in zip(values, index, strict=True)]


@torch.no_grad()
def logit_lens(
    adapter: ArchitectureAdapter, tokenizer: Any, layer: int, neuron: int, *, coefficient: float | None = None,
    k: int = 10,
) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """Top and bottom ``k`` tokens of ``adapter.logits(v)`` for ``v = fc2_k`` (or ``m_k·fc2_k`` with a
    coefficient), as ``(token, logit)`` lists: the tokens the neuron promotes and suppresses.

    The final norm is applied to ``v`` alone (for RMSNorm and LayerNorm this rescales ``v``, so the ranking is
    that of ``E_u·(g ⊙ v)``; a negative coefficient swaps top and bottom).
    """
    fc2 = adapter.down_proj_weight(layer)
    if not 0 <= neuron < fc2.shape[1]:
        raise IndexError(f"neuron {neuron} out of range 0..{fc2.shape[1] - 1}")
    vector = fc2[:, neuron] * (1.0 if coefficient is None else float(coefficient))  # (hidden,)
    logits = adapter.logits(vector[None])[0].float()  # (vocab,)
    k = min(k, logits.shape[0])
    top = torch.topk(logits, k)
    bottom = torch.topk(-logits, k)

    def tokens(values: torch.Tensor, index: torch.Tensor, sign: float) -> list[tuple[str, float]]:
        return [(tokenizer.decode([int(i)]), sign * float(v)) for v, i in zip(values, index, strict=True)]

    return tokens(top.values, top.indices, 1.0), tokens(bottom.values, bottom.indices, -1.0)
