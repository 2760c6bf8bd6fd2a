"""What the super weights do to the next-token distribution (Yu et al. 2024, §3.3, Figure 5): with them pruned,
the probability of stopwords rises (the paper: 2-5× on Llama-7B); the super weights suppress stopwords.

Over N corpus prompts (consecutive chunks of ``prompt_tokens`` tokens, BOS policy), with and without the super
weights::

    p̄(w)          = (1/N) Σ_i p(w | prompt_i)                   mean next-token distribution
    stopword mass = Σ_{w ∈ S} p̄(w)                               S: tokens whose text, stripped and lowercased,
                                                                 is a stopword (default: NLTK's English list)
    stopword_mass_ratio = mass(pruned) / mass(original)          > 1: the mass rises, as the paper found

and the top tokens of the pruned model's distribution with their ratio ``p̄_pruned(w) / p̄_original(w)``.
The pruned evaluation starts at the first super weight's layer from the clean run's hidden state
(:func:`lmaudit.checks.core.layer_skip.start_at_layer`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lmaudit.checks.core.accuracy import accepts_logits_to_keep
from lmaudit.checks.core.corpora import Corpus
from lmaudit.checks.core.layer_skip import start_at_layer
from lmaudit.checks.core.loading import LoadedModel
from lmaudit.checks.core.logprobs import bos_prefix, check_finite
from lmaudit.checks.core.perplexity import corpus_tokens
from lmaudit.checks.core.results import CheckResult, metric, metric_field
from lmaudit.checks.superweights.conditions import prune
from lmaudit.checks.superweights.detect import SuperWeightDetection

_STOPWORD_TEXT = """
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on
once only or other our ours ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were what when where which
while who whom why will with would you your yours yourself yourselves
"""
STOPWORDS: tuple[str, ...] = tuple(sorted(set(_STOPWORD_TEXT.split())))  # NLTK's core English list


@dataclass(frozen=True)
class TokenShift:
    token: str
    original: float  # mean probability
    pruned: float
    ratio: float  # pruned / original


@dataclass(frozen=True)
class StopwordShift(CheckResult):
    """Mean next-token distribution over corpus prompts with and without the super weights."""

    n_prompts: int
    prompt_tokens: int
    n_stopword_tokens: int  # vocabulary entries counted as stopwords
    stopword_mass_original: float = metric_field()
    stopword_mass_pruned: float = metric_field()
    top_tokens: tuple[TokenShift, ...] = ()  # the top tokens of the pruned model's mean distribution

    @metric
    def stopword_mass_ratio(self) -> float:
        """mass(pruned) / mass(original): above 1 when pruning moves probability onto stopwords."""
        return self.stopword_mass_pruned / max(self.stopword_mass_original, 1e-30)

    @metric
    def top_token_pruned(self) -> str:
        return self.top_tokens[0].token if self.top_tokens else ""


def stopword_token_ids(tokenizer: Any, stopwords: Iterable[str] = STOPWORDS) -> Tensor:
    """Ids of the vocabulary entries whose text, stripped and lowercased, is in ``stopwords``."""
    words = {w.strip().lower() for w in stopwords}
    texts = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    ids = [i for i, raw in enumerate(texts)
           if raw is not None and tokenizer.convert_tokens_to_string([raw]).strip().lower() in words]
    return torch.tensor(ids, dtype=torch.long)


def corpus_prompts(model: LoadedModel, corpus: Corpus, n_prompts: int, prompt_tokens: int) -> Tensor:
    """``(n_prompts, [BOS] + prompt_tokens)``: consecutive corpus chunks under the BOS policy."""
    tokens = corpus_tokens(model.tokenizer, corpus)[: n_prompts * prompt_tokens]
    if len(tokens) < n_prompts * prompt_tokens:
        raise ValueError(f"corpus {corpus.name!r} has {len(tokens)} tokens, fewer than {n_prompts} × {prompt_tokens}")
    tokens = tokens.view(n_prompts, prompt_tokens)
    prefix = bos_prefix(model.tokenizer)
    if prefix:
        tokens = torch.cat([torch.full((n_prompts, 1), prefix[0]), tokens], dim=1)
    return tokens


@torch.no_grad()
def mean_next_token_distribution(prompts: Tensor, forward: Callable[[Tensor, int], Tensor], *,
                                 batch_size: int) -> Tensor:
    """``p̄ = (1/N) Σ_i softmax(logits_i[last])``: ``(vocab,)`` float64."""
    total: Tensor | None = None
    for start in range(0, len(prompts), batch_size):
        logits = forward(prompts[start : start + batch_size], start)[:, -1].double()  # (b, vocab)
        check_finite(logits, f"stopword prompts {start}..{start + batch_size - 1}")
        probs = torch.softmax(logits, dim=-1).sum(0)
        total = probs if total is None else total + probs
    assert total is not None
    return total / len(prompts)


def stopword_shift(model: LoadedModel, detection: SuperWeightDetection, corpus: Corpus, *, n_prompts: int = 100,
                   prompt_tokens: int = 32, top_k: int = 20, stopwords: Sequence[str] = STOPWORDS,
                   batch_size: int = 32) -> StopwordShift:
    """Stopword mass and top-token ratios with and without the super weights (module docstring).

    Raises :class:`~lmaudit.checks.core.errors.PremiseMissing` when the detection confirmed no super weight."""
    coordinates = [sw.coordinates for sw in detection.require()]
    prompts = corpus_prompts(model, corpus, n_prompts, prompt_tokens).to(model.adapter.device)
    layer = min(c[0] for c in coordinates)
    hidden: list[Tensor] = []
    last_only = {"logits_to_keep": 1} if accepts_logits_to_keep(model.model) else {}  # only the next token counts

    def clean(batch: Tensor, start: int) -> Tensor:
        out = model.model(input_ids=batch, output_hidden_states=layer > 0, use_cache=False, **last_only)
        if layer > 0:
            hidden.append(out.hidden_states[layer])  # (b, t, hidden), entering the first super weight's layer
        return out.logits

    def from_layer(batch: Tensor, start: int) -> Tensor:
        with start_at_layer(model.adapter, layer, hidden[start // batch_size]):
            return model.model(input_ids=batch, use_cache=False, **last_only).logits

    original = mean_next_token_distribution(prompts, clean, batch_size=batch_size)
    with prune(model.adapter, coordinates):
        pruned = mean_next_token_distribution(prompts, from_layer if layer > 0 else clean, batch_size=batch_size)
    stop = stopword_token_ids(model.tokenizer, stopwords)
    top = torch.topk(pruned, min(top_k, pruned.numel())).indices.tolist()
    shifts = tuple(TokenShift(model.tokenizer.decode([i]), float(original[i]), float(pruned[i]),
                              float(pruned[i] / max(float(original[i]), 1e-30))) for i in top)
    return StopwordShift(n_prompts, prompt_tokens, len(stop), float(original[stop].sum()), float(pruned[stop].sum()),
                         shifts)
