"""The model under audit as the harness sees it: its architecture, and its perplexity against the simplest
baseline, the corpus's own unigram distribution.

Every perplexity-based claim of the papers (Table 1's pruning, the quantization recovery) compares a model with
itself under an intervention; none of them means anything if the model does not predict text in the first
place. The model-agnostic gate is therefore relative: the model's perplexity on the session corpus is below the
perplexity of the unigram distribution of that corpus's tokens (estimated on the whole corpus, evaluated on the
same scored tokens, so it is the best unigram model of those tokens: a strict baseline)::

    PPL_model   = exp(mean NLL)                                    (core.perplexity.PERPLEXITY_DEFINITION)
    PPL_unigram = exp(−(1/N) Σ_t log q(w_t)),  q(w) = count(w) / Σ count   over the corpus tokens
    ratio       = PPL_model / PPL_unigram          (< 1: the model uses context)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from lmaudit.checks.core.corpora import Corpus
from lmaudit.checks.core.loading import LoadedModel
from lmaudit.checks.core.perplexity import PerplexityResult, corpus_tokens, corpus_windows, perplexity
from lmaudit.checks.core.results import CheckResult, metric, metric_field


@dataclass(frozen=True)
class ArchitectureSummary(CheckResult):
    """Where the adapter found each module, and the shape numbers read from the config."""

    model_type: str = metric_field()
    n_layers: int = metric_field()
    n_heads: int = metric_field()
    n_kv_heads: int = metric_field()
    head_dim: int = metric_field()
    hidden_size: int = metric_field()
    intermediate_size: int = metric_field()
    parameters: int = metric_field()
    dtype: str = metric_field()
    sandwich_norms: bool = metric_field(default=False)
    modules: dict[str, Any] | None = None


def architecture_summary(loaded: LoadedModel) -> ArchitectureSummary:
    """The adapter's view of ``loaded``: shape numbers from the config and where each module was found."""
    summary = loaded.adapter.summary()
    return ArchitectureSummary(
        model_type=summary["model_type"], n_layers=summary["n_layers"], n_heads=summary["n_heads"],
        n_kv_heads=summary["n_kv_heads"], head_dim=summary["head_dim"], hidden_size=summary["hidden_size"],
        intermediate_size=summary["intermediate_size"], parameters=summary["parameters"], dtype=summary["dtype"],
        sandwich_norms=loaded.adapter.sandwich_norms, modules=summary["modules"],
    )


@dataclass(frozen=True)
class PerplexityAudit(CheckResult):
    """The pinned perplexity of the model and of the corpus's unigram baseline on the same scored tokens."""

    result: PerplexityResult
    unigram_perplexity: float = metric_field()

    @metric
    def perplexity(self) -> float:
        return self.result.perplexity

    @metric
    def mean_nll(self) -> float:
        return self.result.mean_nll

    @metric
    def n_tokens(self) -> int:
        return self.result.n_tokens

    @metric
    def ratio_to_unigram(self) -> float:
        """``PPL_model / PPL_unigram``: below 1 when the model predicts better than token frequencies alone."""
        return self.result.perplexity / self.unigram_perplexity


def unigram_perplexity(loaded: LoadedModel, corpus: Corpus, *, seq_len: int, n_windows: int) -> float:
    """``exp(−mean log q(w))`` over the tokens the model is scored on, ``q`` the corpus's token frequencies."""
    tokens = corpus_tokens(loaded.tokenizer, corpus)  # (n_corpus_tokens,)
    counts = torch.bincount(tokens).double()
    log_q = torch.log(counts / counts.sum())
    windows = corpus_windows(loaded.tokenizer, corpus, seq_len, n_windows)  # (n_windows, [BOS] + seq_len)
    scored = windows[:, 1:]  # column 0 is never scored (BOS, or the context-only first token)
    return math.exp(-float(log_q[scored.flatten()].mean()))


def perplexity_audit(loaded: LoadedModel, corpus: Corpus, *, seq_len: int, n_windows: int,
                     batch_size: int) -> PerplexityAudit:
    """The model's perplexity under the pinned definition, beside the unigram baseline (module docstring)."""
    result = perplexity(loaded.model, loaded.tokenizer, corpus, seq_len=seq_len, n_windows=n_windows,
                        batch_size=batch_size)
    return PerplexityAudit(result, unigram_perplexity(loaded, corpus, seq_len=seq_len, n_windows=n_windows))
