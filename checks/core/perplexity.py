"""Perplexity with one pinned definition (:data:`PERPLEXITY_DEFINITION`, printed in every HTML report).

::

    tokens  = tokenizer(corpus.text, add_special_tokens=False)     # once; cached per tokenizer + corpus
    windows = tokens[k*L : (k+1)*L]  for k = 0 .. n_windows-1       # non-overlapping, L = seq_len
    input_k = [BOS] + window_k   (scored: all L window tokens)     # the tokenizer has a BOS token
            = window_k           (scored: the last L-1 tokens)     # it has none
    NLL     = Σ_k Σ_t −log p(input_k[t] | input_k[<t])  over the scored t
    PPL     = exp(NLL / n_scored_tokens)

Windows never see the text before them (no sliding context), so the figure is a "fresh-context" perplexity,
higher than a sliding-window one. lm-eval's ``loglikelihood_rolling`` scores the same tokens in the same
contexts when each window is given to it as its own document
(:func:`lmaudit.checks.core.lm_eval_bridge.lm_eval_rolling_perplexity`).

To re-evaluate the *same* windows under an intervention, build them once with :func:`corpus_windows` and call
:func:`window_nll` inside the intervention's context (or pass ``forward=`` for evaluations that are not a
plain model call, e.g. layer skipping); :func:`perplexity_from_nll` turns the summed NLLs into a perplexity.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lmaudit.checks.core.corpora import Corpus
from lmaudit.checks.core.errors import LmAuditError
from lmaudit.checks.core.logprobs import Forward, bos_prefix, check_finite, model_forward

__all__ = [
    "PERPLEXITY_DEFINITION",
    "CorpusTooShortError",
    "PerplexityResult",
    "corpus_tokens",
    "corpus_windows",
    "perplexity",
    "perplexity_from_nll",
    "window_nll",
]

PERPLEXITY_DEFINITION = (
    "Perplexity = exp(mean token NLL). The corpus text is tokenised once without special tokens and cut "
    "into non-overlapping windows of seq_len tokens; the first n_windows windows are used. Each window is "
    "fed on its own as [BOS] + window when the tokenizer has a BOS token (every window token is scored), "
    "else as the window alone (its first token is not scored). No context carries over between windows. "
    "The mean is over all scored tokens of all windows."
)
DEFAULT_SEQ_LEN = 256
DEFAULT_N_WINDOWS = 16  # 16 x 256 = 4096 tokens: about 10 s for a 135M model on 2 cores
DEFAULT_BATCH_SIZE = 4  # 4 x 257 x 49k-vocab float32 logits ~ 200 MB
_TOKEN_CACHE_SIZE = 8


class CorpusTooShortError(LmAuditError, ValueError):
    """The corpus has fewer full windows than requested (the message says how many it has)."""


@dataclass(frozen=True)
class PerplexityResult:
    """A perplexity under :data:`PERPLEXITY_DEFINITION`; plain numbers only."""

    perplexity: float
    mean_nll: float  # nats per scored token
    n_tokens: int  # scored tokens
    n_windows: int
    seq_len: int
    corpus: str  # corpus name
    corpus_source: str
    definition: str = PERPLEXITY_DEFINITION


# ----------------------------------------------------------------------------------------- tokens and windows

_TOKENS: OrderedDict[Hashable, Tensor] = OrderedDict()


def _cache_key(tokenizer: PreTrainedTokenizerBase, corpus: Corpus) -> Hashable:
    name = getattr(tokenizer, "name_or_path", "") or f"id{id(tokenizer)}"  # unnamed (in-memory) tokenizers
    return (
        name,
        type(tokenizer).__name__,
        len(tokenizer),
        corpus.source,
        len(corpus.text),
        hash(corpus.text),
    )


def corpus_tokens(tokenizer: PreTrainedTokenizerBase, corpus: Corpus) -> Tensor:
    """``tokenizer(corpus.text, add_special_tokens=False)`` as a 1-D LongTensor, cached in-process.

    The key is (tokenizer name_or_path, class, vocab size, corpus source, text length, text hash); the last
    few corpora are kept. Do not modify the returned tensor.
    """
    key = _cache_key(tokenizer, corpus)
    if key in _TOKENS:
        _TOKENS.move_to_end(key)
        return _TOKENS[key]
    ids = tokenizer(corpus.text, add_special_tokens=False, return_attention_mask=False, verbose=False)
    # verbose=False: no "sequence longer than the model's max length" warning for a whole corpus
    tokens = torch.tensor(ids["input_ids"], dtype=torch.long)
    _TOKENS[key] = tokens
    while len(_TOKENS) > _TOKEN_CACHE_SIZE:
        _TOKENS.popitem(last=False)
    return tokens


def _check_sizes(seq_len: int, n_windows: int) -> None:
    for name, value, low in (("seq_len", seq_len, 2), ("n_windows", n_windows, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise LmAuditError(f"{name} must be an int >= {low}, got {value!r}")


def corpus_windows(
    tokenizer: PreTrainedTokenizerBase, corpus: Corpus, seq_len: int, n_windows: int
) -> Tensor:
    """The model inputs of the definition: ``(n_windows, seq_len + 1)`` with BOS in column 0, or
    ``(n_windows, seq_len)`` when the tokenizer has no BOS. Column 0 is never scored.

    Raises :class:`CorpusTooShortError` when the corpus has fewer than ``n_windows`` full windows.
    """
    _check_sizes(seq_len, n_windows)
    tokens = corpus_tokens(tokenizer, corpus)
    available = len(tokens) // seq_len
    if available < n_windows:
        raise CorpusTooShortError(
            f"corpus {corpus.name!r} ({corpus.source}) has {len(tokens)} tokens, i.e. {available} full "
            f"windows of {seq_len} tokens; {n_windows} were requested. Lower n_windows or seq_len, or use a "
            "longer corpus."
        )
    windows = tokens[: n_windows * seq_len].view(n_windows, seq_len)  # (n_windows, seq_len)
    prefix = bos_prefix(tokenizer)
    if prefix:
        windows = torch.cat([torch.full((n_windows, 1), prefix[0], dtype=torch.long), windows], dim=1)
    return windows.clone()


# ------------------------------------------------------------------------------------------- scoring


@torch.no_grad()
def window_nll(
    model: nn.Module,
    windows: Tensor,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    forward: Forward | None = None,
) -> Tensor:
    """Summed NLL of each window, ``Σ_{t≥1} −log p(w[t] | w[<t])`` (column 0: context only): ``(n,)`` float64.

    ``forward(input_ids (b, t), None) -> logits (b, t, vocab)`` gets whole windows (no padding, no attention
    mask); the default is a plain ``model(...)`` call, so calling this inside an intervention's context
    measures the edited model. Raises :class:`~lmaudit.checks.core.errors.NonFiniteOutputError` on NaN or inf logits,
    naming the first layer whose output was non-finite.
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise LmAuditError(f"windows must be (n_windows, >= 2 tokens), got shape {tuple(windows.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LmAuditError(f"batch_size must be an int >= 1, got {batch_size!r}")
    forward = forward or model_forward(model)
    device = next(model.parameters()).device
    out = torch.empty(windows.shape[0], dtype=torch.float64)
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)  # (b, t)
        logits = forward(batch, None)[:, :-1].float()  # (b, t-1, vocab): position t predicts t+1
        check_finite(logits, f"perplexity windows {start}..{start + batch.shape[0] - 1}", model=model,
                     rerun=partial(forward, batch, None))
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
        ).view(batch.shape[0], -1)  # (b, t-1)
        out[start : start + batch.shape[0]] = nll.double().sum(dim=1).cpu()
    return out


def perplexity_from_nll(nll: Tensor, windows: Tensor) -> tuple[float, float, int]:
    """``(perplexity, mean_nll, n_tokens)`` from :func:`window_nll` of ``windows``: exp(Σ NLL / n_scored)."""
    n_tokens = int(windows.shape[0] * (windows.shape[1] - 1))
    mean = float(nll.sum()) / n_tokens
    return math.exp(mean), mean, n_tokens


def perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    corpus: Corpus,
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    n_windows: int = DEFAULT_N_WINDOWS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    forward: Forward | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``corpus`` under :data:`PERPLEXITY_DEFINITION`.

    Arguments are checked before the model runs: a window (with BOS) must fit the model's
    ``max_position_embeddings`` when the config has one.
    """
    _check_sizes(seq_len, n_windows)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len + len(bos_prefix(tokenizer)) > limit:
        raise LmAuditError(f"seq_len={seq_len} (+BOS) exceeds the model's max_position_embeddings={limit}")
    windows = corpus_windows(tokenizer, corpus, seq_len, n_windows)
    nll = window_nll(model, windows, batch_size=batch_size, forward=forward)
    ppl, mean, n_tokens = perplexity_from_nll(nll, windows)
    return PerplexityResult(
        perplexity=ppl,
        mean_nll=mean,
        n_tokens=n_tokens,
        n_windows=n_windows,
        seq_len=seq_len,
        corpus=corpus.name,
        corpus_source=corpus.source,
    )
