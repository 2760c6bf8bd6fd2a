"""The model area's checks on tiny models: the unigram baseline by hand, and the counter-example of its gate."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lmaudit.checks.catalog import load_checks
from lmaudit.checks.core.corpora import Corpus
from lmaudit.checks.core.loading import LoadedModel
from lmaudit.checks.core.perplexity import corpus_tokens
from lmaudit.checks.harness.audit_file import parse_audit_file
from lmaudit.checks.harness.thresholds import compare
from lmaudit.checks.model.summary import architecture_summary, perplexity_audit, unigram_perplexity
from tests.checkpoints import byte_tokenizer
from tests.tiny_models import ARCHITECTURES, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = " ".join(f"the cat sat on mat number {i % 7} and the dog ran." for i in range(200))
CORPUS = Corpus("cats", TEXT, "test:cats")
load_checks()  # the audit file names registered checks
(GATE,) = {a.entry.name: a for a in parse_audit_file(Path(__file__).parents[1] / "audits" / "model.yaml")}[
    "perplexity_beats_unigram_baseline"].resolve("full").expect.values()  # the shipped threshold, read, not copied


def test_unigram_perplexity_by_hand() -> None:
    loaded = LoadedModel.from_model(tiny_model("llama"), byte_tokenizer())
    tokens = corpus_tokens(loaded.tokenizer, CORPUS)
    counts = torch.bincount(tokens).double()
    scored = tokens[:4 * 32]  # the tokens of 4 windows of 32 (the BOS is context only)
    expected = math.exp(-float(torch.log(counts[scored] / counts.sum()).mean()))
    assert unigram_perplexity(loaded, CORPUS, seq_len=32, n_windows=4) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_architecture_summary_on_every_supported_architecture(architecture: str) -> None:
    summary = architecture_summary(LoadedModel.from_model(tiny_model(architecture), byte_tokenizer()))
    assert summary.n_layers == 3 and set(summary.metrics()) == set(type(summary).metric_names())
    assert summary.sandwich_norms == (architecture in ("gemma2", "gemma3_text", "olmo2"))


@pytest.mark.counterexample("perplexity_beats_unigram_baseline.ratio_to_unigram")
def test_a_random_model_does_not_beat_the_unigram_baseline() -> None:
    """A random-init model predicts the corpus worse than the corpus's own token frequencies (ratio above 1)."""
    loaded = LoadedModel.from_model(tiny_model("llama", seed=1), byte_tokenizer())
    audit = perplexity_audit(loaded, CORPUS, seq_len=32, n_windows=4, batch_size=4)
    assert audit.ratio_to_unigram > 1
    assert not compare("ratio_to_unigram", audit.ratio_to_unigram, GATE).passed


def test_a_model_that_learned_the_corpus_passes_the_gate() -> None:
    """The gate is passable: a tiny llama trained for a few steps on the corpus beats its unigram baseline."""
    torch.manual_seed(0)
    model = tiny_model("llama", seed=2)
    tokenizer = byte_tokenizer()
    tokens = corpus_tokens(tokenizer, CORPUS)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with torch.enable_grad():
        for step in range(60):
            start = (step * 97) % (len(tokens) - 65)
            batch = tokens[start:start + 64][None]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    audit = perplexity_audit(LoadedModel.from_model(model, tokenizer), CORPUS, seq_len=32, n_windows=4,
                             batch_size=4)
    assert compare("ratio_to_unigram", audit.ratio_to_unigram, GATE).passed
