"""lmaudit.checks.core.perplexity on tiny Llamas: the pinned windows, exp(mean NLL) by hand, known answers, errors,
caching."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lmaudit.checks.core.adapter import adapter_for
from lmaudit.checks.core.corpora import Corpus
from lmaudit.checks.core.errors import LmAuditError, NonFiniteOutputError
from lmaudit.checks.core.interventions import edit_weight
from lmaudit.checks.core.perplexity import (
    PERPLEXITY_DEFINITION,
    CorpusTooShortError,
    PerplexityResult,
    corpus_tokens,
    corpus_windows,
    perplexity,
    window_nll,
)
from tests.checkpoints import byte_tokenizer
from tests.tiny_models import VOCAB, tiny_model

TEXT = "\n\n".join(f"Section {i}: the value of x{i} is {i * i}; see also y{i}." for i in range(40))  # ASCII


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=2)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus("sections", TEXT, "test:sections")


def _no_bos_tokenizer():
    tokenizer = byte_tokenizer()
    tokenizer.bos_token = None
    return tokenizer


def test_windows_are_consecutive_chunks_behind_one_bos(tok, corpus) -> None:
    tokens = tok(TEXT, add_special_tokens=False)["input_ids"]
    windows = corpus_windows(tok, corpus, seq_len=16, n_windows=3)
    assert windows.shape == (3, 17) and windows.dtype == torch.long
    assert (windows[:, 0] == tok.bos_token_id).all()
    assert windows[:, 1:].reshape(-1).tolist() == tokens[:48]

    no_bos = corpus_windows(_no_bos_tokenizer(), corpus, seq_len=16, n_windows=3)
    assert no_bos.shape == (3, 16) and no_bos.reshape(-1).tolist() == tokens[:48]


def test_perplexity_is_exp_mean_nll_by_hand(model, tok, corpus) -> None:
    for tokenizer, scored_from in ((tok, 0), (_no_bos_tokenizer(), 1)):
        result = perplexity(model, tokenizer, corpus, seq_len=12, n_windows=5, batch_size=2)
        tokens = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
        nlls = []
        for k in range(5):
            window = tokens[k * 12 : (k + 1) * 12]
            prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
            ids = prefix + window
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0]  # (t, vocab)
            for t in range(len(prefix) + scored_from, len(ids)):  # every window token, or all but the first
                nlls.append(-float(torch.log_softmax(logits[t - 1].double(), dim=-1)[ids[t]]))
        assert result.n_tokens == len(nlls) == (60 if scored_from == 0 else 55)
        assert result.mean_nll == pytest.approx(sum(nlls) / len(nlls), rel=1e-6)
        assert result.perplexity == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-6)
        assert (result.n_windows, result.seq_len, result.corpus, result.corpus_source) == (
            5,
            12,
            "sections",
            "test:sections",
        )


def test_uniform_model_has_perplexity_vocab_size(model, tok, corpus) -> None:
    with edit_weight(adapter_for(model).unembedding, (slice(None), slice(None)), scale=0.0):  # all logits 0
        result = perplexity(model, tok, corpus, seq_len=8, n_windows=2)
    assert result.perplexity == pytest.approx(VOCAB, rel=1e-6)
    assert result.mean_nll == pytest.approx(math.log(VOCAB), rel=1e-6)


def test_window_nll_is_batch_invariant_and_sees_interventions(model, tok, corpus) -> None:
    windows = corpus_windows(tok, corpus, seq_len=20, n_windows=5)
    one = window_nll(model, windows, batch_size=1)
    three = window_nll(model, windows, batch_size=3)
    assert one.shape == (5,)
    torch.testing.assert_close(one, three, rtol=1e-5, atol=1e-5)
    with edit_weight(adapter_for(model).unembedding, (slice(None), slice(None)), scale=0.0):
        torch.testing.assert_close(
            window_nll(model, windows), torch.full((5,), 20 * math.log(VOCAB), dtype=torch.float64)
        )
    assert torch.equal(window_nll(model, windows, batch_size=1), one)  # restored, nothing cached

    calls = []

    def forward(input_ids, attention_mask):
        calls.append(tuple(input_ids.shape))
        assert attention_mask is None
        return torch.zeros(*input_ids.shape, VOCAB)

    torch.testing.assert_close(
        window_nll(model, windows, batch_size=2, forward=forward),
        torch.full((5,), 20 * math.log(VOCAB), dtype=torch.float64),
    )
    assert calls == [(2, 21), (2, 21), (1, 21)]


def test_short_corpus_says_how_many_windows_it_has(model, tok) -> None:
    exact = Corpus("exact", "x" * 50, "test:exact")  # 50 byte tokens: 3 windows of 16
    assert corpus_windows(tok, exact, seq_len=16, n_windows=3).shape == (3, 17)
    with pytest.raises(
        CorpusTooShortError, match=r"50 tokens, i\.e\. 3 full windows of 16 tokens; 4 were requested"
    ):
        perplexity(model, tok, exact, seq_len=16, n_windows=4)
    with pytest.raises(LmAuditError, match="max_position_embeddings=256"):
        perplexity(model, tok, exact, seq_len=256, n_windows=1)
    with pytest.raises(LmAuditError, match="seq_len must be an int >= 2"):
        corpus_windows(tok, exact, seq_len=1, n_windows=1)
    with pytest.raises(LmAuditError, match="n_windows must be an int >= 1"):
        perplexity(model, tok, exact, seq_len=8, n_windows=0)


def test_nan_logits_raise(model, tok, corpus) -> None:
    with (
        edit_weight(adapter_for(model).unembedding, (3, 0), value=float("nan")),
        pytest.raises(NonFiniteOutputError, match="perplexity windows 0..1"),
    ):
        perplexity(model, tok, corpus, seq_len=8, n_windows=2)


def test_tokens_are_cached_per_tokenizer_and_text(tok, corpus) -> None:
    first = corpus_tokens(tok, corpus)
    assert corpus_tokens(tok, corpus) is first
    assert corpus_tokens(tok, Corpus("sections", TEXT + "!", "test:sections")) is not first
    assert corpus_tokens(byte_tokenizer(), corpus) is not first  # another unnamed tokenizer: not shared
    assert torch.equal(corpus_tokens(byte_tokenizer(), corpus), first)


def test_result_is_frozen_plain_data_with_the_definition(model, tok, corpus) -> None:
    result = perplexity(model, tok, corpus, seq_len=8, n_windows=1)
    assert isinstance(result, PerplexityResult) and result.definition == PERPLEXITY_DEFINITION
    assert all(isinstance(v, (int, float, str)) for v in dataclasses.asdict(result).values())
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.perplexity = 1.0  # type: ignore[misc]
    for phrase in ("exp(mean token NLL)", "without special tokens", "non-overlapping", "[BOS] + window"):
        assert phrase in PERPLEXITY_DEFINITION
