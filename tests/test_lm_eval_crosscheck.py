"""lmaudit's perplexity and log-probabilities against lm-eval's, offline (lmaudit.checks.core.lm_eval_bridge).

Tolerance: lmaudit and lm-eval score the same tokens in the same contexts in float32; what differs is only the
batch shape (lm-eval feeds seq_len tokens, lmaudit seq_len + 1) and summation order, i.e. rounding of ~1e-7
relative per token (measured: 5e-8 on the real model). We assert rel 1e-4: far above rounding, far below what
any definitional slip produces — scoring one token more or less per 128-token window, or conditioning a window
on the text before it instead of BOS, moves the perplexity by ~1 % or more.
"""

from __future__ import annotations

import json
import string

import pytest
import torch
from tokenizers.processors import TemplateProcessing

from lmaudit.checks.core.adapter import adapter_for
from lmaudit.checks.core.corpora import Corpus, load_corpus, shared_data_dir
from lmaudit.checks.core.interventions import edit_weight
from lmaudit.checks.core.lm_eval_bridge import lm_eval_rolling_perplexity, make_hflm, run_lm_eval_tasks
from lmaudit.checks.core.logprobs import answer_is_greedy, continuation_logprob, greedy_answers
from lmaudit.checks.core.perplexity import perplexity
from tests.checkpoints import byte_tokenizer
from tests.tiny_models import tiny_model

REL = 1e-4
TEXT = "\n\n".join(f"Entry {i}: {i} squared is {i * i}, and {i} plus one is {i + 1}." for i in range(60))


pytestmark = pytest.mark.usefixtures("one_thread")


def test_rolling_perplexity_matches_on_a_tiny_model() -> None:
    model, tokenizer = tiny_model("llama", seed=3), byte_tokenizer()
    corpus = Corpus("entries", TEXT, "test:entries")
    ours = perplexity(model, tokenizer, corpus, seq_len=32, n_windows=4).perplexity
    theirs = lm_eval_rolling_perplexity(model, tokenizer, corpus.text, seq_len=32, n_windows=4)
    assert theirs == pytest.approx(ours, rel=REL)
    # a one-token shift of every window is what a definitional slip looks like: it must not pass
    shifted = lm_eval_rolling_perplexity(model, tokenizer, TEXT[1:], seq_len=32, n_windows=4)
    assert shifted != pytest.approx(ours, rel=REL)


def test_crosscheck_catches_a_windowing_slip_in_lmaudit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cross-check builds its windows from the raw text itself: an lmaudit that dropped its BOS, or cut
    its windows one token late, disagrees with lm-eval instead of copying the slip into both sides."""
    import lmaudit.checks.core.perplexity as ppl

    model, tokenizer = tiny_model("llama", seed=3), byte_tokenizer()
    corpus = Corpus("entries", TEXT, "test:entries")
    theirs = lm_eval_rolling_perplexity(model, tokenizer, corpus.text, seq_len=32, n_windows=4)
    real_tokens = ppl.corpus_tokens
    monkeypatch.setattr(ppl, "corpus_tokens", lambda tok, c: real_tokens(tok, c)[1:])  # one token late
    late = perplexity(model, tokenizer, corpus, seq_len=32, n_windows=4).perplexity
    monkeypatch.setattr(ppl, "corpus_tokens", real_tokens)
    monkeypatch.setattr(ppl, "bos_prefix", lambda tok: [])  # no BOS
    no_bos = perplexity(model, tokenizer, corpus, seq_len=32, n_windows=4).perplexity
    assert late != pytest.approx(theirs, rel=REL) and no_bos != pytest.approx(theirs, rel=REL)


def test_run_lm_eval_tasks_loglikelihood_agrees_with_logprobs(tmp_path) -> None:
    """lm-eval's loglikelihood (log p, is_greedy) per document equals continuation_logprob /
    answer_is_greedy."""
    model = tiny_model("llama", seed=4)
    tokenizer = byte_tokenizer()  # this one adds BOS itself, as lm-eval's add_bos_token=True expects
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    prompts = ["abc", "Hello", "3+5=", "one two", "xyz", "The end"]
    printable = {
        tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in string.ascii_letters + string.digits
    }
    others = torch.tensor([t for t in range(model.config.vocab_size) if t not in printable])
    with edit_weight(
        adapter_for(model).unembedding, (others, slice(None)), scale=0.0
    ):  # greedy text is printable
        greedy = greedy_answers(model, tokenizer, prompts, max_new_tokens=2, stop=())
        rows = [
            {"prompt": p, "continuation": c}
            for p, g in zip(prompts, greedy, strict=True)
            for c in (g, g[:1] + "?")
        ]
        path = tmp_path / "pairs.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        task = {
            "task": "lmaudit_pairs",
            "dataset_path": "json",
            "test_split": "test",
            "output_type": "loglikelihood",
            "dataset_kwargs": {"data_files": {"test": str(path)}, "cache_dir": str(tmp_path / "hf-datasets")},
            "doc_to_text": "prompt",
            "doc_to_target": "continuation",
            "target_delimiter": "",
            "metric_list": [{"metric": "acc"}],
            "metadata": {"version": 1.0},
        }
        lm = make_hflm(model, tokenizer, batch_size=4, add_bos_token=True)
        out = run_lm_eval_tasks(model, tokenizer, [task], lm=lm, log_samples=True)
        ours_lp = continuation_logprob(
            model, tokenizer, [r["prompt"] for r in rows], [r["continuation"] for r in rows]
        )
        ours_greedy = answer_is_greedy(
            model, tokenizer, [r["prompt"] for r in rows], [r["continuation"] for r in rows]
        )
    samples = sorted(out["samples"]["lmaudit_pairs"], key=lambda s: s["doc_id"])
    theirs_lp = torch.tensor([float(s["resps"][0][0][0]) for s in samples])
    theirs_greedy = torch.tensor([bool(s["resps"][0][0][1]) for s in samples])
    torch.testing.assert_close(ours_lp, theirs_lp, atol=1e-4, rtol=0)
    assert ours_greedy.tolist() == theirs_greedy.tolist() == [True, False] * len(prompts)
    assert out["results"]["lmaudit_pairs"]["acc,none"] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def default_model():
    from lmaudit.checks.core.loading import ALIASES, DEFAULT_MODEL, load_model

    if ALIASES[DEFAULT_MODEL].path() is None:
        pytest.skip(f"default model not installed ({ALIASES[DEFAULT_MODEL].install})")
    return load_model(DEFAULT_MODEL)


@pytest.mark.slow
@pytest.mark.parametrize("corpus_name", ["pydoc", "wikitext2"])
def test_rolling_perplexity_matches_on_the_default_model(default_model, corpus_name: str) -> None:
    if corpus_name == "wikitext2" and shared_data_dir() is None:
        pytest.skip("../shared/data is absent")
    corpus = load_corpus(corpus_name)
    model, tokenizer = default_model.model, default_model.tokenizer
    ours = perplexity(model, tokenizer, corpus, seq_len=128, n_windows=4)
    with torch.no_grad():
        theirs = lm_eval_rolling_perplexity(model, tokenizer, corpus.text, seq_len=128, n_windows=4)
    assert ours.n_tokens == 512
    assert theirs == pytest.approx(ours.perplexity, rel=REL), (ours.perplexity, theirs)
