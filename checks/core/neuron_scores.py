"""Comparative Neuron Analysis core: coefficient and importance of every FFN neuron for one target token.

Yu & Ananiadou, "Interpreting Arithmetic Mechanism in LLMs through Comparative Neuron Analysis" (EMNLP 2024),
built on their "Neuron-Level Knowledge Attribution in Large Language Models" (2024). At the last prompt
position, layer ℓ's FFN output is a sum over its neurons ``k`` of ``m_k · fc2_k``, where ``m_k`` is the neuron's
activation (the ``k``-th input channel of the down projection) and ``fc2_k`` is column ``k`` of ``W_down``
(:meth:`~lmaudit.checks.core.adapter.ArchitectureAdapter.down_proj_weight`). For a target token ``w``::

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
it after the prompt under the BOS policy of :mod:`lmaudit.checks.core.logprobs`: the prompt is
``encode_prompts([prompt])`` (one BOS when the tokenizer has one) and ``w`` is the first token of
``encode_continuations([target])`` (tokenised alone, no special tokens). Pass ``target`` with its leading space
when the template has one (``"3 plus 5 is"`` + ``" 8"``; ``"3+5="`` + ``"8"``).

Cost: one forward pass for all prompts (right-padded, so every prompt's last token sees exactly its own
tokens; hooks keep only ``r`` and ``m`` at the last positions), then one vectorized pass per layer — no
per-neuron forward passes. Two exact evaluations of ``adapter.logits(r + m_k·fc2_k)`` for all ``k`` at once:

- generic: ``R = r + m[:, None]·fc2ᵀ`` ``(chunk, hidden)`` through ``adapter.logits`` (any final norm);
  ``intermediate × hidden × vocab`` multiply-adds per prompt and layer;
- factorized, when the final norm is an RMSNorm (``norm(x) = γ(x) ⊙ x / s(x)``, ``s(x) = sqrt(mean(x²) + ε)``)
  and the unembedding has no bias: with ``lin(x) = norm(x)·s(x)`` (linear in ``x``),
  ``U_k = W_U·lin(fc2_k)`` (computed once per layer, shared by all prompts) and ``a = W_U·lin(r)``::

      logits_k = cap((a + m_k·U_k) / s(r + m_k·fc2_k)),   s² = (|r|² + 2 m_k r·fc2_k + m_k² |fc2_k|²)/d + ε

  so each extra prompt costs only ``intermediate × vocab`` elementwise work (a ``logsumexp`` over the vocabulary
  per neuron, in passes of :data:`EXACT_ROWS` rows that stay in cache). The factorized scores of a few neurons
  are checked against the generic path on every call; a mismatch above 1e-3 falls back to generic.

Cumulant shortcut (factorized path without soft-cap). Most neurons move the logits very little. With
``z0 = a / s(r)`` (the logits of ``r``), ``p = softmax(z0)``, ``c = z0 − E_p[z0]``, ``ρ_k = s(r)/s_k − 1`` and
``β_k = m_k / s_k``, the logits of neuron ``k`` are ``z0 + ρ_k·z0 + β_k·U_k``, and the constant ``ρ_k·E_p[z0]``
cancels, so with ``X_k = ρ_k·c + β_k·U_k``::

    importance_k = X_k[w] − log E_p[exp(X_k)]
    E_p[exp X] = 1 + E X + E X²/2 + E X³/6 + R,   |R| ≤ D² · E X² · e^D / 24,   D = |ρ|·max|c| + |β|·max|U_k|

(Taylor's remainder with ``|X| ≤ D``). ``E X^j`` expand into the moments ``E_p[c^i U_k^j]``, which are matrix
products ``U^j · (c^i ⊙ p)`` over all prompts at once. A neuron takes this value when the bound on the
error of its log, ``|R| / (S − |R|)``, is at most ``tolerance`` (default :data:`TAYLOR_TOLERANCE` nats, the
order of float32 ``logsumexp`` rounding); every other neuron gets the exact ``logsumexp``. On the default model
88% of the (prompt, neuron) pairs of layers 24–29 take the shortcut for the audit's arithmetic prompts (measured
max |shortcut − exact| 8.9e-6), which makes scoring ~3.7x faster than the exact path alone.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmaudit.checks.core.adapter import ArchitectureAdapter, adapter_for
from lmaudit.checks.core.hooks import first_tensor, hooks
from lmaudit.checks.core.logprobs import encode_continuations, encode_prompts

# Neurons per block of U = W_U·lin(fc2_k) rows (and of the generic path's logits): (256, vocab) float32 ≈ 50 MB
# on a 49k vocabulary, plus U² and U³ for the cumulant shortcut.
DEFAULT_CHUNK = 256
# (prompt, neuron) rows per exact logsumexp pass: (16, vocab) float32 ≈ 3 MB stays in cache; 512-row passes were
# ~1.7x slower per row on the default model.
EXACT_ROWS = 16
# A neuron takes the cumulant shortcut when its error bound is at most this many nats (module docstring).
TAYLOR_TOLERANCE = 1e-5


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


def mean_scores(scores: Sequence[NeuronScores], *, prompt: str, target: str) -> NeuronScores:
    """The element-wise mean of several prompts' scores (``target_id`` −1): what CNA ranks over a prompt set."""
    if not scores:
        raise ValueError("no scores to average")
    return NeuronScores(prompt=prompt, target=target, target_id=-1,
                        coefficient=torch.stack([s.coefficient for s in scores]).mean(0),
                        importance=torch.stack([s.importance for s in scores]).mean(0),
                        base_logprob=torch.stack([s.base_logprob for s in scores]).mean(0))


def encode(tokenizer: Any, text: str) -> list[int]:
    """The token ids the model sees for a prompt (the BOS policy of :func:`lmaudit.checks.core.logprobs.encode_prompts`)."""
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


@dataclass(frozen=True)
class _Moments:
    """What the cumulant shortcut needs of ``p = softmax(z0)`` for ``B`` prompts (module docstring)."""

    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (vocab, 3B), (vocab, 2B), (vocab, B)
    c2: torch.Tensor  # (B,) E_p[c²], float64
    c3: torch.Tensor  # (B,) E_p[c³]
    c_max: torch.Tensor  # (B,) max |c|
    c_target: torch.Tensor  # (B,) c[w]

    @classmethod
    def of(cls, z0: torch.Tensor, lse0: torch.Tensor, targets: torch.Tensor) -> _Moments:
        p = torch.exp(z0 - lse0[:, None])  # (B, vocab)
        c = z0 - (p * z0).sum(-1, keepdim=True)  # (B, vocab), E_p[c] = 0
        pc = p * c
        weights = (torch.cat([p, pc, pc * c]).T.contiguous(), torch.cat([p, pc]).T.contiguous(), p.T.contiguous())
        return cls(weights, (pc * c).sum(-1).double(), (pc * c * c).sum(-1).double(), c.abs().amax(-1).double(),
                   c[torch.arange(len(c)), targets].double())

    def expand(self, u: torch.Tensor, m: torch.Tensor, s: torch.Tensor, s0: torch.Tensor, targets: torch.Tensor,
               scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(importance, error bound)``, both ``(B, n)``, for the block ``u`` ``(n, vocab)`` of ``U``.
        ``scratch``: a float32 buffer of at least ``u``'s size for ``U²`` and ``U³`` (else allocated)."""
        batch = len(s0)
        g1 = (u @ self.weights[0]).double().T  # (3B, n): E_p[U], E_p[c·U], E_p[c²·U]
        power = torch.mul(u, u, out=scratch[:len(u)]) if scratch is not None else u * u  # U²
        g2 = (power @ self.weights[1]).double().T  # (2B, n): E_p[U²], E_p[c·U²]
        g3 = (power.mul_(u) @ self.weights[2]).double().T  # (B, n): E_p[U³]
        low, high = torch.aminmax(u, dim=-1)
        u_max = torch.maximum(-low, high).double()  # (n,) max |U_k|
        m01, m11, m21 = g1[:batch], g1[batch:2 * batch], g1[2 * batch:]
        m02, m12, m03 = g2[:batch], g2[batch:], g3
        s = s.double()
        rho = s0.double()[:, None] / s - 1  # (B, n)
        beta = m.double() / s
        c2, c3 = self.c2[:, None], self.c3[:, None]
        e1 = beta * m01
        e2 = (rho * rho * c2 + 2 * rho * beta * m11 + beta * beta * m02).clamp(min=0)
        e3 = rho ** 3 * c3 + 3 * rho * rho * beta * m21 + 3 * rho * beta * beta * m12 + beta ** 3 * m03
        total = 1 + e1 + e2 / 2 + e3 / 6
        d = rho.abs() * self.c_max[:, None] + beta.abs() * u_max[None]
        remainder = d * d * e2 * torch.exp(d) / 24
        bound = torch.where(total > remainder, remainder / (total - remainder), torch.full_like(total, torch.inf))
        x_target = rho * self.c_target[:, None] + beta * u[:, targets].double().T
        return x_target - torch.log(total.clamp(min=1e-300)), bound


@torch.no_grad()
def factorized_layer_importance(
    adapter: ArchitectureAdapter, residuals: torch.Tensor, coefficients: torch.Tensor, layer: int,
    target_ids: Sequence[int], eps: float, *, chunk: int = DEFAULT_CHUNK, tolerance: float | None = TAYLOR_TOLERANCE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The factorized path (module docstring) for ``B`` prompts of one layer: ``(importance (B, I), base (B,))``.

    ``residuals``: ``(B, hidden)`` = ``r``; ``coefficients``: ``(B, I)`` = ``m``. ``tolerance``: the cumulant
    shortcut's error bound in nats (``None``: exact ``logsumexp`` for every neuron).
    """
    fc2 = adapter.down_proj_weight(layer).float()  # (hidden, I)
    r = residuals.float()
    coefficients = coefficients.float()
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
    s0 = _rms(r, eps)  # (B,)
    z0 = capped(a / s0[:, None])  # (B, vocab): the logits of r
    lse0 = torch.logsumexp(z0, dim=-1)
    base = z0[rows, targets] - lse0  # (B,)
    moments = _Moments.of(z0, lse0, targets) if tolerance is not None and not cap else None
    r_sq = r.pow(2).sum(-1)  # (B,)
    out = torch.empty(coefficients.shape, dtype=torch.float32)
    # Reused buffers: fresh 50 MB tensors per block cost page faults that were ~10% of the time.
    w_u = adapter.unembedding.weight  # (vocab, hidden); this path has no unembedding bias
    block = torch.empty(min(chunk, fc2.shape[1]), a.shape[1])  # U rows of one block (float32)
    scratch = torch.empty_like(block) if moments is not None else None
    rows_buffer = torch.empty(EXACT_ROWS, a.shape[1])
    for start in range(0, fc2.shape[1], chunk):
        stop = min(start + chunk, fc2.shape[1])
        f = fc2[:, start:stop]  # (hidden, n)
        if w_u.dtype == torch.float32:
            u = torch.mm(lin(f.T), w_u.t(), out=block[:stop - start])  # (n, vocab)
        else:
            u = adapter.unembedding(lin(f.T)).float()
        m = coefficients[:, start:stop]  # (B, n)
        s = torch.sqrt((r_sq[:, None] + 2 * m * (r @ f) + m * m * f.pow(2).sum(0)) / d + eps)  # (B, n)
        exact = torch.ones(m.shape, dtype=torch.bool)
        if moments is not None:
            value, bound = moments.expand(u, m, s, s0, targets, scratch)
            exact = ~(bound <= tolerance)
            out[:, start:stop] = value.float()
        pairs = torch.nonzero(exact)  # (P, 2): (prompt, neuron in block)
        for first in range(0, len(pairs), EXACT_ROWS):
            b, j = pairs[first:first + EXACT_ROWS].T
            z = torch.index_select(a, 0, b, out=rows_buffer[:len(b)])  # (rows, vocab)
            z = capped(z.addcmul_(m[b, j][:, None], u[j]).div_(s[b, j][:, None]))
            out[b, start + j] = z[torch.arange(len(b)), targets[b]] - torch.logsumexp(z, dim=-1) - base[b]
    return out, base


@dataclass(frozen=True)
class LastStates:
    """``r`` (the residual without the FFN, ``(n, hidden)``) and ``m`` (the down projection's input,
    ``(n, intermediate)``) at each prompt's last position, per scored layer."""

    layers: tuple[int, ...]
    residual: dict[int, torch.Tensor]
    coefficient: dict[int, torch.Tensor]

    def __len__(self) -> int:
        return len(next(iter(self.residual.values()))) if self.residual else 0

    def concat(self, other: LastStates) -> LastStates:
        """Rows of ``self`` then ``other`` (same layers): score two conditions with one pass over ``U``."""
        if self.layers != other.layers:
            raise ValueError(f"layers differ: {self.layers} vs {other.layers}")
        return LastStates(self.layers, {i: torch.cat([self.residual[i], other.residual[i]]) for i in self.layers},
                          {i: torch.cat([self.coefficient[i], other.coefficient[i]]) for i in self.layers})


def _logits_to_keep(model: Any) -> dict[str, Any]:
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


@torch.no_grad()
def last_position_states(model: Any, tokenizer: Any, prompts: Sequence[str], *, layers: Sequence[int] | None = None,
                         adapter: ArchitectureAdapter | None = None) -> LastStates:
    """One forward pass (right-padded batch): ``r = h_{ℓ+1} − y_ℓ`` and ``m`` at each prompt's last position."""
    adapter = adapter or adapter_for(model)
    chosen = _check_layers(adapter, layers)
    input_ids, mask, last = pad_right(tokenizer, prompts)
    rows, last = torch.arange(len(prompts)).to(adapter.device), last.to(adapter.device)
    h_next: dict[int, torch.Tensor] = {}
    y: dict[int, torch.Tensor] = {}
    m: dict[int, torch.Tensor] = {}

    def keep_layer(layer: int) -> Any:
        def fn(module: Any, args: tuple[Any, ...], output: Any) -> None:
            h_next[layer] = first_tensor(output)[rows, last].detach()  # (n, hidden)
        return fn

    def keep_down(layer: int) -> Any:
        def fn(module: Any, args: tuple[Any, ...], output: Any) -> None:
            m[layer] = args[0][rows, last].detach()  # (n, intermediate)
            y[layer] = first_tensor(output)[rows, last].detach()  # (n, hidden)
        return fn

    forward = [(adapter.layer_list[i], keep_layer(i)) for i in chosen]
    forward += [(adapter.down_proj(i), keep_down(i)) for i in chosen]
    with hooks(forward=forward):
        model(input_ids=input_ids.to(adapter.device), attention_mask=mask.to(adapter.device), use_cache=False,
              **_logits_to_keep(model))
    return LastStates(tuple(chosen), {i: h_next[i] - y[i] for i in chosen}, m)


@torch.no_grad()
def scores_from_states(
    adapter: ArchitectureAdapter, states: LastStates, prompts: Sequence[str], targets: Sequence[str],
    target_ids: Sequence[int], *, chunk: int = DEFAULT_CHUNK, tolerance: float | None = TAYLOR_TOLERANCE,
) -> list[NeuronScores]:
    """The CNA scores of every row of ``states`` (row ``i`` is ``prompts[i]`` with target ``target_ids[i]``)."""
    n, n_layers, inter = len(states), adapter.n_layers, adapter.intermediate_size
    if not len(prompts) == len(targets) == len(target_ids) == n:
        raise ValueError(f"{n} rows of states but {len(prompts)} prompts, {len(targets)} targets, "
                         f"{len(target_ids)} target ids")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    coefficient = torch.full((n, n_layers, inter), float("nan"))
    importance = torch.full((n, n_layers, inter), float("nan"))
    base = torch.full((n, n_layers), float("nan"))
    eps = _rms_eps(adapter)
    for layer in states.layers:
        r, m = states.residual[layer], states.coefficient[layer]  # (n, hidden), (n, intermediate)
        coefficient[:, layer] = m.float().cpu()
        if eps is not None:
            imp, b = factorized_layer_importance(adapter, r, m, layer, target_ids, eps, chunk=chunk,
                                                 tolerance=tolerance)
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


@torch.no_grad()
def batched_neuron_scores(
    model: Any, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], *,
    layers: Sequence[int] | None = None, chunk: int = DEFAULT_CHUNK, adapter: ArchitectureAdapter | None = None,
    tolerance: float | None = TAYLOR_TOLERANCE,
) -> list[NeuronScores]:
    """:func:`neuron_scores` for many prompts with one forward pass (right-padded batch)."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if not prompts:
        return []
    adapter = adapter or adapter_for(model)
    target_ids = [target_token_id(tokenizer, p, t) for p, t in zip(prompts, targets, strict=True)]
    states = last_position_states(model, tokenizer, prompts, layers=layers, adapter=adapter)
    return scores_from_states(adapter, states, prompts, targets, target_ids, chunk=chunk, tolerance=tolerance)


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
    chunk: int = DEFAULT_CHUNK, adapter: ArchitectureAdapter | None = None, tolerance: float | None = TAYLOR_TOLERANCE,
) -> NeuronScores:
    """CNA coefficient and importance of every neuron of ``layers`` (default all) for ``target`` after ``prompt``.

    ``importance_k = log p(w | r + m_k·fc2_k) − log p(w | r)`` (Yu & Ananiadou 2024); see the module docstring
    for ``r``, the target token, the normalisation and the cumulant shortcut (``tolerance``).
    """
    return batched_neuron_scores(model, tokenizer, [prompt], [target], layers=layers, chunk=chunk,
                                 adapter=adapter, tolerance=tolerance)[0]


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
