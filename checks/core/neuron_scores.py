"""Comparative Neuron Analysis core: coefficient and importance of every FFN neuron for one target token.

Yu & Ananiadou, "Interpreting Arithmetic Mechanism in LLMs through Comparative Neuron Analysis" (EMNLP 2024),
built on their "Neuron-Level Knowledge Attribution in Large Language Models" (2024). At a prompt's last
position, layer ℓ's FFN adds ``write_ℓ`` to the residual stream; neuron ``k`` (activation ``m_k``, the ``k``-th
input channel of the down projection; ``fc2_k`` its column of ``W_down``) contributes ``v_k`` to it. For a target
token ``w``::

    coefficient_k = m_k
    importance_k  = log p(w | r + v_k) − log p(w | r),        r = h_{ℓ+1} − write_ℓ      (the paper's eq. 2)

**The neuron's write** ``v_k`` (:func:`neuron_writes`): ``write = adapter.ffn_write(ℓ, y)`` is what the layer
really adds (``y`` = the down projection's output, bias included):

- plain residual (Llama, Qwen, GPT-2, GPT-NeoX's parallel branch, ...): ``write = y`` and ``v_k = m_k·fc2_k``;
- sandwich norms (Gemma 2/3, OLMo 2: ``h_{ℓ+1} = r + norm(y)``): ``norm(y) = γ ⊙ y / σ(y)`` is linear in ``y``
  for the position's fixed scale ``σ(y) = sqrt(mean(y²) + ε)``, so the *linearised* write
  ``v_k = (m_k / σ(y)) · γ ⊙ fc2_k`` is exact in sum: ``Σ_k v_k = norm(y)`` minus the bias terms (none on those
  models). Chosen over passing ``m_k·fc2_k`` alone through the norm (not additive: those writes do not sum to
  what the layer adds). It keeps the factorization below: ``γ ⊙ fc2_k`` is shared by all prompts, and the
  per-prompt scale only rescales ``m`` to ``m / σ(y)``.

**Normalisation of the final norm** (``norm_f(x) = γ_f ⊙ center(x) / σ(x) + β_f``, RMSNorm or LayerNorm,
recognised by probing the module, :class:`NormMap`):

- ``"fixed"`` (default, the paper's code): ``σ`` is the clean run's final-residual scale at that position,
  ``σ_f = σ(h_final)``, the same for ``r`` and for every ``r + v_k``, so the logits are linear in the vector:
  ``p(· | x) = softmax(cap(W_U·(lin(x)/σ_f + β_f) + b_U))`` with ``lin(x) = γ_f ⊙ center(x)``;
- ``"per_neuron"``: the final norm is re-applied to each ``r + v_k`` (``σ(r + v_k)``), i.e. ``adapter.logits``.

``cap`` is the final logit soft-cap (Gemma 2). The target is tokenised as the model sees it after the prompt,
under the BOS policy of :mod:`lmaudit.checks.core.logprobs`: the prompt is ``encode_prompts([prompt])`` and
``w`` is the first token of ``encode_continuations([target])``.

**Cost.** One forward pass for all prompts (right-padded; hooks keep ``r``, ``m``, ``σ(y)`` and ``h_final`` at
the last positions), then per layer ``U_k = W_U·lin(v̂_k)`` for ``v̂_k = γ ⊙ fc2_k`` (or ``fc2_k``) in blocks of
neurons, shared by every prompt and both normalisers, and ``a = W_U·lin(r)`` per prompt::

    logits_k = cap((a + m̂_k·U_k) / s_k + W_U·β_f + b_U),   m̂_k = m_k / σ(y) (or m_k),
    s_k = σ_f ("fixed")   or   s_k² = (|c(r)|² + 2 m̂_k c(r)·c(v̂_k) + m̂_k² |c(v̂_k)|²)/d + ε ("per_neuron")

so an extra prompt costs ``intermediate × vocab`` elementwise work, not a forward pass per neuron.

**Cumulant shortcut** (without a soft-cap). With ``z0`` the logits of ``r``, ``p = softmax(z0)``,
``g = a / s_0`` and ``c = g − E_p[g]``, the logits of neuron ``k`` are ``z0 + X_k`` up to a constant, with
``X_k = ρ_k·c + β_k·U_k``, ``β_k = m̂_k / s_k``, ``ρ_k = s_0/s_k − 1`` (0 for ``"fixed"``), so::

    importance_k = X_k[w] − log E_p[exp(X_k)]
    E_p[exp X] = 1 + E X + E X²/2 + E X³/6 + R,   |R| ≤ D² · E X² · e^D / 24,   D = |ρ|·max|c| + |β|·max|U_k|

(Taylor's remainder with ``|X| ≤ D``). The moments ``E_p[c^i U_k^j]`` are matrix products over all prompts at
once. A neuron takes this value when the bound on the error of its log, ``|R| / (S − |R|)``, is at most
``tolerance`` nats (:data:`TAYLOR_TOLERANCE`, float32 ``logsumexp`` rounding); every other neuron gets the
exact ``logsumexp``. So every score is exact to the stated bound; the exact pass runs only for neurons that move
the logits (measured on the default model: 88% of the pairs take the shortcut, ~3.7x faster than all exact).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lmaudit.checks.core.accuracy import no_logits
from lmaudit.checks.core.adapter import ArchitectureAdapter, adapter_for
from lmaudit.checks.core.hooks import first_tensor, hooks
from lmaudit.checks.core.logprobs import encode_continuations, encode_prompts

# Neurons per block of U: at most 256 rows and ~64 MB of float32 (a 262k vocabulary gets 64-row blocks), plus
# the same again for U² and U³ of the cumulant shortcut.
DEFAULT_CHUNK = 256
BLOCK_FLOATS = 1 << 24
# (prompt, neuron) rows per exact logsumexp pass: (16, vocab) float32 ≈ 3 MB stays in cache; 512-row passes were
# ~1.7x slower per row on the default model.
EXACT_ROWS = 16
# A neuron takes the cumulant shortcut when its error bound is at most this many nats (module docstring).
TAYLOR_TOLERANCE = 1e-5

Normalizer = Literal["fixed", "per_neuron"]
NORMALIZERS: tuple[Normalizer, ...] = ("fixed", "per_neuron")


@dataclass(frozen=True)
class NeuronScores:
    """CNA scores of every FFN neuron for one prompt and target, at the prompt's last position.

    ``coefficient[ℓ, k] = m_k``; ``importance[ℓ, k] = log p(w | r + v_k) − log p(w | r)``;
    ``base_logprob[ℓ] = log p(w | r_ℓ)``; ``normalizer``: how the final norm was applied (module docstring).
    Layers that were not scored hold NaN. Shapes: ``coefficient``, ``importance`` ``(n_layers, intermediate)``;
    ``base_logprob`` ``(n_layers,)``.
    """

    prompt: str
    target: str
    target_id: int
    coefficient: torch.Tensor
    importance: torch.Tensor
    base_logprob: torch.Tensor
    normalizer: str = "fixed"

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
                        base_logprob=torch.stack([s.base_logprob for s in scores]).mean(0),
                        normalizer=scores[0].normalizer)


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


# ------------------------------------------------------------------------------------------------- norms


@dataclass(frozen=True)
class NormMap:
    """A norm ``norm(x) = γ ⊙ center(x) / σ(x) + β`` with ``σ(x) = sqrt(mean(center(x)²) + ε)`` and ``center``
    the identity (RMSNorm) or the mean removal (LayerNorm), as linear pieces: :meth:`lin` ``= γ ⊙ center(x)``.

    :meth:`of` recognises such a module by probing it (no class names): ``β = norm(0)``, ``lin(x) = (norm(x) −
    β)·σ(x)`` must be linear in ``x`` and reproduce the module. Gemma's ``(1 + w)`` scale needs nothing special.
    """

    module: nn.Module
    centered: bool
    eps: float
    bias: torch.Tensor  # β, (hidden,) float32 (zeros for RMSNorm)

    def center(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(-1, keepdim=True) if self.centered else x

    def sigma(self, x: torch.Tensor) -> torch.Tensor:
        """``(…,)``: the norm's scale of each row of ``x``."""
        return torch.sqrt(self.center(x.float()).pow(2).mean(-1) + self.eps)

    def lin(self, x: torch.Tensor) -> torch.Tensor:
        """``γ ⊙ center(x)`` of each row, float32 (the module applied, its scale and bias taken out)."""
        dtype = next((p.dtype for p in self.module.parameters()), torch.float32)
        out = self.module(x.to(dtype)).float() - self.bias
        return out * self.sigma(x)[..., None]

    @classmethod
    @torch.no_grad()
    def of(cls, module: nn.Module | None, hidden: int) -> NormMap | None:
        """The map of ``module``, or ``None`` when it is not such a norm (or names no ``eps``)."""
        if module is None:
            return None
        eps = next((getattr(module, name) for name in ("variance_epsilon", "eps", "epsilon")
                    if isinstance(getattr(module, name, None), float)), None)
        if eps is None:
            return None
        dtype = next((p.dtype for p in module.parameters()), torch.float32)
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(3, hidden, generator=generator).to(device)
        bias = module(torch.zeros(1, hidden, dtype=dtype, device=device)).float()[0]
        tolerance = 1e-4 if dtype == torch.float32 else 2e-2
        for centered in (False, True):
            candidate = cls(module, centered, float(eps), bias)
            lin = candidate.lin(x)
            combined = candidate.lin(x[0] + 2.0 * x[1] - 0.5 * x[2])
            scale = float(lin.abs().max()) + 1e-12
            if float((combined - (lin[0] + 2.0 * lin[1] - 0.5 * lin[2])).abs().max()) <= tolerance * 4 * scale:
                return candidate
        return None


def neuron_writes(adapter: ArchitectureAdapter, layer: int) -> torch.Tensor:
    """``(hidden, intermediate)`` float32: ``v̂_k``, neuron ``k``'s write per unit of (rescaled) activation —
    ``fc2_k``, or ``γ ⊙ fc2_k`` under a post-FFN norm (module docstring; the write at a position is
    ``m_k / σ(y) · v̂_k`` there)."""
    fc2 = adapter.down_proj_weight(layer).float()  # (hidden, intermediate)
    post = NormMap.of(adapter.layer(layer).post_ffn_norm, adapter.hidden_size)
    if adapter.layer(layer).post_ffn_norm is not None and post is None:
        raise ValueError(f"layer {layer}: the post-FFN norm {type(adapter.layer(layer).post_ffn_norm).__name__} is "
                         "not an RMSNorm/LayerNorm with an eps: its neuron writes cannot be linearised")
    return fc2 if post is None else post.lin(fc2.T).T.contiguous()


# ------------------------------------------------------------------------------------------ last states


@dataclass(frozen=True)
class LastStates:
    """At each prompt's last position, per scored layer: ``r`` (the residual without the FFN's write,
    ``(n, hidden)``), ``m`` (the down projection's input, ``(n, intermediate)``), ``scale`` (``1/σ(y)`` under a
    post-FFN norm, else 1, ``(n,)``); and ``final``, the final norm's input ``(n, hidden)``."""

    layers: tuple[int, ...]
    residual: dict[int, torch.Tensor]
    coefficient: dict[int, torch.Tensor]
    scale: dict[int, torch.Tensor]
    final: torch.Tensor

    def __len__(self) -> int:
        return len(self.final)

    def concat(self, other: LastStates) -> LastStates:
        """Rows of ``self`` then ``other`` (same layers): score two conditions with one pass over ``U``."""
        if self.layers != other.layers:
            raise ValueError(f"layers differ: {self.layers} vs {other.layers}")

        def cat(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
            return {i: torch.cat([a[i], b[i]]) for i in self.layers}

        return LastStates(self.layers, cat(self.residual, other.residual), cat(self.coefficient, other.coefficient),
                          cat(self.scale, other.scale), torch.cat([self.final, other.final]))


def _check_layers(adapter: ArchitectureAdapter, layers: Sequence[int] | None) -> list[int]:
    if layers is None:
        return list(range(adapter.n_layers))
    chosen = sorted(set(int(layer) for layer in layers))
    for layer in chosen:
        adapter.layer(layer)  # raises IndexError with the valid range
    return chosen


@torch.no_grad()
def last_position_states(model: Any, tokenizer: Any, prompts: Sequence[str], *, layers: Sequence[int] | None = None,
                         adapter: ArchitectureAdapter | None = None) -> LastStates:
    """One forward pass (right-padded batch): ``r = h_{ℓ+1} − write_ℓ``, ``m``, ``1/σ(y)`` and the final residual
    at each prompt's last position."""
    adapter = adapter or adapter_for(model)
    chosen = _check_layers(adapter, layers)
    input_ids, mask, last = pad_right(tokenizer, prompts)
    rows, last = torch.arange(len(prompts)).to(adapter.device), last.to(adapter.device)
    kept: dict[str, torch.Tensor] = {}

    def keep(name: str, what: str) -> Any:
        def fn(module: Any, args: tuple[Any, ...], output: Any) -> None:
            value = args[0] if what == "input" else first_tensor(output)
            kept[name] = value[rows, last].detach().float().cpu()
        return fn

    forward = [(adapter.final_norm, keep("final", "input"))]
    for i in chosen:
        forward += [(adapter.layer_list[i], keep(f"h{i}", "output")), (adapter.down_proj(i), keep(f"m{i}", "input")),
                    (adapter.down_proj(i), keep(f"y{i}", "output"))]
        if adapter.layer(i).post_ffn_norm is not None:
            forward.append((adapter.ffn_write_module(i), keep(f"w{i}", "output")))
    with hooks(forward=forward):
        model(input_ids=input_ids.to(adapter.device), attention_mask=mask.to(adapter.device), use_cache=False,
              **no_logits(model))
    scale = {}
    for i in chosen:
        post = NormMap.of(adapter.layer(i).post_ffn_norm, adapter.hidden_size)
        scale[i] = 1.0 / post.sigma(kept[f"y{i}"]) if post is not None else torch.ones(len(prompts))
    return LastStates(tuple(chosen), {i: kept[f"h{i}"] - kept.get(f"w{i}", kept[f"y{i}"]) for i in chosen},
                      {i: kept[f"m{i}"] for i in chosen}, scale, kept["final"])


# -------------------------------------------------------------------------------------- scoring paths


@dataclass(frozen=True)
class _Head:
    """The final norm and unembedding as linear pieces: ``logits = cap(W_U·lin(x)/s + const)``."""

    norm: NormMap
    w_u: torch.Tensor  # (vocab, hidden) float32
    const: torch.Tensor  # (vocab,) float32: W_U·β_f + b_U
    cap: float

    @classmethod
    @torch.no_grad()
    def of(cls, adapter: ArchitectureAdapter) -> _Head | None:
        norm = NormMap.of(adapter.final_norm, adapter.hidden_size)
        if norm is None:
            return None
        w_u = adapter.weight(adapter.unembedding).float()
        bias = getattr(adapter.unembedding, "bias", None)
        const = w_u @ norm.bias + (bias.float() if bias is not None else 0.0)
        return cls(norm, w_u, const.cpu(), float(adapter.final_logit_softcapping or 0.0))

    def capped(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z / self.cap) * self.cap if self.cap else z


@dataclass(frozen=True)
class _Moments:
    """What the cumulant shortcut needs of ``p = softmax(z0)`` for ``B`` prompts (module docstring)."""

    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (vocab, 3B|B), (vocab, 2B|B), (vocab, B)
    c2: torch.Tensor  # (B,) E_p[c²], float64
    c3: torch.Tensor  # (B,) E_p[c³]
    c_max: torch.Tensor  # (B,) max |c|
    c_target: torch.Tensor  # (B,) c[w]
    with_c: bool  # False: ρ = 0 ("fixed"), only E_p[U^j] is needed

    @classmethod
    def of(cls, z0: torch.Tensor, g: torch.Tensor, targets: torch.Tensor, with_c: bool) -> _Moments:
        p = torch.softmax(z0, dim=-1)  # (B, vocab)
        c = g - (p * g).sum(-1, keepdim=True)  # (B, vocab), E_p[c] = 0
        pc = p * c
        if with_c:
            weights = (torch.cat([p, pc, pc * c]).T.contiguous(), torch.cat([p, pc]).T.contiguous(),
                       p.T.contiguous())
        else:
            pt = p.T.contiguous()
            weights = (pt, pt, pt)
        return cls(weights, (pc * c).sum(-1).double(), (pc * c * c).sum(-1).double(), c.abs().amax(-1).double(),
                   c[torch.arange(len(c)), targets].double(), with_c)

    def expand(self, u: torch.Tensor, beta: torch.Tensor, rho: torch.Tensor, targets: torch.Tensor,
               scratch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(importance, error bound)``, both ``(B, n)``, for the block ``u`` ``(n, vocab)`` of ``U``;
        ``beta``, ``rho`` ``(B, n)``; ``scratch``: a float32 buffer of at least ``u``'s size."""
        batch = len(beta)
        g1 = (u @ self.weights[0]).double().T  # (3B|B, n): E_p[U], E_p[c·U], E_p[c²·U]
        power = torch.mul(u, u, out=scratch[:len(u)])  # U²
        g2 = (power @ self.weights[1]).double().T  # (2B|B, n): E_p[U²], E_p[c·U²]
        g3 = (power.mul_(u) @ self.weights[2]).double().T  # (B, n): E_p[U³]
        low, high = torch.aminmax(u, dim=-1)
        u_max = torch.maximum(-low, high).double()  # (n,) max |U_k|
        beta, rho = beta.double(), rho.double()
        m01, m02, m03 = g1[:batch], g2[:batch], g3
        e1 = beta * m01
        e2 = beta * beta * m02
        e3 = beta ** 3 * m03
        if self.with_c:
            m11, m21, m12 = g1[batch:2 * batch], g1[2 * batch:], g2[batch:]
            c2, c3 = self.c2[:, None], self.c3[:, None]
            e2 = e2 + rho * rho * c2 + 2 * rho * beta * m11
            e3 = e3 + rho ** 3 * c3 + 3 * rho * rho * beta * m21 + 3 * rho * beta * beta * m12
        e2 = e2.clamp(min=0)
        total = 1 + e1 + e2 / 2 + e3 / 6
        d = rho.abs() * self.c_max[:, None] + beta.abs() * u_max[None]
        remainder = d * d * e2 * torch.exp(d) / 24
        bound = torch.where(total > remainder, remainder / (total - remainder), torch.full_like(total, torch.inf))
        x_target = rho * self.c_target[:, None] + beta * u[:, targets].double().T
        return x_target - torch.log(total.clamp(min=1e-300)), bound


@torch.no_grad()
def factorized_importance(
    head: _Head, writes: torch.Tensor, residuals: torch.Tensor, coefficients: torch.Tensor, final: torch.Tensor,
    target_ids: Sequence[int], *, normalizers: Sequence[Normalizer] = ("fixed",), chunk: int = DEFAULT_CHUNK,
    tolerance: float | None = TAYLOR_TOLERANCE,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The factorized path (module docstring) for ``B`` prompts of one layer: per normaliser
    ``(importance (B, I), base (B,))``.

    ``writes``: ``(hidden, I)`` = ``v̂`` (:func:`neuron_writes`); ``residuals``: ``(B, hidden)`` = ``r``;
    ``coefficients``: ``(B, I)`` = ``m̂`` (already divided by ``σ(y)`` under a post-FFN norm); ``final``:
    ``(B, hidden)`` the final residual (for ``"fixed"``). ``tolerance``: the cumulant shortcut's error bound in
    nats (``None``: exact ``logsumexp`` for every neuron).
    """
    r, m, writes = residuals.float(), coefficients.float(), writes.float()
    d, width = writes.shape
    norm = head.norm
    targets = torch.as_tensor(list(target_ids))
    rows = torch.arange(len(r))
    a = norm.lin(r) @ head.w_u.T  # (B, vocab)
    rc = norm.center(r)
    scales = {"fixed": norm.sigma(final.float()), "per_neuron": norm.sigma(r)}  # (B,) s_0 of each normaliser
    chunk = max(1, min(chunk, BLOCK_FLOATS // max(1, a.shape[1])))
    shortcut = tolerance is not None and not head.cap
    state = {}
    for name in normalizers:
        s0 = scales[name]
        g = a / s0[:, None]
        z0 = head.capped(g + head.const)  # (B, vocab): the logits of r
        lse0 = torch.logsumexp(z0, dim=-1)
        base = z0[rows, targets] - lse0
        moments = _Moments.of(z0, g, targets, with_c=name == "per_neuron") if shortcut else None
        state[name] = (s0, base, moments, torch.empty(m.shape, dtype=torch.float32))
    r_sq = rc.pow(2).sum(-1)  # (B,)
    # Reused buffers: fresh 50 MB tensors per block cost page faults that were ~10% of the time.
    block = torch.empty(min(chunk, width), a.shape[1])  # U rows of one block
    scratch = torch.empty_like(block) if shortcut else block
    rows_buffer = torch.empty(EXACT_ROWS, a.shape[1])
    for start in range(0, width, chunk):
        stop = min(start + chunk, width)
        f = writes[:, start:stop]  # (hidden, n)
        u = torch.mm(norm.lin(f.T), head.w_u.t(), out=block[:stop - start])  # (n, vocab)
        mb = m[:, start:stop]  # (B, n)
        for name, (s0, base, moments, out) in state.items():
            if name == "fixed":
                s = s0[:, None].expand_as(mb)
                rho = torch.zeros_like(mb)
            else:
                fc = norm.center(f.T)  # (n, hidden)
                s = torch.sqrt((r_sq[:, None] + 2 * mb * (rc @ fc.T) + mb * mb * fc.pow(2).sum(-1)) / d + norm.eps)
                rho = s0[:, None] / s - 1
            exact = torch.ones(mb.shape, dtype=torch.bool)
            if moments is not None:
                value, bound = moments.expand(u, mb / s, rho, targets, scratch)
                exact = ~(bound <= tolerance)
                out[:, start:stop] = value.float()
            pairs = torch.nonzero(exact)  # (P, 2): (prompt, neuron in block)
            for first in range(0, len(pairs), EXACT_ROWS):
                b, j = pairs[first:first + EXACT_ROWS].T
                z = torch.index_select(a, 0, b, out=rows_buffer[:len(b)])  # (rows, vocab)
                z = head.capped(z.addcmul_(mb[b, j][:, None], u[j]).div_(s[b, j][:, None]).add_(head.const))
                out[b, start + j] = z[torch.arange(len(b)), targets[b]] - torch.logsumexp(z, dim=-1) - base[b]
    return {name: (out, base) for name, (_, base, _, out) in state.items()}


@torch.no_grad()
def layer_importance(
    adapter: ArchitectureAdapter, residual: torch.Tensor, coefficient: torch.Tensor, layer: int, target_id: int,
    *, chunk: int = DEFAULT_CHUNK, writes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The generic ``"per_neuron"`` path for one residual (any final norm): ``(importance (I,), base ())`` with
    ``adapter.logits(r + m̂_k·v̂_k)`` for chunks of neurons at once. ``residual``: ``(hidden,)``; ``coefficient``:
    ``(I,)`` = ``m̂``; ``writes``: ``v̂`` (default :func:`neuron_writes`)."""
    writes = neuron_writes(adapter, layer) if writes is None else writes
    dtype = adapter.dtype
    residual = residual.to(adapter.device, dtype)
    base = torch.log_softmax(adapter.logits(residual[None]).float(), dim=-1)[0, target_id].cpu()
    out = torch.empty(writes.shape[1], dtype=torch.float32)
    for start in range(0, writes.shape[1], chunk):
        stop = min(start + chunk, writes.shape[1])
        added = (writes[:, start:stop] * coefficient[start:stop].float()).T.to(adapter.device, dtype)  # (n, hidden)
        logprobs = torch.log_softmax(adapter.logits(residual + added).float(), dim=-1)  # (n, vocab)
        out[start:stop] = logprobs[:, target_id].cpu() - base
    return out, base


@torch.no_grad()
def scores_from_states(
    adapter: ArchitectureAdapter, states: LastStates, prompts: Sequence[str], targets: Sequence[str],
    target_ids: Sequence[int], *, normalizers: Sequence[Normalizer] = ("fixed",), chunk: int = DEFAULT_CHUNK,
    tolerance: float | None = TAYLOR_TOLERANCE,
) -> dict[str, list[NeuronScores]]:
    """The CNA scores of every row of ``states`` (row ``i`` is ``prompts[i]`` with target ``target_ids[i]``),
    per normaliser. Without a recognised final norm (:class:`NormMap`) only ``"per_neuron"`` exists (the generic
    path through ``adapter.logits``); a ``"fixed"`` request then raises."""
    n, n_layers, inter = len(states), adapter.n_layers, adapter.intermediate_size
    if not len(prompts) == len(targets) == len(target_ids) == n:
        raise ValueError(f"{n} rows of states but {len(prompts)} prompts, {len(targets)} targets, "
                         f"{len(target_ids)} target ids")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    unknown = set(normalizers) - set(NORMALIZERS)
    if unknown or not normalizers:
        raise ValueError(f"normalizers must be among {NORMALIZERS}, got {tuple(normalizers)}")
    head = _Head.of(adapter)
    if head is None and "fixed" in normalizers:
        raise ValueError(f"the final norm {type(adapter.final_norm).__name__} is not an RMSNorm/LayerNorm with an eps: "
                         "the fixed normaliser needs its scale; use normalizers=('per_neuron',)")
    coefficient = torch.full((n, n_layers, inter), float("nan"))
    importance = {name: torch.full((n, n_layers, inter), float("nan")) for name in normalizers}
    base = {name: torch.full((n, n_layers), float("nan")) for name in normalizers}
    for layer in states.layers:
        r, m = states.residual[layer], states.coefficient[layer]  # (n, hidden), (n, intermediate)
        scaled = m.float() * states.scale[layer][:, None]  # m̂
        coefficient[:, layer] = m.float()
        writes = neuron_writes(adapter, layer)
        if head is not None:
            done = factorized_importance(head, writes, r, scaled, states.final, target_ids, normalizers=normalizers,
                                         chunk=chunk, tolerance=tolerance)
            for name, (imp, b) in done.items():
                importance[name][:, layer], base[name][:, layer] = imp, b
            continue
        for i in range(n):
            importance["per_neuron"][i, layer], base["per_neuron"][i, layer] = layer_importance(
                adapter, r[i], scaled[i], layer, target_ids[i], chunk=chunk, writes=writes)
    return {name: [NeuronScores(prompt=p, target=t, target_id=tid, coefficient=coefficient[i],
                                importance=importance[name][i], base_logprob=base[name][i], normalizer=name)
                   for i, (p, t, tid) in enumerate(zip(prompts, targets, target_ids, strict=True))]
            for name in normalizers}


@torch.no_grad()
def batched_neuron_scores(
    model: Any, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], *,
    layers: Sequence[int] | None = None, chunk: int = DEFAULT_CHUNK, adapter: ArchitectureAdapter | None = None,
    tolerance: float | None = TAYLOR_TOLERANCE, normalizer: Normalizer = "fixed",
) -> list[NeuronScores]:
    """:func:`neuron_scores` for many prompts with one forward pass (right-padded batch)."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if not prompts:
        return []
    adapter = adapter or adapter_for(model)
    target_ids = [target_token_id(tokenizer, p, t) for p, t in zip(prompts, targets, strict=True)]
    states = last_position_states(model, tokenizer, prompts, layers=layers, adapter=adapter)
    return scores_from_states(adapter, states, prompts, targets, target_ids, normalizers=(normalizer,), chunk=chunk,
                              tolerance=tolerance)[normalizer]


def neuron_scores(
    model: Any, tokenizer: Any, prompt: str, target: str, *, layers: Sequence[int] | None = None,
    chunk: int = DEFAULT_CHUNK, adapter: ArchitectureAdapter | None = None, tolerance: float | None = TAYLOR_TOLERANCE,
    normalizer: Normalizer = "fixed",
) -> NeuronScores:
    """CNA coefficient and importance of every neuron of ``layers`` (default all) for ``target`` after ``prompt``.

    ``importance_k = log p(w | r + v_k) − log p(w | r)`` (Yu & Ananiadou 2024); see the module docstring for ``r``,
    ``v_k``, the target token, the normalisers and the cumulant shortcut (``tolerance``).
    """
    return batched_neuron_scores(model, tokenizer, [prompt], [target], layers=layers, chunk=chunk,
                                 adapter=adapter, tolerance=tolerance, normalizer=normalizer)[0]


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
    """Top and bottom ``k`` tokens of ``adapter.logits(v)`` for ``v = v̂_k`` (or ``m_k·v̂_k`` with a
    coefficient), as ``(token, logit)`` lists: the tokens the neuron promotes and suppresses.

    The final norm is applied to ``v`` alone (for RMSNorm and LayerNorm this rescales ``v``, so the ranking is
    that of ``W_U·(γ ⊙ v)``; a negative coefficient swaps top and bottom).
    """
    writes = neuron_writes(adapter, layer)
    if not 0 <= neuron < writes.shape[1]:
        raise IndexError(f"neuron {neuron} out of range 0..{writes.shape[1] - 1}")
    vector = writes[:, neuron] * (1.0 if coefficient is None else float(coefficient))  # (hidden,)
    logits = adapter.logits(vector[None].to(adapter.device, adapter.dtype))[0].float()  # (vocab,)
    k = min(k, logits.shape[0])
    top = torch.topk(logits, k)
    bottom = torch.topk(-logits, k)

    def tokens(values: torch.Tensor, index: torch.Tensor, sign: float) -> list[tuple[str, float]]:
        return [(tokenizer.decode([int(i)]), sign * float(v)) for v, i in zip(values, index, strict=True)]

    return tokens(top.values, top.indices, 1.0), tokens(bottom.values, bottom.indices, -1.0)


@torch.no_grad()
def subset_importance(adapter: ArchitectureAdapter, states: LastStates, target_ids: Sequence[int],
                      neurons: dict[int, Sequence[int]], *, normalizer: Normalizer = "fixed",
                      tolerance: float | None = TAYLOR_TOLERANCE) -> dict[int, torch.Tensor]:
    """``{layer: (n, len(neurons[layer]))}``: the importance of only the named neurons for every row of
    ``states`` (the factorized path restricted to their columns of ``U``: cheap for a few neurons)."""
    head = _Head.of(adapter)
    if head is None:
        raise ValueError(f"the final norm {type(adapter.final_norm).__name__} is not an RMSNorm/LayerNorm with an eps")
    out = {}
    for layer, chosen in neurons.items():
        index = torch.as_tensor(list(chosen), dtype=torch.long)
        scaled = states.coefficient[layer].float() * states.scale[layer][:, None]
        done = factorized_importance(head, neuron_writes(adapter, layer)[:, index], states.residual[layer],
                                     scaled[:, index], states.final, target_ids, normalizers=(normalizer,),
                                     tolerance=tolerance)
        out[layer] = done[normalizer][0]
    return out
